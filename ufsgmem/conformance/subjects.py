"""Subjects: the implementations of guest_memfd the conformance cases run against, behind one interface.

* :class:`KernelSubject` — the real thing: ``KVM_CREATE_GUEST_MEMFD`` on a fresh default VM
  (:mod:`ufsgmem.kvm`); ``fallocate(2)`` with a mode through libc, mmap(2), and plain ``os`` calls.
* :class:`MountSubject` — a ufsgmem FUSE mount, used the way a program would: ``MOUNTPOINT/ctl`` creates a
  file, ``NAME/mem`` is opened by path with libc ``open(O_RDWR)`` (so the fd's flags are what a C program
  gets, not Python's close-on-exec default), and from then on the same system calls as on the kernel:
  ``fallocate(2)`` and ``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)`` on ``mem``. Only the emulated pin, which
  has no system call, is a ``NAME/ctl`` request.
  Its vCPU cases need only a VM (the mount's memory is an ordinary memslot), not the kernel's
  guest_memfd, so they run wherever ``/dev/kvm`` makes a VM.
* :class:`CoreSubject` — the in-process core (:class:`ufsgmem.gmem.GuestMemfd`) with no file at all:
  host_read/host_write stand in for mapping accesses and :class:`~ufsgmem.gmem.HostFault` for SIGBUS.
  It lacks every file-level capability, and the cases that need one are *not applicable* to it.

Each subject lists its ``capabilities``; a case names what it needs, and a subject without it is
reported "n/a" for that case rather than forced through a path it does not have.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import itertools
import os
import platform
import subprocess
import sys
import tempfile

from .. import kvm
from ..errors import GuestMemfdError
from ..syscalls import fallocate
from ..gmem import GuestMemfd, HostFault
from ..protocol import attributes2, create_request, create_text, error_offset_of, ranged_text
from ..uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SIZE
from .mapping import MAP_SHARED, PROT_READ, PROT_WRITE, Mapping, mmap_fd, runs

#: Capabilities a case may need.
FD = "fd"  # a real file descriptor: read/write/fstat/ftruncate/fchmod/fcntl/ioctl
MMAP = "mmap"  # mmap(2) itself, with its own errors, and madvise
ACCESS = "access"  # touching mapped memory (SIGBUS where the kernel gives it)
GUEST = "guest"  # a real vCPU reaching the memory
ATTRIBUTES = "attributes"  # KVM_SET_MEMORY_ATTRIBUTES2 on the file (v8)
PIN = "pin"  # an emulated long-term pin

_libc = ctypes.CDLL(None, use_errno=True)
_libc.open.argtypes = [ctypes.c_char_p, ctypes.c_int]


class NotApplicable(Exception):
    """The subject has no way to do this (reported as n/a, never as a result)."""


class GmemFile:
    """One guest_memfd file of a subject. The default methods use the real fd."""

    def __init__(self, subject: "Subject", size: int, flags: int, fd: int | None):
        self.subject = subject
        self.size = size
        self.flags = flags
        self.fd = fd
        self._mappings: list[Mapping] = []

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """The subject's way to fallocate (the kernel: fallocate(2))."""
        fallocate(self.fd, mode, offset, length)

    def fallocate_syscall(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on the fd, whatever the subject's usual way is."""
        fallocate(self.fd, mode, offset, length)

    def mmap(self, length: int | None = None, flags: int = MAP_SHARED, prot: int = PROT_READ | PROT_WRITE,
             offset: int = 0) -> Mapping:
        mapping = mmap_fd(self.fd, self.size if length is None else length, flags, prot, offset)
        self._mappings.append(mapping)
        return mapping

    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: tuple[int, ...] = (0,) * 11, error_offset: int = 0) -> int:
        """KVM_SET_MEMORY_ATTRIBUTES2; returns error_offset as the call left it (raises OSError)."""
        arg = attributes2(offset, size, attributes, flags, error_offset, reserved)
        try:
            fcntl.ioctl(self.fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
        except OSError as exc:
            raise GuestMemfdError(exc.errno, "KVM_SET_MEMORY_ATTRIBUTES2", error_offset=error_offset_of(arg)) from None
        return error_offset_of(arg)

    def pin(self, offset: int, size: int) -> None:
        raise NotApplicable("no emulated pin")

    def unpin(self, offset: int, size: int) -> None:
        raise NotApplicable("no emulated pin")

    def guest_access(self, mapping: Mapping, offset: int, value: int) -> int:
        """A vCPU reads the byte at ``offset`` of ``mapping`` (returned), then writes ``value`` there."""
        raise NotApplicable("no vCPU path")

    def close(self) -> None:
        while self._mappings:
            self._mappings.pop().close()
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Subject:
    """An implementation under test. Use as a context manager: everything it made goes at exit."""

    name = "subject"
    capabilities: frozenset[str] = frozenset()

    def __init__(self):
        self._files: list[GmemFile] = []

    def create(self, size: int, flags: int = 0, reserved: tuple[int, ...] | None = None) -> GmemFile:
        """KVM_CREATE_GUEST_MEMFD; ``reserved`` sets the struct's six reserved words (default all 0)."""
        file = self._create(size, flags, reserved)
        self._files.append(file)
        return file

    def _create(self, size: int, flags: int, reserved: tuple[int, ...] | None) -> GmemFile:
        raise NotImplementedError

    def close(self) -> None:
        while self._files:
            self._files.pop().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- the kernel ----------------------------------------------------------------------------------------
class KernelFile(GmemFile):
    def guest_access(self, mapping, offset, value):
        # as test_guest_memfd_guest: the mapping becomes a memslot bound to this guest_memfd, which must
        # belong to the same VM (one access per file: the vCPU and memslots stay with the VM)
        return kvm.run_guest_access(self.subject.vm, mapping.address, mapping.length, offset, value,
                                    guest_memfd=self.fd)


class KernelSubject(Subject):
    """guest_memfd files of one fresh default VM."""

    name = "kernel"
    capabilities = frozenset({FD, MMAP, ACCESS, GUEST, ATTRIBUTES})
    vm_type = 0  # KVM_CREATE_VM's type: the default VM

    def __init__(self):
        super().__init__()
        self.kvm = kvm.Kvm()
        try:
            self.vm = self.kvm.create_vm(self.vm_type)
        except BaseException:
            self.kvm.close()
            raise

    def _create(self, size, flags, reserved):
        return KernelFile(self, size, flags, self.vm.create_guest_memfd(size, flags, reserved or (0,) * 6))

    def close(self):
        super().close()
        self.vm.close()
        self.kvm.close()


# --- the in-process core -------------------------------------------------------------------------------
class CoreMapping(Mapping):
    """Accesses through GuestMemfd.host_read/host_write, one page at a time (a fault stops the rest)."""

    def __init__(self, gm: GuestMemfd, length: int, offset: int):
        super().__init__(0, length)
        self.gm = gm
        self.offset = offset

    def run(self, ops):
        results = []
        try:
            for op in ops:
                results.append(self._perform(op))
        except HostFault:
            results.append("SIGBUS")
        return results

    def _perform(self, op):
        kind, offset, length = op[0], self.offset + op[1], op[2]
        chunks = []
        for start in range(offset, offset + length, PAGE_SIZE):
            n = min(PAGE_SIZE - start % PAGE_SIZE, offset + length - start)
            if kind == "fill":
                self.gm.host_write(start, bytes([op[3]]) * n)
            else:
                chunks.append(bytes(self.gm.host_read(start, n)))
        return "ok" if kind == "fill" else runs(b"".join(chunks))

    def madvise(self, offset, length, advice):
        raise NotApplicable("the core has no mappings to advise")

    def msync(self, offset, length, flags):
        raise NotApplicable("the core has no mappings to sync")

    def mbind(self, offset, length, mode, nodemask):
        raise NotApplicable("the core has no mappings to bind")

    def close(self):
        self.length = 0


class CoreFile(GmemFile):
    def __init__(self, subject, gm: GuestMemfd):
        super().__init__(subject, gm.size, gm.flags, None)
        self.gm = gm

    def fallocate(self, mode, offset, length):
        self.gm.fallocate(mode, offset, length)

    def fallocate_syscall(self, mode, offset, length):
        raise NotApplicable("the core has no file descriptor")

    def mmap(self, length=None, flags=MAP_SHARED, prot=PROT_READ | PROT_WRITE, offset=0):
        return CoreMapping(self.gm, self.size if length is None else length, offset)

    def set_memory_attributes(self, offset, size, attributes, flags=0, reserved=(0,) * 11, error_offset=0):
        try:
            self.gm.set_memory_attributes(offset, size, attributes, flags, reserved)
        except GuestMemfdError as exc:
            raise GuestMemfdError(exc.errno, exc.detail,
                                  error_offset if exc.error_offset is None else exc.error_offset) from None
        return error_offset

    def pin(self, offset, size):
        self.gm.pin(offset, size)

    def unpin(self, offset, size):
        self.gm.unpin(offset, size)

    def close(self):
        self.gm.close()


class CoreSubject(Subject):
    """The core in this process, on the anon backend (4 KiB pages, like the kernel's guest_memfd)."""

    name = "core"
    capabilities = frozenset({ACCESS, ATTRIBUTES, PIN})

    def _create(self, size, flags, reserved):
        if reserved is not None:
            raise NotApplicable("the core has no creation struct")
        return CoreFile(self, GuestMemfd(size, flags, backend="anon"))


@functools.lru_cache(maxsize=None)
def vm_unavailable_reason() -> str | None:
    """None when this process can make a KVM VM (what the mount's vCPU cases need); otherwise why not.
    Asked once per process: every mount subject would otherwise make a VM just to find out."""
    if platform.machine() != "x86_64":
        return f"the vCPU helpers are x86-64 only (this is {platform.machine()})"
    try:
        with kvm.Kvm() as k, k.create_vm(0):
            return None
    except OSError as exc:
        return f"cannot create a KVM VM through {kvm.KVM_DEVICE}: {exc}"


def vm_kvm() -> "kvm.Kvm | None":
    return kvm.Kvm() if vm_unavailable_reason() is None else None


# --- a ufsgmem mount -----------------------------------------------------------------------------------
_names = itertools.count()


def _request(path: str, request: bytes) -> None:
    """One write of a request to a control file: the write's errno is the request's result."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, request)
    finally:
        os.close(fd)


class MountFile(GmemFile):
    """A file on a mount: fallocate(2) and KVM_SET_MEMORY_ATTRIBUTES2 are the real system calls on ``mem``
    (the inherited methods); only the emulated pin has no system call and goes through ``NAME/ctl``."""

    def __init__(self, subject, size, flags, fd, name):
        super().__init__(subject, size, flags, fd)
        self.name = name
        self.dir = os.path.join(subject.mountpoint, name)

    def pin(self, offset, size):
        _request(os.path.join(self.dir, "ctl"), ranged_text("pin", offset, size).encode())

    def unpin(self, offset, size):
        _request(os.path.join(self.dir, "ctl"), ranged_text("unpin", offset, size).encode())

    def guest_access(self, mapping, offset, value):
        # a VMM that maps mem and hands the mapping to KVM as ordinary guest memory
        with self.subject.kvm.create_vm(0) as vm:
            return kvm.run_guest_access(vm, mapping.address, mapping.length, offset, value)

    def close(self):
        super().close()
        try:
            _request(os.path.join(self.subject.mountpoint, "ctl"), f"destroy {self.name}".encode())
        except OSError:
            pass


class MountSubject(Subject):
    """Files on an existing ufsgmem mount (the caller mounts and unmounts it)."""

    name = "ufsgmem"
    capabilities = frozenset({FD, MMAP, ACCESS, GUEST, ATTRIBUTES, PIN})

    def __init__(self, mountpoint: str):
        super().__init__()
        self.mountpoint = mountpoint
        self._ctl: int | None = None
        # the guest cases need a VM, not the kernel's guest_memfd: the mount's memory is an ordinary slot
        self.kvm = vm_kvm()
        if self.kvm is None:
            self.capabilities = self.capabilities - {GUEST}

    def _create(self, size, flags, reserved):
        name = f"conformance{os.getpid()}-{next(_names)}"
        if self._ctl is None:  # one open ctl for all creations: each write is one request
            self._ctl = os.open(os.path.join(self.mountpoint, "ctl"), os.O_WRONLY)
        if reserved is None:
            os.write(self._ctl, create_text(name, size, flags).encode())
        else:  # only the binary form carries the struct's reserved words
            os.write(self._ctl, create_request(name, size, flags, reserved=reserved))
        path = os.path.join(self.mountpoint, name, "mem").encode()
        fd = _libc.open(path, os.O_RDWR)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"open {path.decode()}: {os.strerror(err)}")
        return MountFile(self, size, flags, fd, name)

    def close(self):
        super().close()
        if self._ctl is not None:
            os.close(self._ctl)
            self._ctl = None
        if self.kvm is not None:
            self.kvm.close()


@contextlib.contextmanager
def temporary_mount():
    """A ufsgmem mount on a fresh directory, made with the CLI as a user would; always unmounted."""
    with tempfile.TemporaryDirectory(prefix="ufsgmem-conformance-") as mountpoint:
        subprocess.run([sys.executable, "-m", "ufsgmem", "mount", mountpoint], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            yield mountpoint
        finally:
            subprocess.run([sys.executable, "-m", "ufsgmem", "umount", mountpoint], check=True,
                           stdout=subprocess.DEVNULL)
