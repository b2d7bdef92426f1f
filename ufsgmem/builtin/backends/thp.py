"""Backend ``thp``: a memfd (shmem) whose mapping asks for transparent huge pages with MADV_HUGEPAGE.

The guest_memfd semantics stay at 4 KiB (``page_sizes = (4K,)``: fallocate and conversions work on any
4 KiB page, as upstream guest_memfd does); only the *backing* may be 2 MiB folios, which is what makes
the physical layout coalesce into 2 MiB blocks.

THP is best effort, and the backend says what it really got rather than what it asked for:

* the global switch ``shmem_enabled`` must allow it; this backend turns ``never`` into ``advise`` while
  it is open and restores it afterwards (see :mod:`._thp_knob` for the exact policy), and says in
  ``info()`` where it could not;
* even then the kernel falls back to 4 KiB folios when it finds no free 2 MiB block (fragmentation), when
  the mapping is not 2 MiB aligned, or for the unaligned tail of the file;
* punching 4 KiB out of a huge folio splits it; the rest stays mapped with 4 KiB entries.

``info()`` reads the mapping's own ``/proc/self/smaps`` entry: ``ShmemPmdMapped`` is memory mapped by
2 MiB entries, i.e. huge pages that were really obtained.
"""

from __future__ import annotations

import mmap

from ufsgmem.uapi import SZ_2M, SZ_4K

from . import _thp_knob
from ._memfd import MemfdBackend


def smaps_fields(address: int) -> dict[str, int]:
    """The ``/proc/self/smaps`` fields (in bytes) of the mapping that starts at ``address``."""
    prefix = f"{address:x}-"
    fields: dict[str, int] = {}
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):  # a mapping header line: "start-end perms ..."
                if inside:
                    break
                inside = head.startswith(prefix)
            elif inside:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[head[:-1]] = int(parts[1]) << 10
    return fields


class ThpBackend(MemfdBackend):
    name = "thp"
    page_sizes = (SZ_4K,)
    memory_hugepage = True  # a mapping of memory_fd() asks for huge pages too (fastpath.py)

    def __init__(self, size, page_size, *, progress=None, **options):
        self._knob_note = _thp_knob.acquire()  # before mmap: shmem aligns the mapping only if THP is on
        try:
            super().__init__(size, page_size, progress=progress, **options)
            self._map.madvise(mmap.MADV_HUGEPAGE)
        except BaseException:
            _thp_knob.release()
            raise

    def info(self):
        fields = smaps_fields(self._address) if not self._closed else {}
        pmd = fields.get("ShmemPmdMapped", 0) + fields.get("FilePmdMapped", 0)
        return {
            **super().info(),
            "huge_pages_obtained": pmd > 0,
            "huge_bytes": pmd,
            "resident_bytes": fields.get("Rss", 0),
            "mapping_2m_aligned": self._address % SZ_2M == 0,
            "shmem_enabled": _thp_knob.current(),
            "shmem_enabled_2048kB": _thp_knob.current(_thp_knob.PMD_KNOB),
            "note": self._knob_note,
        }

    def close(self):
        if not self._closed:
            super().close()
            _thp_knob.release()
