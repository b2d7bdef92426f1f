"""The ``sim`` backend at 64 TiB: a file costs its allocated extents, not its size.

``sim`` exists to study layouts of files far bigger than memory, so its per-file state must follow what
is allocated. It used to keep a per-chunk array (``np.full``, 8 bytes a 2 MiB chunk) and a used-chunk
bitmap: creating a 64 TiB file cost ~320 MiB and about a second before a page was allocated. The cost is
pinned here without timing: Python's heap growth as tracemalloc sees it (numpy reports its buffers to
it) must stay under 1 MiB, and every answer must still be exact. A seeded fragmented layout is pinned
too, as the code before the change produced it: a seed must keep giving the layout it always gave.
"""

from __future__ import annotations

import errno
import tracemalloc

import pytest

from ufsgmem.plugins import load_backend
from ufsgmem.uapi import PAGE_SIZE, SZ_1G, SZ_2M, SZ_4K

MIB, TIB = 1 << 20, 1 << 40
BASE = 1 << 32  # the default phys_base
HEAP_BUDGET = 1 << 20


def sim(size, page_size=SZ_4K, **options):
    return load_backend("sim")(size, page_size, **options)


class HeapGrowth:
    """Peak bytes Python allocated inside the ``with`` block, above what it held when it began."""

    def __enter__(self):
        sim(64 * MIB).physical_extents()  # the first use's imports and caches are not the file's cost
        tracemalloc.start()
        self.base = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc):
        self.peak = tracemalloc.get_traced_memory()[1] - self.base
        tracemalloc.stop()


def extents(b):
    return [tuple(e) for e in b.physical_extents()]


def test_a_64_tib_file_with_scattered_allocations_costs_its_extents():
    with HeapGrowth() as heap:
        b = sim(64 * TIB)
        b.allocate(0, 3 * PAGE_SIZE)                      # the first chunk, partly
        b.allocate(7 * TIB - PAGE_SIZE, 2 * SZ_2M)         # across a chunk edge, unaligned to it
        b.allocate(40 * TIB, SZ_1G)                        # 512 chunks in one run
        b.allocate(64 * TIB - SZ_2M, SZ_2M)                # the last chunk
        b.punch_hole(40 * TIB + SZ_2M, SZ_2M)              # one whole chunk out of the run
        b.punch_hole(PAGE_SIZE, PAGE_SIZE)                 # a page out of a chunk that stays
        got = extents(b), b.backend_bytes(), b.info()
    assert heap.peak < HEAP_BUDGET, f"{heap.peak} bytes of heap for a 64 TiB file"
    assert got[0] == [
        (0, BASE, PAGE_SIZE),
        (2 * PAGE_SIZE, BASE + 2 * PAGE_SIZE, PAGE_SIZE),
        (7 * TIB - PAGE_SIZE, BASE + 7 * TIB - PAGE_SIZE, 2 * SZ_2M),
        (40 * TIB, BASE + 40 * TIB, SZ_2M),
        (40 * TIB + 2 * SZ_2M, BASE + 40 * TIB + 2 * SZ_2M, SZ_1G - 2 * SZ_2M),
        (64 * TIB - SZ_2M, BASE + 64 * TIB - SZ_2M, SZ_2M),
    ]
    assert got[1] == 2 * PAGE_SIZE + 2 * SZ_2M + SZ_1G - SZ_2M + SZ_2M
    assert got[2]["chunks_used"] == 1 + 3 + 511 + 1, "a partly allocated chunk holds a whole one"
    assert got[2]["phys_size"] == 128 * TIB and got[2]["metadata_bytes"] < 4096


def test_a_64_tib_file_of_2m_folios_preallocates_as_one_run():
    with HeapGrowth() as heap:
        b = sim(64 * TIB, SZ_2M)
        b.punch_hole(33 * TIB, SZ_2M)
        got = extents(b), b.backend_bytes(), b.info()["chunks_used"]
    assert heap.peak < HEAP_BUDGET, f"{heap.peak} bytes of heap to preallocate a 64 TiB file"
    assert got == ([(0, BASE, 33 * TIB), (33 * TIB + SZ_2M, BASE + 33 * TIB + SZ_2M, 31 * TIB - SZ_2M)],
                   64 * TIB - SZ_2M, 64 * TIB // SZ_2M - 1)


def test_blocks_cost_the_block_order_not_the_chunks():
    """With max_contiguity the shuffled block order (4 bytes a block) is the only cost beyond the runs,
    and a 64 TiB run is cut at shuffled block edges only: per block, not per chunk."""
    block = 64 << 30
    with HeapGrowth() as heap:
        b = sim(64 * TIB, SZ_2M, max_contiguity=block, seed=3)
        found = extents(b)
    assert heap.peak < HEAP_BUDGET, f"{heap.peak} bytes of heap for {64 * TIB // block} blocks"
    assert sum(e[2] for e in found) == 64 * TIB == b.backend_bytes()
    assert all(e[2] % block == 0 and (e[1] - BASE) % block == 0 for e in found), "whole blocks"
    assert all(a[0] + a[2] == z[0] for a, z in zip(found, found[1:])), "one run, sorted"
    assert len(found) > 64 * TIB // block // 2, "blocks land in shuffled places"


def test_a_seeded_fragmented_layout_is_the_one_it_always_was():
    """Computed by the per-chunk-array implementation this one replaced: same seed, same extents."""
    b = sim(64 * MIB, fragmentation=0.5, seed=7, chunk=2 * MIB, max_contiguity=8 * MIB)
    b.allocate(0, 24 * MIB)
    b.punch_hole(4 * MIB, 6 * MIB)            # two whole chunks and half of one
    b.allocate(40 * MIB + PAGE_SIZE, 5 * MIB)  # partial chunks at both ends
    b.allocate(4 * MIB, 2 * MIB)              # refilled from the free list
    assert extents(b) == [
        (0, 0x103800000, 6 * MIB),
        (10 * MIB, 0x104200000, 2 * MIB),
        (12 * MIB, 0x102600000, 2 * MIB),
        (14 * MIB, 0x104600000, 2 * MIB),
        (16 * MIB, 0x100800000, 2 * MIB),
        (18 * MIB, 0x106600000, 2 * MIB),
        (20 * MIB, 0x107400000, 2 * MIB),
        (22 * MIB, 0x105400000, 2 * MIB),
        (40 * MIB + PAGE_SIZE, 0x100001000, 5 * MIB),
    ]
    assert (b.backend_bytes(), b.info()["chunks_used"]) == (25 * MIB, 13)


def test_a_2_pib_file_is_cheap_and_beyond_52_bit_addresses_is_enomem():
    """Nothing limits the size but the physical address space the simulated memory must fit in."""
    b = sim(1 << 51, phys_base=0)  # 2 PiB file, 4 PiB of memory: exactly 52 bits
    b.allocate((1 << 51) - SZ_2M, SZ_2M)
    assert extents(b) == [((1 << 51) - SZ_2M, (1 << 51) - SZ_2M, SZ_2M)]
    for size, options in [((1 << 51) + SZ_2M, {"phys_base": 0}), (0x7FFFFFFFFFFFF000, {}),
                          (MIB, {"phys_size": 1 << 52})]:
        with pytest.raises(OSError) as info:
            sim(size, **options)
        assert info.value.errno == errno.ENOMEM, (size, options)
