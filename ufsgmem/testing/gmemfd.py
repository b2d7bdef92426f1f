"""guest_memfd files behind one Python interface shaped like the uAPI: a ufsgmem file, or the real kernel's.

Purpose: let a VMM developer write one test against guest_memfd semantics and run it, unchanged, on a
ufsgmem mount (which has in-place conversion, pins and huge pages today) and on the kernel of the machine
(which has what it has). :func:`open_gmem` is the only place where the two differ::

    from ufsgmem.testing import open_gmem, PRIVATE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    with open_gmem("ufsgmem", "64K", "mmap|init_shared", mount="/mnt/gmem") as g, g.mmap() as m:
        m.array[:4096] = 0xAA                    # MAP_SHARED; the array is a numpy view of it
        g.set_memory_attributes(0, 4096, PRIVATE)  # ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2)
        g.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 8192, 4096)

Targets (:data:`TARGETS`):

* ``"ufsgmem"`` — a file created on a ufsgmem mount through ``MNT/ctl`` (``create NAME ...``), its ``mem``
  opened ``O_RDWR`` by path, then the same system calls as on the kernel: ``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)``,
  ``fallocate(2)``, ``mmap(2)`` on that descriptor. Pins (an emulated long-term pin, e.g. a device's) go
  through ``NAME/ctl``, as they have no system call. Everything that goes through a control file (create,
  destroy, pins, ``NAME/guest``, ``NAME/status``) is :mod:`ufsgmem.client`'s ``Mount``/``GmemFile``.
* ``"ufsgmem-no-inplace"`` — the same, created with ``in_place_conversion=0``: the file plays a kernel booted
  with ``kvm.gmem_in_place_conversion=0``, so ``KVM_SET_MEMORY_ATTRIBUTES2`` is ENOTTY. For testing a VMM's
  fallback path.
* ``"kernel"`` — ``KVM_CREATE_GUEST_MEMFD`` on a VM of ``/dev/kvm`` (a default VM unless ``vm_type`` says
  otherwise) through :mod:`ufsgmem.kvm`, with whatever flags this kernel accepts; conversion is the same
  ioctl on that fd. Nothing is emulated: every call raises the errno the kernel gives (on mainline 6.18,
  ``KVM_SET_MEMORY_ATTRIBUTES2`` is ENOTTY).

Whether a target can convert at all is *asked*, never assumed: :func:`missing_feature` reads
``KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`` from the installed ``<linux/kvm.h>`` and asks
``KVM_CHECK_EXTENSION`` when the header defines it (its number moved between revisions of the series, so it
is never hard-coded here); otherwise it issues a no-op conversion on a fresh one-page file and reports the
errno the target gives.

Errors are :class:`~ufsgmem.errors.GuestMemfdError` (an ``OSError``): ``.errno`` is the target's errno and
``.error_offset`` the offset the kernel copies back (EAGAIN and ENOMEM of ``KVM_SET_MEMORY_ATTRIBUTES2``;
the emulated pin's EFAULT), else None.

Caveats:

* **A host access to a private page raises SIGBUS in the calling process**, which Python cannot survive:
  touch memory that may be private only through :func:`expect_sigbus`, which runs the access in a forked
  child and reports how it died. So does an access past the end of the file.
* ``mmap()`` returns a :class:`GmemMapping`; ``.array`` is a zero-copy numpy view. A mapping cannot be
  closed while a numpy view of it exists (``BufferError``): ``del`` every view first. Closing the file does
  not unmap its mappings (as in the kernel: they keep the memory alive).
* Mappings are made with Python's ``mmap`` and cannot run past the end of the file (the kernel allows
  that; ``ufsgmem.conformance.mapping.mmap_fd`` maps past EOF for tests that need it).
* ufsgmem cannot refuse ``mmap(2)`` of a file created without ``GUEST_MEMFD_FLAG_MMAP`` (FUSE never sees the
  call; every access would SIGBUS), so :meth:`UfsgmemGmemFd.mmap` gives the kernel's ENODEV itself.
* ``pin``/``unpin`` and ``guest_read``/``guest_write`` exist on ufsgmem only; the kernel target raises
  ``OSError(EOPNOTSUPP)`` saying why. ``status()`` of the kernel target reports only what can be asked
  of a kernel guest_memfd (it has no status file).
* The kernel target's fd stays bound to its VM (the file holds a reference on it); ``.vm`` is that VM, for
  tests that bind memslots. A ufsgmem file cannot be bound to a memslot as a guest_memfd on this kernel.
"""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import contextlib
import itertools
import os
import pickle
import platform
import re
import select
import shutil
import signal
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import client as _client
from .. import kvm as _kvm
from ..address import format_size, parse_size
from ..protocol import ATTRIBUTE_NAMES, attributes2, check_name, check_u64, error_offset_of, flag_names
from ..protocol import parse_flags as _parse_flags
from ..errors import GuestMemfdError, errname
from ..syscalls import fallocate as _fallocate
from ..uapi import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SIZE,
)

