"""Constants and struct layouts mirrored from the kernel's guest_memfd uAPI.

Names are the kernel's (``include/uapi/linux/kvm.h`` and the in-place conversion series v8), so code and
docs can be read side by side with the kernel. Nothing here has behaviour; the rules that use these values
live in :mod:`ufsgmem.gmem`.

Caveat: ``GUEST_MEMFD_FLAG_HUGETLB`` and the ``page_order`` field belong to unmerged HugeTLB work whose exact
uAPI was not verified (design §7.4.2 in docs/design.md). ufsgmem treats the huge page size as an emulator
choice and keeps it out of the kernel's flag space (see ``UFSGMEM_FLAG_HUGETLB``).
"""

from __future__ import annotations

import struct

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- KVM_CREATE_GUEST_MEMFD flags (mainline 6.18) ---------------------------------------------------
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
#: What KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_FLAGS) reports on /dev/kvm; every other bit is EINVAL.
GUEST_MEMFD_SUPPORTED_FLAGS = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED

# The emulator's HugeTLB choice travels beside the flags (a backend and a page size), never inside them,
# so a flag word valid for ufsgmem is valid for the kernel and vice versa.

# --- memory attributes ------------------------------------------------------------------------------
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_MEMORY_ATTRIBUTES_SUPPORTED = KVM_MEMORY_ATTRIBUTE_PRIVATE

# --- capabilities -----------------------------------------------------------------------------------
KVM_CAP_GUEST_MEMFD_FLAGS = 244
KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250  # v8

# --- ioctl numbers ----------------------------------------------------------------------------------
KVMIO = 0xAE
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
#: _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd), a VM ioctl.
KVM_CREATE_GUEST_MEMFD = 0xC040AED4
#: _IOWR(KVMIO, 0xd2, struct kvm_memory_attributes2), issued on the guest_memfd (v8).
KVM_SET_MEMORY_ATTRIBUTES2 = 0xC080AED2
#: _IOW(KVMIO, 0xd2, struct kvm_memory_attributes), the 6.8 VM ioctl (for recognition only).
KVM_SET_MEMORY_ATTRIBUTES = 0x4020AED2

# --- fallocate modes (include/uapi/linux/falloc.h) --------------------------------------------------
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20
FALLOC_FL_UNSHARE_RANGE = 0x40
FALLOC_FL_WRITE_ZEROES = 0x80  # 6.17

# --- memfd_create flags -----------------------------------------------------------------------------
MFD_CLOEXEC = 0x0001
MFD_ALLOW_SEALING = 0x0002
MFD_HUGETLB = 0x0004
MFD_HUGE_SHIFT = 26
MFD_HUGE_2MB = 21 << MFD_HUGE_SHIFT
MFD_HUGE_1GB = 30 << MFD_HUGE_SHIFT

# --- madvise ----------------------------------------------------------------------------------------
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

SZ_4K = 4 << 10
SZ_2M = 2 << 20
SZ_1G = 1 << 30

# --- struct kvm_create_guest_memfd (64 bytes): size u64, flags u64, reserved[6] u64 ----------------
KVM_CREATE_GUEST_MEMFD_STRUCT = struct.Struct("<QQ6Q")
assert KVM_CREATE_GUEST_MEMFD_STRUCT.size == 64

# --- struct kvm_memory_attributes2 (128 bytes, v8) --------------------------------------------------
# offset u64, size u64, attributes u64, flags u64, error_offset u64, reserved[11] u64
KVM_MEMORY_ATTRIBUTES2_STRUCT = struct.Struct("<QQQQQ11Q")
assert KVM_MEMORY_ATTRIBUTES2_STRUCT.size == 128
