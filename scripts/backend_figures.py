"""Backend figures quoted in docs/backends.md: hugetlb preallocation, pagemap extents, sim at 1 TiB.

Run as root from the repository: ``.venv/bin/python scripts/backend_figures.py``. It reserves the huge
pages it needs and gives exactly those back (the same decrement rule as the test fixture). The first
preallocation on a fresh VM also pays the host's first touch of that memory, so each figure is printed
for a first and a repeated run.
"""

from __future__ import annotations

import contextlib
import time

from ufsgmem import hugepages
from ufsgmem.gmem import GuestMemfd
from ufsgmem.plugins import load_backend
from ufsgmem.uapi import SZ_1G, SZ_2M, SZ_4K

@contextlib.contextmanager
def reserved(size: int, count: int):
    with hugepages.reserved(size, count) as got:
        if got < count:
            raise SystemExit(f"only {got} of {count} {size >> 20}M pages could be reserved")
        yield


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def hugetlb(page_size: int, count: int) -> None:
    with reserved(page_size, count):
        for attempt in ("first", "repeat"):
            seconds, b = timed(lambda: load_backend("hugetlb")(page_size * count, page_size))
            ext_s, extents = timed(b.physical_extents)
            print(f"hugetlb {count} x {page_size >> 20}M ({attempt}): preallocate {seconds * 1e3:.1f} ms, "
                  f"extents {ext_s * 1e3:.1f} ms ({len(extents)} extents)")
            b.close()


def memfd(name: str) -> None:
    b = load_backend(name)(SZ_1G, SZ_4K)
    b.allocate(0, SZ_1G)
    seconds, extents = timed(b.physical_extents)
    print(f"{name} 1G: physical_extents {seconds * 1e3:.1f} ms ({len(extents)} extents), info {b.info()}")
    b.close()


def sim() -> None:
    for fragmentation in (0.0, 0.1, 0.5, 1.0):
        seconds, g = timed(lambda: GuestMemfd(1 << 40, 1, backend="sim", page_size=SZ_2M,
                                              backend_options={"fragmentation": fragmentation, "seed": 1}))
        ext_s, extents = timed(g.backend.physical_extents)
        conv_s, _ = timed(lambda: g.set_memory_attributes(123 * SZ_1G, SZ_4K, 0))
        print(f"sim 1T 2M pages fragmentation {fragmentation}: create {seconds * 1e3:.0f} ms, extents "
              f"{ext_s * 1e3:.0f} ms ({len(extents)} extents), 4K conversion {conv_s * 1e6:.0f} us, "
              f"backend metadata {g.backend.metadata_bytes() / 2**20:.1f} MiB")
        g.close()


if __name__ == "__main__":
    hugetlb(SZ_2M, 512)
    hugetlb(SZ_1G, 1)
    memfd("anon")
    memfd("thp")
    sim()