__all__ = [
    "TARGETS", "FEATURES", "SHARED", "PRIVATE", "FALLOC_FL_KEEP_SIZE", "FALLOC_FL_PUNCH_HOLE",
    "GUEST_MEMFD_FLAG_MMAP", "GUEST_MEMFD_FLAG_INIT_SHARED", "PAGE_SIZE", "GuestMemfdError",
    "GmemFd", "GmemMapping", "UfsgmemGmemFd", "KernelGmemFd", "UfsgmemMount", "open_gmem", "mounted",
    "missing_feature", "fuse_unavailable_reason", "kernel_unavailable_reason", "header_constant",
    "parse_flags", "expect_sigbus", "ChildOutcome",
]

#: The targets :func:`open_gmem` knows.
TARGETS = ("ufsgmem", "ufsgmem-no-inplace", "kernel")
#: What a test may require of a target (:func:`missing_feature`).
FEATURES = ("conversion", "pin", "guest_access", "hugetlb")

SHARED = 0
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE

#: Where the installed uAPI header is looked for (the kernel headers package, e.g. linux-libc-dev).
KVM_HEADER = "/usr/include/linux/kvm.h"
CAP_NAME = "KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES"

_names = itertools.count()


def parse_flags(flags: int | str) -> int:
    """The kernel's flag word from ``3``, ``"0x3"``, ``"mmap|init_shared"`` or ``"mmap,init_shared"``
    (:func:`ufsgmem.protocol.parse_flags`, whose ValueError this names as a guest_memfd flag's)."""
    try:
        return _parse_flags(flags)
    except ValueError as exc:
        raise ValueError(f"unknown guest_memfd flag in {flags!r}: {exc}") from None


# --- mappings ---------------------------------------------------------------------------------------------
class GmemMapping:
    """A ``MAP_SHARED`` mapping of a guest_memfd; ``array`` is a zero-copy numpy ``uint8`` view of it.

    Close it (or leave its ``with`` block) after dropping every view you took (``del a``), else
    ``BufferError``. Touching a private page through a view raises SIGBUS in this process: do that only
    inside :func:`expect_sigbus`. The mapping itself is :class:`ufsgmem.client.Mapping`'s; this class gives
    it the names of this kit.
    """

    def __init__(self, fd: int, length: int, offset: int = 0, writable: bool = True):
        self.offset, self.length, self.writable = offset, length, writable
        self._mapping: _client.Mapping | None = _client.Mapping(fd, offset, length, writable)
        self._array: np.ndarray | None = None

    @property
    def closed(self) -> bool:
        return self._mapping is None

    @property
    def array(self) -> np.ndarray:
        """The whole mapping as ``uint8`` (one cached view; ``close()`` drops it)."""
        if self._array is None:
            self._array = self.view()
        return self._array

    def view(self, dtype=np.uint8, offset: int = 0, count: int = -1) -> np.ndarray:
        """A new numpy view (``offset`` in bytes from the start of the mapping). Drop it before ``close()``."""
        if self._mapping is None:
            raise ValueError("the mapping is closed")
        return self._mapping.array(dtype, offset, count)

    @property
    def address(self) -> int:
        """The mapping's virtual address (e.g. for a memslot's ``userspace_addr``)."""
        return self.array.__array_interface__["data"][0]

    def close(self) -> None:
        if self._mapping is None:
            return
        self._array = None
        try:
            self._mapping.close()
        except BufferError as exc:
            raise BufferError("a numpy view or memoryview of this guest_memfd mapping still exists: "
                              "drop it (del the array) before closing the mapping") from exc
        self._mapping = None

    def __enter__(self) -> "GmemMapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.length:#x} bytes at file offset {self.offset:#x}"
        return f"<GmemMapping {state}>"


