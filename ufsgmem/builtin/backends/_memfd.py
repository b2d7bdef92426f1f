"""Shared machinery of the memfd-backed backends: a memfd mapped MAP_SHARED, punch-hole, pagemap PFNs.

The server process keeps one shared mapping of the whole memfd. Reads hand out zero-copy memoryview slices
of it; writes copy into it; ``allocate`` faults pages into it with MADV_POPULATE_WRITE, so every allocated
page is normally present in this mapping and ``/proc/self/pagemap`` can name its physical frame.

Physical extents. pagemap only sees pages *mapped* in this process. A page can be allocated in the file
and yet not mapped here (another process wrote it through ``fileno()``, or the kernel zapped the PTE), so
before reading pagemap the file's data ranges (``SEEK_DATA``/``SEEK_HOLE``) that are not present are
populated with MADV_POPULATE_READ, which maps existing pages and allocates nothing. pagemap is read in
one go and coalesced with numpy: a 1 GiB file is 262 144 entries, a 2 MiB read.

Without PFNs (no CAP_SYS_ADMIN: the kernel reports PFN 0) a backend falls back to its own contiguity: one extent
per folio, with the *virtual* address as a stand-in, so folio-internal contiguity is right and nothing
is claimed across folios. ``info()["phys_source"]`` says which one is in use.

Caveats: ``close()`` cannot unmap while a caller still holds a view (Python
refuses to); it then drops its own references and the mapping goes when the last view does.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys

import numpy as np

from ufsgmem.backend import Backend, PhysExtent
from ufsgmem.errors import fail
from ufsgmem.syscalls import fallocate, madvise
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, MADV_POPULATE_READ, MADV_POPULATE_WRITE, \
    PAGE_SHIFT, PAGE_SIZE


PM_PRESENT = 1 << 63
PM_PFN_MASK = (1 << 55) - 1




def read_pagemap(address: int, size: int) -> np.ndarray | None:
    """The raw pagemap entries (uint64) of ``[address, address + size)``; None if pagemap is unreadable."""
    try:
        with open("/proc/self/pagemap", "rb", buffering=0) as f:
            f.seek((address >> PAGE_SHIFT) * 8)
            raw = f.read((size >> PAGE_SHIFT) * 8)
    except OSError:
        return None
    return np.frombuffer(raw, dtype=np.uint64)


def coalesce(index: np.ndarray, frame: np.ndarray, base_offset: int = 0, unit: int = PAGE_SIZE) -> list[PhysExtent]:
    """Extents from sorted page indices and their frames: a new extent wherever either does not follow on."""
    if len(index) == 0:
        return []
    breaks = np.ones(len(index), dtype=bool)
    breaks[1:] = (np.diff(index) != 1) | (np.diff(frame) != 1)
    starts = np.nonzero(breaks)[0]
    ends = np.append(starts[1:], len(index))
    return [PhysExtent(base_offset + int(index[s]) * unit, int(frame[s]) * unit, int(e - s) * unit)
            for s, e in zip(starts.tolist(), ends.tolist())]


def pagemap_extents(address: int, size: int, base_offset: int = 0) -> list[PhysExtent] | None:
    """Coalesced physical extents of the present pages of ``[address, address + size)`` in this process.

    None when pagemap gives no PFNs (not root: the kernel then reports PFN 0 for every page).
    """
    entries = read_pagemap(address, size)
    if entries is None:
        return None
    present = np.nonzero(entries & np.uint64(PM_PRESENT))[0]
    if len(present) == 0:
        return []
    pfns = (entries[present] & np.uint64(PM_PFN_MASK)).astype(np.int64)
    if not pfns.any():
        return None
    return coalesce(present, pfns, base_offset)


_pfns_visible: bool | None = None


def pfns_visible() -> bool | None:
    """Whether this process sees real PFNs in pagemap (a property of the process: CAP_SYS_ADMIN).

    Probed once on a page of our own; None if pagemap cannot be read at all.
    """
    global _pfns_visible
    if _pfns_visible is None:
        probe = mmap.mmap(-1, PAGE_SIZE)
        probe[0] = 1
        anchor = ctypes.c_char.from_buffer(probe)
        entries = read_pagemap(ctypes.addressof(anchor), PAGE_SIZE)
        del anchor  # the buffer export must go before the mapping can close
        probe.close()
        if entries is None:
            return None
        _pfns_visible = bool(entries[0] & np.uint64(PM_PFN_MASK))
    return _pfns_visible


class MemfdBackend(Backend):
    """A memfd of the file's size, mapped once. Subclasses choose the memfd flags and the advice."""

    memfd_flags = 0

    def __init__(self, size, page_size, *, progress=None, **options):
        super().__init__(size, page_size, progress=progress, **options)
        if options:
            raise fail(errno.EINVAL, f"backend {self.name!r} takes no options, got {', '.join(sorted(options))}")
        self._closed = True  # until everything below exists, so close() from an error path is harmless
        self._fd = os.memfd_create(f"ufsgmem-{self.name}", os.MFD_CLOEXEC | self.memfd_flags)
        try:
            os.ftruncate(self._fd, size)
            self._map = self._mmap()
        except BaseException:
            os.close(self._fd)
            raise
        self._view = memoryview(self._map)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._closed = False

    def _mmap(self) -> mmap.mmap:
        # Python's mmap keeps a dup of the descriptor (a second server descriptor per file) unless told
        # not to, which Python 3.13 allows.
        untracked = {"trackfd": False} if sys.version_info >= (3, 13) else {}
        return mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, **untracked)

    def view(self, offset, size):
        return self._view[offset:offset + size]

    def write(self, offset, data):
        data = memoryview(data).cast("B")
        self._view[offset:offset + len(data)] = data

    def allocate(self, offset, size):
        # Fault the pages into our mapping so pagemap can see them (fallocate alone would not map them),
        # with the GIL released: the allocation may wait in reclaim for write-backs other threads serve.
        madvise(self._address + offset, size, MADV_POPULATE_WRITE)

    def punch_hole(self, offset, size):
        fallocate(self._fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, size)

    # --- physical extents ---------------------------------------------------------------------------
    def _data_ranges(self) -> list[tuple[int, int]]:
        """Byte ranges ``[start, end)`` the file holds pages for (SEEK_DATA/SEEK_HOLE, as shmem answers)."""
        ranges, pos = [], 0
        while pos < self.size:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(self._fd, start, os.SEEK_HOLE), self.size)
            ranges.append((start, end))
            pos = end
        return ranges

    def _fault_in_for_pagemap(self, start: int, end: int) -> bool:
        """Fault ``[start, end)``, which the file holds, into our mapping so pagemap can name its frames;
        True if anything was done."""
        madvise(self._address + start, end - start, MADV_POPULATE_READ)
        return True

    def physical_extents(self):
        """Coalesced extents of the pages the file holds. The cost follows the allocated ranges
        (SEEK_DATA/SEEK_HOLE, or the backend's own map), never the file size: a 1 TiB file with nothing
        allocated reads no pagemap at all."""
        indices, frames = [], []
        for start, end in self._data_ranges():
            entries = read_pagemap(self._address + start, end - start)
            if entries is None:
                return self._virtual_extents(None)
            if not (entries & np.uint64(PM_PRESENT)).all() and self._fault_in_for_pagemap(start, end):
                entries = read_pagemap(self._address + start, end - start)
            present = np.nonzero(entries & np.uint64(PM_PRESENT))[0]
            indices.append(present + (start >> PAGE_SHIFT))
            frames.append((entries[present] & np.uint64(PM_PFN_MASK)).astype(np.int64))
        index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        pfns = np.concatenate(frames) if frames else np.zeros(0, dtype=np.int64)
        if len(index) and not pfns.any():
            return self._virtual_extents(index)
        return coalesce(index, pfns)

    def _virtual_extents(self, present: np.ndarray | None) -> list[PhysExtent]:
        """Our own contiguity when PFNs are hidden: one extent per present folio, virtual address as phys."""
        if present is None:
            present = np.concatenate([np.arange(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in self._data_ranges()]
                                     or [np.zeros(0, dtype=np.int64)])
        step = self.page_size >> PAGE_SHIFT
        folios = np.unique(present // step)
        return [PhysExtent(int(f) * self.page_size, self._address + int(f) * self.page_size, self.page_size)
                for f in folios]

    def phys_source(self) -> str:
        visible = pfns_visible()
        if visible is None:
            return "virtual (pagemap unreadable)"
        return "pagemap" if visible else "virtual (pagemap hides PFNs without CAP_SYS_ADMIN)"

    # --- accounting and lifetime --------------------------------------------------------------------
    def backend_bytes(self):
        return os.fstat(self._fd).st_blocks * 512

    def fileno(self):
        return self._fd

    def memory_fd(self):
        return None if self._closed else self._fd

    def fallocate_mapping(self):
        # Only while allocate and punch_hole are these very ones: a subclass that keeps books of its own
        # around them (hugetlb's folio map) must see every fallocate.
        cls = type(self)
        if self._closed or cls.allocate is not MemfdBackend.allocate or cls.punch_hole is not MemfdBackend.punch_hole:
            return None
        return self._address

    def info(self):
        return {"phys_source": self.phys_source()}

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self._view.release()
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view: the mapping is unmapped when the last one is dropped
        self._view = self._map = None
        os.close(self._fd)
