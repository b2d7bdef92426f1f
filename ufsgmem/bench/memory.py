"""First-touch throughput of a mapping: what a VMM pays when guest RAM is touched the first time.

Each target is a *mapping factory*: a context manager yielding a writable ``mmap`` of ``size`` bytes that
nobody has touched yet. The measurement writes (or reads) one byte in every 4 KiB page with one strided
numpy store, so the time is page-fault cost, not copying: this is exactly the kernel's "first touch of
each 4K page" baseline in design §3 (docs/design.md).

Targets: shmem memfd, anonymous shared memory, the kernel's guest_memfd (MMAP|INIT_SHARED via /dev/kvm),
and a ufsgmem ``mem`` file on a mount (each backend).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time

import numpy as np

from ..uapi import PAGE_SIZE
from .stats import timed


@contextlib.contextmanager
def shmem_mapping(size: int):
    fd = os.memfd_create("ufsgmem-bench-shmem", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with _mapped(fd, size) as m:
            yield m
    finally:
        os.close(fd)


@contextlib.contextmanager
def anon_mapping(size: int):
    m = mmap.mmap(-1, size, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        yield m
    finally:
        m.close()


@contextlib.contextmanager
def kernel_gmem_mapping(size: int):
    with kernel_gmem_file(size) as kernel:
        yield kernel.mapping


@contextlib.contextmanager
def path_mapping(path: str, size: int):
    fd = os.open(path, os.O_RDWR)
    try:
        with _mapped(fd, size) as m:
            yield m
    finally:
        os.close(fd)


@contextlib.contextmanager
def _mapped(fd: int, size: int):
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    try:
        yield m
    finally:
        m.close()


def first_touch(mapping: mmap.mmap, write: bool) -> float:
    """Seconds to touch every page of a fresh mapping once (write one byte, or read one).

    The numpy view is local, so it is gone (and the mapping closable) when this returns.
    """
    pages = np.frombuffer(mapping, dtype=np.uint8)[::PAGE_SIZE]
    start = time.perf_counter()
    if write:
        pages.fill(1)
    else:
        int(pages.sum())
    return time.perf_counter() - start


class _KernelFile:
    """A kernel guest_memfd (MMAP|INIT_SHARED) kept mapped, for the discard-model reference of P2/P3."""

    def __init__(self, fd: int, mapping: mmap.mmap):
        self.fd, self.mapping = fd, mapping
        self.pages = np.frombuffer(mapping, dtype=np.uint8)

    def punch_and_refault(self, offset: int, length: int) -> float:
        """The pre-v8 way to convert and back: discard the range, then fault it in again."""
        from ..uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
        from ..syscalls import fallocate

        self.pages[offset:offset + length:PAGE_SIZE] = 1  # dirty, like the ufsgmem side
        view = self.pages[offset:offset + length:PAGE_SIZE]

        def discard_and_refault():
            fallocate(self.fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)
            view.fill(2)

        return timed(discard_and_refault)


@contextlib.contextmanager
def kernel_gmem_file(size: int):
    from ..kvm import Kvm
    from ..uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

    with Kvm() as kvm, kvm.create_vm() as vm:
        fd = vm.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
        try:
            with _mapped(fd, size) as m:
                kf = _KernelFile(fd, m)
                try:
                    yield kf
                finally:
                    del kf.pages
        finally:
            os.close(fd)


def resident_bytes(mapping: mmap.mmap) -> int:
    """Bytes of ``mapping`` resident in memory (mincore), i.e. held by the page cache behind it."""
    from ..syscalls import mincore

    return int(mincore(mapping).sum()) * PAGE_SIZE