# --- the interface ----------------------------------------------------------------------------------------
class GmemFd:
    """One guest_memfd file of some target. The uAPI calls are the kernel's system calls on :meth:`fileno`.

    Subclasses: :class:`UfsgmemGmemFd`, :class:`KernelGmemFd`. Use as a context manager, or call
    :meth:`close`.
    """

    target = "?"

    def __init__(self, size: int, flags: int):
        self.size = size
        self.flags = flags
        self._fd = -1
        self._mappings: list[weakref.ref] = []

    # --- the descriptor ---------------------------------------------------------------------------
    def fileno(self) -> int:
        """The guest_memfd descriptor: what a VMM hands to KVM, mmap, fallocate and ioctl."""
        if self._fd < 0:
            raise ValueError(f"{self!r} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # --- uAPI -------------------------------------------------------------------------------------
    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0) -> None:
        """``ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, &struct kvm_memory_attributes2)`` (v8 in-place conversion).

        ``attributes`` is :data:`PRIVATE` (8) or :data:`SHARED` (0). Raises GuestMemfdError with the
        target's errno; ``error_offset`` is what the call copied back for EAGAIN (the first page still
        referenced, e.g. pinned) and ENOMEM (the start of the range), None for other errors.
        """
        check_u64(offset=offset, size=size, attributes=attributes, flags=flags)
        arg = attributes2(offset, size, attributes, flags)
        try:
            fcntl.ioctl(self.fileno(), KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
        except OSError as exc:
            error_offset = error_offset_of(arg) if exc.errno in (errno.EAGAIN, errno.ENOMEM) else None
            to = {PRIVATE: "private", SHARED: "shared"}.get(attributes, f"attributes {attributes:#x}")
            detail = f"{self.target}: KVM_SET_MEMORY_ATTRIBUTES2 [{offset:#x}, {offset + size:#x}) to {to}"
            if error_offset is not None:
                detail += f" (error_offset {error_offset:#x})"
            if exc.errno == errno.ENOTTY:
                detail += f" -- {self._no_conversion_hint()}"
            raise GuestMemfdError(exc.errno, detail, error_offset) from None

    def convert(self, offset: int | str, size: int | str, to: str) -> None:
        """``set_memory_attributes`` with ``to`` = ``"private"`` or ``"shared"``."""
        attributes = ATTRIBUTE_NAMES.get(to)
        if attributes is None:
            raise ValueError(f"convert to {to!r}: use 'private' or 'shared'")
        self.set_memory_attributes(parse_size(offset), parse_size(size), attributes)

    def _no_conversion_hint(self) -> str:
        return "this target has no in-place conversion"

    def fallocate(self, mode: int, offset: int | str, size: int | str) -> None:
        """``fallocate(2)``: ``FALLOC_FL_KEEP_SIZE`` allocates, ``KEEP_SIZE | PUNCH_HOLE`` frees (zeroes) the
        range and leaves its attribute alone; any other mode is EOPNOTSUPP, unaligned ranges EINVAL."""
        offset, size = parse_size(offset), parse_size(size)
        try:
            _fallocate(self.fileno(), mode, offset, size)
        except OSError as exc:
            raise GuestMemfdError(exc.errno, f"{self.target}: fallocate(mode={mode:#x}, {offset:#x}, "
                                             f"{size:#x})") from None

    def allocate(self, offset: int | str, size: int | str) -> None:
        self.fallocate(FALLOC_FL_KEEP_SIZE, offset, size)

    def punch_hole(self, offset: int | str, size: int | str) -> None:
        self.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, size)

    def mmap(self, offset: int = 0, length: int | None = None, *, writable: bool = True) -> GmemMapping:
        """``mmap(MAP_SHARED)`` of ``[offset, offset + length)`` (the whole file by default).

        ENODEV without ``GUEST_MEMFD_FLAG_MMAP``, as the kernel says."""
        length = self.size - offset if length is None else length
        try:
            mapping = GmemMapping(self.fileno(), length, offset, writable)
        except OSError as exc:
            raise GuestMemfdError(exc.errno, f"{self.target}: mmap(MAP_SHARED, {length:#x} bytes at "
                                             f"{offset:#x})") from None
        self._mappings.append(weakref.ref(mapping))
        return mapping

    def close_mappings(self) -> list[GmemMapping]:
        """Close every mapping this file made that is still open; return those that could not be
        closed because a view of them still exists (they stay mapped until garbage-collected)."""
        stuck = []
        for ref in self._mappings:
            mapping = ref()
            if mapping is not None and not mapping.closed:
                try:
                    mapping.close()
                except BufferError:
                    stuck.append(mapping)
        self._mappings = [weakref.ref(m) for m in stuck]
        return stuck

    # --- ufsgmem-only aids (the kernel target raises EOPNOTSUPP) -------------------------------------
    def pin(self, offset: int | str, size: int | str) -> None:
        """An emulated long-term pin (a device's GUP pin): shared→private over it fails with EAGAIN."""
        raise self._unsupported("pin")

    def unpin(self, offset: int | str, size: int | str) -> None:
        raise self._unsupported("unpin")

    def guest_read(self, offset: int, size: int) -> bytes:
        """What the guest reads (private pages too): a stand-in for a vCPU access."""
        raise self._unsupported("guest_read")

    def guest_write(self, offset: int, data: bytes) -> None:
        raise self._unsupported("guest_write")

    def _unsupported(self, what: str) -> GuestMemfdError:
        return GuestMemfdError(errno.EOPNOTSUPP, f"{self.target}: {what} is not available")

    def status(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._fd}"
        return f"<{type(self).__name__} {self.target} {format_size(self.size)} flags={self.flags:#x} {state}>"


