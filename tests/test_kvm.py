"""The kernel reference itself: /dev/kvm guest_memfd creation, the flags cap, and the tiny vCPU."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import pytest

from ufsgmem import kvm
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(kvm.skip_reason() is not None,
                                                   reason=str(kvm.skip_reason()))]


@pytest.fixture
def vm():
    with kvm.Kvm() as k, k.create_vm(0) as v:
        yield v


def test_default_vm_offers_mmap_and_init_shared(vm):
    # design §3 (docs/design.md): a default VM on this kernel supports exactly MMAP|INIT_SHARED
    assert vm.supported_guest_memfd_flags() == GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED


def test_create_returns_an_fd_of_the_size(vm):
    fd = vm.create_guest_memfd(4 * PAGE_SIZE, GUEST_MEMFD_FLAG_MMAP)
    try:
        assert os.fstat(fd).st_size == 4 * PAGE_SIZE
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[kvm-gmem]"
    finally:
        os.close(fd)


def test_create_errors_are_the_kernels(vm):
    with pytest.raises(OSError) as info:
        vm.create_guest_memfd(PAGE_SIZE - 1, 0)
    assert info.value.errno == errno.EINVAL
    assert "KVM_CREATE_GUEST_MEMFD" in str(info.value)


def test_guest_sees_host_writes_and_host_sees_guest_writes(vm):
    size = 4 * PAGE_SIZE
    fd = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        m[PAGE_SIZE:2 * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        assert kvm.run_guest_access(vm, address, size, PAGE_SIZE + 7, 0xFF, guest_memfd=fd) == 0xAA
        assert m[PAGE_SIZE + 7] == 0xFF and m[PAGE_SIZE + 6] == 0xAA
    finally:
        del address
        vm.close()  # the memslot points at the mapping: close the VM before unmapping
        m.close()
        os.close(fd)


def test_guest_reaches_a_plain_mapping(vm):
    m = mmap.mmap(-1, 2 * PAGE_SIZE)
    m[:] = b"\x55" * (2 * PAGE_SIZE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(m))
    try:
        assert kvm.run_guest_access(vm, address, 2 * PAGE_SIZE, 5, 0x11) == 0x55
        assert m[5] == 0x11
    finally:
        del address
        vm.close()
        m.close()
