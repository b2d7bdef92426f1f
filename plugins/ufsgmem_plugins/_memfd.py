"""Shared machinery of the memfd-backed backends: a memfd mapped MAP_SHARED, punch-hole, pagemap PFNs.

The server process keeps one shared mapping of the whole memfd. Reads hand out zero-copy memoryview slices
of it; writes copy into it. ``fallocate(2)`` with a mode is not in the standard library
(``os.posix_fallocate`` takes none), so it goes through libc via ctypes.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

from ufsgmem.backend import Backend, PhysExtent
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MADV_POPULATE_WRITE, PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset:#x}, {length:#x}): {os.strerror(err)}")


PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1


def pagemap_extents(address: int, size: int, base_offset: int = 0) -> list[PhysExtent] | None:
    """Coalesced physical extents of the present pages of ``[address, address + size)`` in this process.

    None when pagemap gives no PFNs (not root: the kernel then reports PFN 0).
    """
    count = size // PAGE_SIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((address // PAGE_SIZE) * 8)
            raw = f.read(count * 8)
    except OSError:
        return None
    entries = np.frombuffer(raw, dtype=np.uint64)
    present = (entries & np.uint64(PM_PRESENT)) != 0
    if not present.any():
        return []
    pfns = (entries & np.uint64(PM_PFN_MASK)).astype(np.int64)
    if not pfns[present].any():
        return None
    idx = np.nonzero(present)[0]
    # a new extent starts where the page index or the PFN does not follow on from the previous page
    breaks = np.ones(len(idx), dtype=bool)
    breaks[1:] = (np.diff(idx) != 1) | (np.diff(pfns[idx]) != 1)
    starts = np.nonzero(breaks)[0]
    ends = np.append(starts[1:], len(idx))
    return [PhysExtent(base_offset + int(idx[s]) * PAGE_SIZE, int(pfns[idx[s]]) * PAGE_SIZE,
                       int(e - s) * PAGE_SIZE) for s, e in zip(starts, ends)]


class MemfdBackend(Backend):
    """A memfd of the file's size, mapped once. Subclasses choose the memfd flags and advice."""

    memfd_flags = 0

    def __init__(self, size, page_size, *, progress=None, **options):
        super().__init__(size, page_size, progress=progress, **options)
        self._fd = os.memfd_create(f"ufsgmem-{self.name}", os.MFD_CLOEXEC | self.memfd_flags)
        try:
            os.ftruncate(self._fd, size)
            self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._closed = False

    def view(self, offset, size):
        return self._view[offset:offset + size]

    def write(self, offset, data):
        data = memoryview(data).cast("B")
        self._view[offset:offset + len(data)] = data

    def allocate(self, offset, size):
        # Fault the pages into our mapping so pagemap can see them (fallocate alone would not map them).
        self._map.madvise(MADV_POPULATE_WRITE, offset, size)

    def punch_hole(self, offset, size):
        fallocate(self._fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, size)

    def physical_extents(self):
        extents = pagemap_extents(self._address, self.size)
        if extents is None:  # no PFNs: report our own contiguity (one virtual extent per present run)
            return []
        return extents

    def backend_bytes(self):
        return os.fstat(self._fd).st_blocks * 512

    def fileno(self):
        return self._fd

    def close(self):
        if self._closed:
            return
        self._closed = True
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it is dropped
        os.close(self._fd)