# --- ufsgmem ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UfsgmemMount:
    """A mounted ufsgmem filesystem (``path``) and its server's pid."""

    path: str
    pid: int | None = None

    def create(self, size: int | str, flags: int | str, **options) -> "UfsgmemGmemFd":
        """A new file on this mount (see :class:`UfsgmemGmemFd`)."""
        return UfsgmemGmemFd(self, size, flags, **options)

    def __fspath__(self) -> str:
        return self.path


class UfsgmemGmemFd(GmemFd):
    """A guest_memfd file on a ufsgmem mount: ``create NAME ...`` on ``MNT/ctl``, then ``MNT/NAME/mem``
    opened ``O_RDWR`` by path. :meth:`close` closes it and destroys the name (the memory goes with the last
    mapping, as the kernel frees an inode on its last reference).

    ``backend`` and ``page_size`` pick the memory (e.g. ``backend="hugetlb", page_size="2M"``, which needs
    reserved huge pages and no ``init_shared``); ``in_place_conversion=False`` makes the file play a kernel
    without in-place conversion. The descriptor is inheritable (no ``FD_CLOEXEC``), like the kernel's.
    Requests on the control files (create, destroy, pins) and ``guest``/``status`` are those of
    :class:`ufsgmem.client.Mount` and ``.file``, its :class:`ufsgmem.client.GmemFile`.
    """

    def __init__(self, mount: UfsgmemMount | str | os.PathLike, size: int | str, flags: int | str, *,
                 name: str | None = None, backend: str | None = None, page_size: int | str | None = None,
                 in_place_conversion: bool | None = None):
        super().__init__(parse_size(size), parse_flags(flags))
        self.mount = os.fspath(mount)
        self.name = check_name(name or f"gmem{os.getpid()}-{next(_names)}")
        self.in_place_conversion = in_place_conversion
        self.target = "ufsgmem-no-inplace" if in_place_conversion is False else "ufsgmem"
        self.dir = os.path.join(self.mount, self.name)
        with _client.Mount(self.mount) as mnt:
            self.file = mnt.create(self.name, self.size, self.flags, backend=backend, page_size=page_size,
                                   in_place_conversion=in_place_conversion)
        try:
            self._fd = os.open(os.path.join(self.dir, "mem"), os.O_RDWR)
            os.set_inheritable(self._fd, True)
        except BaseException:
            self.file.close()
            self._destroy()
            raise

    def _no_conversion_hint(self) -> str:
        return ("this file plays a kernel booted with kvm.gmem_in_place_conversion=0"
                if self.in_place_conversion is False else "unexpected: the ufsgmem mount refused the ioctl")

    def pin(self, offset, size) -> None:
        """``NAME/ctl`` ``pin``: EINVAL unaligned/past EOF; EFAULT (``error_offset``) over a private page."""
        self.file.pin(offset, size)

    def unpin(self, offset, size) -> None:
        self.file.unpin(offset, size)

    def guest_read(self, offset: int, size: int) -> bytes:
        """``pread`` of ``NAME/guest``: the guest's view, private pages included."""
        return self.file.guest_read(offset, size)

    def guest_write(self, offset: int, data: bytes) -> None:
        """``pwrite`` of ``NAME/guest``: what a vCPU store would do, private pages included."""
        self.file.guest_write(offset, data)

    def mmap(self, offset: int = 0, length: int | None = None, *, writable: bool = True) -> GmemMapping:
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            # FUSE never sees mmap(2), so the mount cannot refuse it; give the kernel's answer here
            raise GuestMemfdError(errno.ENODEV, f"{self.target}: {self.name} was created without "
                                                f"GUEST_MEMFD_FLAG_MMAP: it cannot be mapped")
        return super().mmap(offset, length, writable=writable)

    def status(self) -> dict:
        """``NAME/status`` (size, flags, backend, page_size, shared/private/pinned bytes, conversions, …)."""
        status = self.file.status()
        status["target"] = self.target
        return status

    def _destroy(self) -> None:
        with _client.Mount(self.mount) as mnt:
            try:
                mnt.destroy(self.name)
            except GuestMemfdError as exc:
                if exc.errno != errno.ENOENT:
                    raise

    def close(self) -> None:
        """Close ``mem`` and destroy the name (mappings stay valid and keep the memory)."""
        if self._fd >= 0:
            super().close()
            self.file.close()
            with contextlib.suppress(OSError):  # a mount that is gone has nothing left to destroy
                self._destroy()


