"""The real kernel guest_memfd, reached through ``/dev/kvm`` with plain ioctls (no C extension).

ufsgmem's differential conformance suite (:mod:`ufsgmem.conformance`) runs every behaviour case against
this and against a ufsgmem mount, so this module is the *reference implementation* the emulator is held
to. It does only what that needs:

* :class:`Kvm` opens ``/dev/kvm`` and checks the API version (12); :meth:`Kvm.create_vm` makes a VM of a
  given type (0, the default VM, is what this machine offers);
* :meth:`Vm.create_guest_memfd` issues ``KVM_CREATE_GUEST_MEMFD`` (0xC040AED4, the 64-byte
  ``struct kvm_create_guest_memfd``) and returns the new fd, which the caller owns and closes;
* :meth:`Vm.check_extension` answers ``KVM_CHECK_EXTENSION``; on this kernel (6.18) a default VM reports
  ``KVM_CAP_GUEST_MEMFD_FLAGS`` = 3 (MMAP|INIT_SHARED) and no memory-attribute support, so conversion
  itself cannot be compared with the kernel here;
* :func:`run_guest_access` runs a tiny real-mode vCPU whose memory is a given host mapping (optionally bound
  to a guest_memfd, as ``test_guest_memfd_guest`` does): it reads one byte, reports it through an I/O port,
  writes another byte and halts. That is enough to check host↔guest coherence from a real vCPU.

:func:`skip_reason` says why none of this can run (no ``/dev/kvm``, no permission, no guest_memfd), so
callers can skip with that reason instead of failing.

Caveats: x86-64 only (the vCPU code is real-mode x86); the guest's memory must sit below 1 MiB of guest
physical address space, which is plenty for the one-page checks it is used for.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import struct

from .uapi import (
    KVM_CAP_GUEST_MEMFD_FLAGS, KVM_CHECK_EXTENSION, KVM_CREATE_GUEST_MEMFD, KVM_CREATE_GUEST_MEMFD_STRUCT,
    KVM_CREATE_VM, KVM_GET_API_VERSION, PAGE_SIZE,
)

KVM_DEVICE = "/dev/kvm"
KVM_API_VERSION = 12
KVM_CAP_GUEST_MEMFD = 234  # kvm.h: a guest_memfd can be created at all

# --- vCPU ioctls and structures (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h) ---------
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81  # _IOR(KVMIO, 0x81, struct kvm_regs), 144 bytes
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83  # _IOR(KVMIO, 0x83, struct kvm_sregs), 312 bytes
KVM_SET_SREGS = 0x4138AE84
KVM_SET_USER_MEMORY_REGION = 0x4020AE46  # struct kvm_userspace_memory_region, 32 bytes
KVM_SET_USER_MEMORY_REGION2 = 0x40A0AE49  # struct kvm_userspace_memory_region2, 160 bytes
KVM_MEM_GUEST_MEMFD = 1 << 2

KVM_USERSPACE_MEMORY_REGION = struct.Struct("<IIQQQ")
KVM_USERSPACE_MEMORY_REGION2 = struct.Struct("<IIQQQQII14Q")
assert KVM_USERSPACE_MEMORY_REGION2.size == 160

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_NAMES = {2: "IO", 5: "HLT", 6: "MMIO", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 17: "INTERNAL_ERROR",
                  39: "MEMORY_FAULT"}
KVM_RUN_EXIT_REASON = struct.Struct("<I")  # at offset 8 of struct kvm_run
KVM_RUN_IO = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset; at offset 32
KVM_REGS_RIP, KVM_REGS_RFLAGS = 128, 136  # byte offsets in struct kvm_regs
KVM_SREGS_CS = 0  # struct kvm_segment cs is first: base u64, limit u32, selector u16, ...

GUEST_CODE_GPA = 0x0  # one page of guest code, backed by anonymous memory
GUEST_DATA_GPA = 0x10000  # where the mapping under test appears to the guest
GUEST_REPORT_PORT = 0x10

_libc = ctypes.CDLL(None, use_errno=True)


class GuestExit(OSError):
    """The vCPU stopped for a reason the tiny guest did not ask for (e.g. MMIO: no memory at that address)."""

    def __init__(self, reason: int):
        self.exit_reason = reason
        self.exit_name = KVM_EXIT_NAMES.get(reason, str(reason))
        super().__init__(errno.EIO, f"unexpected KVM exit {self.exit_name} ({reason})")


def _ioctl(fd: int, request: int, arg=0, what: str = "") -> int:
    try:
        if isinstance(arg, bytearray):
            return fcntl.ioctl(fd, request, arg, True)
        return fcntl.ioctl(fd, request, arg)
    except OSError as exc:
        raise OSError(exc.errno, f"{os.strerror(exc.errno)}: {what or hex(request)}") from None


class Kvm:
    """An open ``/dev/kvm``. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str = KVM_DEVICE):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            version = _ioctl(self.fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise OSError(errno.EINVAL, f"KVM API version {version}, expected {KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def create_vm(self, vm_type: int = 0) -> "Vm":
        return Vm(self, _ioctl(self.fd, KVM_CREATE_VM, vm_type, f"KVM_CREATE_VM(type={vm_type})"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Vm:
    """A VM fd. Every guest_memfd it creates holds a reference on it, so closing it early is safe."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._buffers: list[mmap.mmap] = []

    def keep(self, buffer: mmap.mmap) -> None:
        """Keep ``buffer`` mapped until :meth:`close` (memory a memslot points at)."""
        self._buffers.append(buffer)

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def supported_guest_memfd_flags(self) -> int:
        return self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)

    def create_guest_memfd(self, size: int, flags: int = 0, reserved: tuple[int, ...] = (0,) * 6) -> int:
        """KVM_CREATE_GUEST_MEMFD: the new fd (caller closes it). The kernel's errno on failure."""
        arg = bytearray(KVM_CREATE_GUEST_MEMFD_STRUCT.pack(size, flags, *reserved))
        return _ioctl(self.fd, KVM_CREATE_GUEST_MEMFD, arg,
                      f"KVM_CREATE_GUEST_MEMFD(size={size:#x}, flags={flags:#x})")

    def set_user_memory_region(self, slot: int, gpa: int, size: int, userspace_addr: int,
                               guest_memfd: int | None = None, guest_memfd_offset: int = 0) -> None:
        """Install a memslot; with ``guest_memfd`` it is bound to that file (KVM_MEM_GUEST_MEMFD)."""
        if guest_memfd is None:
            arg = bytearray(KVM_USERSPACE_MEMORY_REGION.pack(slot, 0, gpa, size, userspace_addr))
            _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, arg, "KVM_SET_USER_MEMORY_REGION")
            return
        arg = bytearray(KVM_USERSPACE_MEMORY_REGION2.pack(
            slot, KVM_MEM_GUEST_MEMFD, gpa, size, userspace_addr, guest_memfd_offset, guest_memfd, 0,
            *([0] * 14)))
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg, "KVM_SET_USER_MEMORY_REGION2")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        while self._buffers:
            self._buffers.pop().close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def skip_reason() -> str | None:
    """None when a guest_memfd can be created here; otherwise why not, for a test skip message."""
    if platform.machine() != "x86_64":
        return f"the KVM helpers here are x86-64 only (this is {platform.machine()})"
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} is absent (no KVM on this machine)"
    try:
        with Kvm() as kvm:
            if not kvm.check_extension(KVM_CAP_GUEST_MEMFD):
                return "this kernel has no KVM_CAP_GUEST_MEMFD"
            with kvm.create_vm(0) as vm:
                os.close(vm.create_guest_memfd(PAGE_SIZE, 0))
    except OSError as exc:
        return f"cannot create a guest_memfd through {KVM_DEVICE}: {exc}"
    return None


# --- a minimal vCPU ----------------------------------------------------------------------------------
def _real_mode_program(gpa: int, value: int) -> bytes:
    """Read the byte at ``gpa``, OUT it to the report port, store ``value`` there, HLT (16-bit code)."""
    segment, offset = gpa >> 4, gpa & 0xF
    return bytes([
        0xB8, segment & 0xFF, segment >> 8,  # mov ax, segment
        0x8E, 0xD8,  # mov ds, ax
        0xA0, offset, 0x00,  # mov al, [offset]
        0xE6, GUEST_REPORT_PORT,  # out port, al
        0xC6, 0x06, offset, 0x00, value,  # mov byte [offset], value
        0xF4,  # hlt
    ])


def run_guest_access(vm: Vm, mapping_address: int, mapping_size: int, offset: int, value: int,
                     guest_memfd: int | None = None) -> int:
    """One vCPU access to a host mapping: return the byte the guest read at ``offset``, after which it has
    written ``value`` there.

    The mapping becomes memslot 1 at guest physical 0x10000 (bound to ``guest_memfd`` if given, the way a
    VMM binds a gmem-only slot); guest code lives in its own anonymous page in memslot 0. Once per VM: the
    vCPU and both memslots stay with it. Raises :class:`GuestExit` when the vCPU stops for another reason
    (an MMIO exit: KVM could not get the page from the mapping), the kernel's OSError when KVM_RUN fails.
    """
    if GUEST_DATA_GPA + mapping_size > 1 << 20 or not 0 <= offset < mapping_size:
        raise ValueError("the real-mode guest reaches 1 MiB: map at most 960 KiB and access inside it")
    code = mmap.mmap(-1, PAGE_SIZE)
    vcpu = run = None
    try:
        code.write(_real_mode_program(GUEST_DATA_GPA + offset, value))
        code_address = ctypes.addressof(ctypes.c_char.from_buffer(code))
        vm.set_user_memory_region(0, GUEST_CODE_GPA, PAGE_SIZE, code_address)
        vm.set_user_memory_region(1, GUEST_DATA_GPA, mapping_size, mapping_address, guest_memfd)
        vcpu = _ioctl(vm.fd, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU")
        run = mmap.mmap(vcpu, _ioctl(vm.kvm.fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE"))
        _enter_real_mode_at(vcpu, GUEST_CODE_GPA)
        read = None
        while True:
            _ioctl(vcpu, KVM_RUN, 0, "KVM_RUN")
            (reason,) = KVM_RUN_EXIT_REASON.unpack_from(run, 8)
            if reason == KVM_EXIT_HLT:
                break
            if reason != KVM_EXIT_IO:
                raise GuestExit(reason)
            _direction, _size, port, _count, data_offset = KVM_RUN_IO.unpack_from(run, 32)
            if port == GUEST_REPORT_PORT:
                read = run[data_offset]
        if read is None:
            raise OSError(errno.EIO, "the guest halted without reporting")
        return read
    finally:
        if run is not None:
            run.close()
        if vcpu is not None:
            os.close(vcpu)
        vm.keep(code)  # memslot 0 points at it: unmap only when the VM is closed


def _enter_real_mode_at(vcpu: int, gpa: int) -> None:
    sregs = bytearray(312)
    _ioctl(vcpu, KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    struct.pack_into("<QIH", sregs, KVM_SREGS_CS, 0, 0xFFFF, 0)  # cs: base 0, limit 64 KiB, selector 0
    _ioctl(vcpu, KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
    regs = bytearray(144)
    _ioctl(vcpu, KVM_GET_REGS, regs, "KVM_GET_REGS")
    struct.pack_into("<Q", regs, KVM_REGS_RIP, gpa)
    struct.pack_into("<Q", regs, KVM_REGS_RFLAGS, 0x2)
    _ioctl(vcpu, KVM_SET_REGS, regs, "KVM_SET_REGS")
