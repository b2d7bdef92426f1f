"""Backend ``hugetlb``: a memfd with MFD_HUGETLB, 2 MiB or 1 GiB pages, preallocated when it is created.

This is the layout HugeTLB guest_memfd aims for (docs/design.md §7.4.2): the file claims *all* its huge pages
from the pool at creation, so a VM can never fail later for lack of one, and every page is a physically
contiguous, naturally aligned folio.

Creation, in order:

1. the pool is checked up front (``free_hugepages - resv_hugepages`` of the page size): too few pages is
   ENOMEM with a message naming the shortfall and the knob to raise;
2. the shared mapping reserves the pages (the kernel's own hugetlb reservation; a race with another
   process taking pages in between is reported the same way);
3. the whole file is faulted in with MADV_POPULATE_WRITE, in chunks, calling ``progress(done, total)``
   after each, so a CLI can show progress for large files. If that fails midway, everything taken so far
   is given back (unmap and close) before ENOMEM is raised.

Afterwards ``backend_bytes()`` is exactly the file size however many conversions happen (conversions
never touch the backend; P6). ``punch_hole`` gives whole huge pages back to the pool (and the kernel drops
their reservation), ``allocate`` faults them in again, which can fail with ENOMEM if another process took
them meanwhile. ``close()`` returns every page to the pool.

Caveats: the core rejects INIT_SHARED and sizes or fallocate ranges that are not multiples of the huge
page, as HugeTLB guest_memfd does. Physical extents come from pagemap (one 4 KiB entry per subpage, so
the coalescing is the same code as for the other memfd backends).
"""

from __future__ import annotations

import errno
import time

from ufsgmem.address import format_size
from ufsgmem.errors import fail
from ufsgmem.runmap import RunMap
from ufsgmem.syscalls import madvise
from ufsgmem.uapi import MADV_POPULATE_WRITE, MFD_HUGETLB, MFD_HUGE_1GB, MFD_HUGE_2MB, SZ_1G, SZ_2M

from ._memfd import MemfdBackend

POOL = "/sys/kernel/mm/hugepages/hugepages-{kb}kB/{what}"
#: Preallocation works (and reports progress) in chunks of at least this many bytes.
CHUNK = 64 << 20
_MFD_SIZE = {SZ_2M: MFD_HUGE_2MB, SZ_1G: MFD_HUGE_1GB}


def pool_knob(page_size: int) -> str:
    """Where an administrator raises the pool of this page size."""
    if page_size == SZ_2M:
        return "/proc/sys/vm/nr_hugepages"
    return POOL.format(kb=page_size >> 10, what="nr_hugepages")


def pool_available(page_size: int) -> int | None:
    """Huge pages of ``page_size`` that a new file can still claim (free minus reserved); None if no pool."""
    try:
        values = []
        for what in ("free_hugepages", "resv_hugepages"):
            with open(POOL.format(kb=page_size >> 10, what=what)) as f:
                values.append(int(f.read()))
    except OSError:
        return None
    return max(0, values[0] - values[1])


def shortfall(page_size: int, size: int, why: str = "") -> OSError:
    """ENOMEM naming how many pages the pool has, how many the file needs and the knob to raise."""
    need, have = size // page_size, pool_available(page_size) or 0
    return fail(errno.ENOMEM, f"hugetlb pool has {have} free {format_size(page_size)} pages, the "
                              f"{format_size(size)} file needs {need}: short by {max(need - have, 0)}; "
                              f"raise {pool_knob(page_size)}{why}")


class HugetlbBackend(MemfdBackend):
    name = "hugetlb"
    page_sizes = (SZ_2M, SZ_1G)
    preallocates = True

    def __init__(self, size, page_size, *, progress=None, **options):
        if page_size not in _MFD_SIZE or size <= 0 or size % page_size:
            raise fail(errno.EINVAL, f"hugetlb needs a page size of 2M or 1G and a size that is a multiple "
                                     f"of it, not {format_size(size)} in {format_size(page_size)} pages")
        available = pool_available(page_size)
        if available is None:
            raise fail(errno.EINVAL, f"this kernel has no {format_size(page_size)} huge pages")
        if available < size // page_size:
            raise shortfall(page_size, size)
        self.memfd_flags = MFD_HUGETLB | _MFD_SIZE[page_size]
        # Which huge pages this file holds. The core's allocation map says the same once a GuestMemfd owns the
        # backend, but a backend stands alone (below the core; tests/test_backends.py uses it without one) and
        # hugetlbfs answers SEEK_DATA as if every page were data, so backend_bytes and extents need this.
        self._folios = RunMap(size // page_size, 0)
        super().__init__(size, page_size, progress=progress, **options)
        started = time.perf_counter()
        try:
            self._preallocate(progress)
        except BaseException:
            self.close()
            raise
        self.prealloc_seconds = time.perf_counter() - started

    def _mmap(self):
        try:
            return super()._mmap()
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise shortfall(self.page_size, self.size, " (the pool shrank while the file was created)") from exc

    def _preallocate(self, progress) -> None:
        chunk = max(CHUNK, self.page_size)
        for start in range(0, self.size, chunk):
            length = min(chunk, self.size - start)
            try:
                self._populate(start, length)
            except OSError as exc:
                raise shortfall(self.page_size, self.size,
                                f" (preallocation failed at {format_size(start)}: {exc.strerror})") from exc
            if progress is not None:
                progress(start + length, self.size)

    def _populate(self, offset: int, size: int) -> None:
        # GIL released: other requests keep being served while gigabytes are preallocated
        madvise(self._address + offset, size, MADV_POPULATE_WRITE)
        self._folios.set(offset // self.page_size, (offset + size) // self.page_size, 1)

    def allocate(self, offset, size):
        if self._folios.is_uniform(offset // self.page_size, (offset + size) // self.page_size, 1):
            return
        try:
            self._populate(offset, size)
        except OSError as exc:
            raise fail(errno.ENOMEM, f"no free {format_size(self.page_size)} huge page to refault "
                                     f"[{offset:#x}, {offset + size:#x}): {exc.strerror}; "
                                     f"raise {pool_knob(self.page_size)}") from exc

    def punch_hole(self, offset, size):
        super().punch_hole(offset, size)
        self._folios.set(offset // self.page_size, (offset + size) // self.page_size, 0)

    def _data_ranges(self):
        # hugetlbfs answers SEEK_DATA as if the whole file were data, so use our own folio map instead
        return [(s * self.page_size, e * self.page_size) for s, e, v in self._folios.runs() if v]

    def _fault_in_for_pagemap(self, start, end):
        return False  # every folio is faulted in through this mapping; none can be held but unmapped

    def info(self):
        return {**super().info(), "huge_page_size": self.page_size,
                "huge_pages_held": self.backend_bytes() // self.page_size,
                "pool_available": pool_available(self.page_size),
                "prealloc_seconds": round(getattr(self, "prealloc_seconds", 0.0), 6)}