def fuse_unavailable_reason() -> str | None:
    """Why a ufsgmem mount cannot work here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing (no FUSE in this kernel or container)"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return "not root and no fusermount3 to mount FUSE as a user"
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR))
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    try:
        from ..fuse import lowlevel  # noqa: F401  (the compiled libfuse3 binding)
    except ImportError as exc:
        return f"ufsgmem's libfuse3 binding is not built: {exc}"
    return None


@contextlib.contextmanager
def mounted(backend: str = "anon", *, prefix: str = "ufsgmem-pytest-", **options):
    """Mount ufsgmem on a fresh temporary directory (named ``prefix...``); always unmounted, its server
    stopped and the directory removed after, even when the body fails (:func:`ufsgmem.mounts.mounted`).

    Yields a :class:`UfsgmemMount`. ``options`` go to :func:`ufsgmem.mounts.start_background` (e.g.
    ``in_place_conversion=False``). Raises OSError when the mount fails (see :func:`fuse_unavailable_reason`
    to tell in advance). The unmount (:func:`ufsgmem.mounts.unmount`, what ``ufsgmem umount`` does) removes
    the server's log after a clean stop that logged nothing worth reading; any other log stays in the
    runtime directory (``/run/ufsgmem`` for root)."""
    from ..mounts import mounted as _mounted

    with _mounted(prefix=prefix, backend=backend, **options) as (path, pid):
        yield UfsgmemMount(path, pid)


# --- the kernel -------------------------------------------------------------------------------------------
class KernelGmemFd(GmemFd):
    """A real guest_memfd: ``KVM_CREATE_GUEST_MEMFD`` on a fresh VM of ``/dev/kvm`` (type ``vm_type``).

    ``flags`` go to the kernel as given: a flag it does not support is its EINVAL. ``.vm`` is the VM
    (:class:`ufsgmem.kvm.Vm`), open until :meth:`close`, for tests that bind memslots.
    """

    target = "kernel"

    def __init__(self, size: int | str, flags: int | str, *, vm_type: int = 0):
        super().__init__(parse_size(size), parse_flags(flags))
        check_u64(size=self.size, flags=self.flags)
        self.vm_type = vm_type
        self.kvm = _kvm.Kvm()
        try:
            self.vm = self.kvm.create_vm(vm_type)
            try:
                self._fd = self.vm.create_guest_memfd(self.size, self.flags)
            except OSError as exc:
                raise GuestMemfdError(exc.errno, f"kernel: KVM_CREATE_GUEST_MEMFD(size={self.size:#x}, "
                                                 f"flags={self.flags:#x}) on a type-{vm_type} VM") from None
        except BaseException:
            if getattr(self, "vm", None) is not None:
                self.vm.close()
            self.kvm.close()
            raise

    def _no_conversion_hint(self) -> str:
        return (f"kernel {platform.release()} has no KVM_SET_MEMORY_ATTRIBUTES2 on guest_memfd (in-place "
                f"conversion not in this kernel, or kvm.gmem_in_place_conversion=0)")

    def _unsupported(self, what: str) -> GuestMemfdError:
        if what in ("pin", "unpin"):
            why = ("the kernel target has no emulated pin: a real long-term pin needs a device (VFIO/IOMMU) "
                   "or the kernel's GUP_TEST interface; pins are a ufsgmem-only test aid")
        else:
            why = ("the kernel target has no guest-side file: a vCPU reaches guest_memfd only through a memslot "
                   "(see ufsgmem.kvm.run_guest_access); guest_read/guest_write are ufsgmem-only")
        return GuestMemfdError(errno.EOPNOTSUPP, f"kernel: {what}: {why}")

    def status(self) -> dict:
        """What can be asked of a kernel guest_memfd: fstat, and the VM's supported flags."""
        st = os.fstat(self.fileno())
        return {
            "target": self.target, "kernel": platform.release(), "vm_type": self.vm_type,
            "size": st.st_size, "flags": self.flags, "flag_names": flag_names(self.flags),
            "folio_size": st.st_blksize, "page_size": st.st_blksize, "st_blocks": st.st_blocks,
            "supported_flags": self.vm.supported_guest_memfd_flags(),
        }

    def close(self) -> None:
        """Close the guest_memfd and its VM (mappings stay valid and keep the memory)."""
        super().close()
        self.vm.close()
        self.kvm.close()


def kernel_unavailable_reason() -> str | None:
    """Why a kernel guest_memfd cannot be created here (no /dev/kvm, no permission, no guest_memfd), or None."""
    return _kvm.skip_reason()


def header_constant(name: str, header: str = KVM_HEADER) -> int | None:
    """The value of ``#define NAME <number>`` in a C header, or None (no header, no such define, or not a
    plain number)."""
    try:
        with open(header, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    match = re.search(rf"^\s*#\s*define\s+{re.escape(name)}\s+(\(?\s*(?:0[xX][0-9a-fA-F]+|\d+)\s*\)?)\s*$",
                      text, re.MULTILINE)
    if not match:
        return None
    return int(match.group(1).strip("() \t"), 0)


# --- the open_gmem factory --------------------------------------------------------------------------------
def open_gmem(target: str, size: int | str, flags: int | str, *, mount: UfsgmemMount | str | None = None,
              name: str | None = None, backend: str | None = None, page_size: int | str | None = None,
              in_place_conversion: bool | None = None, vm_type: int = 0) -> GmemFd:
    """A new guest_memfd of ``size`` bytes with the kernel's ``flags`` on ``target`` (:data:`TARGETS`).

    ``mount`` (a path or :class:`UfsgmemMount`) is needed by the ufsgmem targets; ``name``, ``backend``,
    ``page_size`` and ``in_place_conversion`` are ufsgmem's; ``vm_type`` the kernel's. Mainline guest_memfd
    has no HugeTLB, so a huge ``page_size`` or a backend on the kernel target is EOPNOTSUPP.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown guest_memfd target {target!r} (one of {', '.join(TARGETS)})")
    if target == "kernel":
        if backend is not None or (page_size is not None and parse_size(page_size) != PAGE_SIZE):
            raise GuestMemfdError(errno.EOPNOTSUPP, "kernel: mainline guest_memfd has only 4 KiB pages and no "
                                                    "backend choice (HugeTLB guest_memfd is unmerged work)")
        if in_place_conversion is not None:
            raise GuestMemfdError(errno.EOPNOTSUPP, "kernel: in-place conversion is the kernel's read-only "
                                                    "module parameter kvm.gmem_in_place_conversion")
        return KernelGmemFd(size, flags, vm_type=vm_type)
    if mount is None:
        raise ValueError(f"target {target!r} needs mount= (a ufsgmem mount point)")
    if target == "ufsgmem-no-inplace":
        if in_place_conversion:
            raise ValueError("target 'ufsgmem-no-inplace' is in_place_conversion=False by definition")
        in_place_conversion = False
    return UfsgmemGmemFd(mount, size, flags, name=name, backend=backend, page_size=page_size,
                         in_place_conversion=in_place_conversion)


# --- what a target can do ---------------------------------------------------------------------------------
def _conversion_probe(gmem: GmemFd, *, initial: int) -> OSError | None:
    """A conversion of page 0 of a fresh file to the attribute it already has: it changes nothing where the
    call exists and works (v8 returns at once for a no-op), and gives the target's errno where not."""
    try:
        gmem.set_memory_attributes(0, PAGE_SIZE, initial)
    except OSError as exc:
        return exc
    return None


def missing_feature(target: str, feature: str, *, mount: UfsgmemMount | str | None = None, vm_type: int = 0,
                    header: str = KVM_HEADER) -> str | None:
    """None when ``target`` has ``feature`` (:data:`FEATURES`), else a precise reason (for a test skip).

    ``conversion`` is asked, never assumed. For the kernel: ``KVM_CHECK_EXTENSION`` of
    ``KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES`` if ``header`` (the installed ``<linux/kvm.h>``) defines it, else
    a no-op ``KVM_SET_MEMORY_ATTRIBUTES2`` on a fresh one-page guest_memfd and the errno it gives. For
    ufsgmem, the same no-op on a fresh file on ``mount``.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown guest_memfd target {target!r} (one of {', '.join(TARGETS)})")
    if feature not in FEATURES:
        raise ValueError(f"unknown feature {feature!r} (one of {', '.join(FEATURES)})")
    if target == "kernel":
        reason = kernel_unavailable_reason()
        if reason:
            return reason
        if feature == "pin":
            return ("a long-term pin of a kernel guest_memfd page needs a device (VFIO/IOMMU) or GUP_TEST; "
                    "the emulated pin is ufsgmem-only")
        if feature == "guest_access":
            return "the kernel target has no guest-side file (vCPU accesses need a memslot and a vCPU)"
        if feature == "hugetlb":
            return f"kernel {platform.release()}: mainline guest_memfd has no HugeTLB backing (unmerged work)"
        return _kernel_conversion(vm_type, header)
    if feature != "conversion":
        return None
    if mount is None:
        raise ValueError("asking a ufsgmem target about conversion needs mount=")
    with open_gmem(target, PAGE_SIZE, 0, mount=mount) as g:  # flags 0: all private at first
        err = _conversion_probe(g, initial=PRIVATE)
    if err is None:
        return None
    if err.errno == errno.ENOTTY and target == "ufsgmem-no-inplace":
        return ("KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd is ENOTTY: this target plays a kernel booted "
                "with kvm.gmem_in_place_conversion=0")
    return f"a no-op KVM_SET_MEMORY_ATTRIBUTES2 on a fresh file failed with {errname(err.errno)}: {err}"


def _kernel_conversion(vm_type: int, header: str) -> str | None:
    cap = header_constant(CAP_NAME, header)
    if cap is not None:
        with _kvm.Kvm() as kvm, kvm.create_vm(vm_type) as vm:
            mask = vm.check_extension(cap)
        if mask & PRIVATE:
            return None
        return (f"kernel {platform.release()}: KVM_CHECK_EXTENSION({CAP_NAME} = {cap}, from {header}) on a "
                f"type-{vm_type} VM is {mask:#x}, without KVM_MEMORY_ATTRIBUTE_PRIVATE: no in-place conversion")
    with KernelGmemFd(PAGE_SIZE, 0, vm_type=vm_type) as g:  # flags 0: every VM type accepts it; all private
        err = _conversion_probe(g, initial=PRIVATE)
    if err is None:
        return None
    where = f"{header} does not define {CAP_NAME}, so the ioctl itself was asked"
    if err.errno == errno.ENOTTY:
        return (f"kernel {platform.release()}: KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd is ENOTTY: no "
                f"in-place conversion in this kernel, or kvm.gmem_in_place_conversion=0 ({where})")
    if err.errno == errno.EINVAL:
        return (f"kernel {platform.release()}: a no-op KVM_SET_MEMORY_ATTRIBUTES2 on a type-{vm_type} VM's "
                f"guest_memfd is EINVAL: the ioctl exists but this VM type has no private memory; pass the "
                f"vm_type of a VM with private memory ({where})")
    return (f"kernel {platform.release()}: a no-op KVM_SET_MEMORY_ATTRIBUTES2 failed with "
            f"{errname(err.errno)} ({where})")


# --- SIGBUS -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChildOutcome:
    """How :func:`expect_sigbus`'s child ended. True (as a bool) exactly when it died of SIGBUS.

    ``value`` is what the function returned (None if it did not return; its ``repr`` if it could not be
    pickled), ``error`` the exception it raised, as text; ``signal`` the signal that killed the child,
    ``exit_code`` its exit status otherwise (0 returned, 1 raised).
    """

    sigbus: bool
    signal: int | None
    exit_code: int | None
    value: Any = None
    error: str | None = None

    def __bool__(self) -> bool:
        return self.sigbus

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by {signal.Signals(self.signal).name}"
        if self.error is not None:
            return f"raised {self.error}"
        return f"returned {self.value!r}" if self.exit_code == 0 else f"exited with status {self.exit_code}"


def _child(fn: Callable, args, kwargs, write_end: int) -> None:
    """In the forked child: run ``fn`` with default SIGBUS/SIGSEGV handling, report, and _exit."""
    code = 2
    try:
        faulthandler.disable()  # pytest's faulthandler would print a traceback first (the signal still kills)
        signal.signal(signal.SIGBUS, signal.SIG_DFL)
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGBUS, signal.SIGSEGV})
        try:
            payload, code = ("value", fn(*args, **kwargs)), 0
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload, code = ("error", f"{type(exc).__name__}: {exc}"), 1
        try:
            data = pickle.dumps(payload)
        except Exception:  # noqa: BLE001
            data = pickle.dumps((payload[0], repr(payload[1])))
        view = memoryview(data)
        while view:
            view = view[os.write(write_end, view):]
    finally:
        os._exit(code)


def expect_sigbus(fn: Callable, *args, timeout: float = 30.0, **kwargs) -> ChildOutcome:
    """Run ``fn(*args, **kwargs)`` in a forked child and report how it ended: SIGBUS, another signal, a
    return value or an exception (see :class:`ChildOutcome`, true exactly on SIGBUS).

    Use it for every access that may touch private memory or run past the end of the file: the child dies,
    the caller does not. Writes the child made through a ``MAP_SHARED`` mapping before dying stay visible.
    A child that has not finished after ``timeout`` seconds is killed (SIGKILL) and TimeoutError raised.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _child(fn, args, kwargs, write_end)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:  # EOF when the child has exited (it holds the only write end)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise TimeoutError(f"the child (pid {pid}) running {getattr(fn, '__name__', fn)!r} did not finish "
                                   f"within {timeout} s; killed")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
    _, status = os.waitpid(pid, 0)
    kind, value = pickle.loads(b"".join(chunks)) if chunks else (None, None)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return ChildOutcome(sig == signal.SIGBUS, sig, None)
    return ChildOutcome(False, None, os.WEXITSTATUS(status), value if kind == "value" else None,
                        value if kind == "error" else None)
