"""Behaviour of each built-in backend, on real memory (memfd, THP, hugetlb with pages the test reserves)
and on the simulated allocator. The core's own rules are tested elsewhere; here the backend contract of
ufsgmem/backend.py: zeros until written, punch zeroes, view/write round trip, extents sorted, coalesced
and inside the file, backend_bytes, and each backend's own promises."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ufsgmem.builtin.backends import _thp_knob as thp_knob
from ufsgmem.builtin.backends import hugetlb as hugetlb_mod
from ufsgmem.gmem import GuestMemfd
from ufsgmem.plugins import load_backend
from ufsgmem.uapi import GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE, SZ_1G, SZ_2M, SZ_4K

MIB = 1 << 20
PRIVATE, SHARED = 8, 0



# --- helpers -------------------------------------------------------------------------------------------
def check_extents(extents, size: int) -> None:
    """Sorted by offset, non-overlapping, inside the file, and coalesced (no two that could be one)."""
    for e in extents:
        assert e.size > 0 and e.offset >= 0 and e.offset + e.size <= size, f"{e} lies inside the file"
        assert e.offset % PAGE_SIZE == 0 and e.phys % PAGE_SIZE == 0 and e.size % PAGE_SIZE == 0
    for a, b in zip(extents, extents[1:]):
        assert a.offset + a.size <= b.offset, f"{a} and {b} are sorted and do not overlap"
        joinable = a.offset + a.size == b.offset and a.phys + a.size == b.phys
        assert not joinable, f"{a} and {b} are contiguous in file and memory: they must be one extent"


def extent_bytes(extents) -> int:
    return sum(e.size for e in extents)


def pool_available(size: int) -> int:
    return hugetlb_mod.pool_available(size)


class Case:
    """How to make one backend under test, and the granularity it allocates and punches in."""

    def __init__(self, name: str, page_size: int, reserve: int = 0, options: dict | None = None):
        self.name, self.page_size, self.reserve, self.options = name, page_size, reserve, options or {}

    def __repr__(self):
        return f"{self.name}-{self.page_size >> 10}K"


CASES = [Case("anon", SZ_4K), Case("thp", SZ_4K), Case("sim", SZ_4K), Case("sim", SZ_2M),
         Case("hugetlb", SZ_2M, reserve=8)]
SIZE = 16 * MIB


@pytest.fixture(params=CASES, ids=repr)
def backend(request, hugepages):
    case: Case = request.param
    cls = load_backend(case.name)
    if case.reserve:
        with hugepages(case.page_size, case.reserve):
            b = cls(SIZE, case.page_size, **case.options)
            yield b
            b.close()
    else:
        b = cls(SIZE, case.page_size, **case.options)
        yield b
        b.close()


# --- the contract, for every backend -------------------------------------------------------------------
def test_fresh_memory_reads_zero(backend):
    backend.allocate(0, backend.size)
    assert bytes(backend.view(0, backend.size)) == bytes(backend.size), "never-written memory reads as zero"


def test_write_view_round_trip_across_pages(backend):
    backend.allocate(0, backend.size)
    data = os.urandom(3 * PAGE_SIZE + 123)
    backend.write(PAGE_SIZE - 7, data)
    assert bytes(backend.view(PAGE_SIZE - 7, len(data))) == data
    assert bytes(backend.view(0, PAGE_SIZE - 7)) == bytes(PAGE_SIZE - 7), "bytes before the write untouched"


def test_punch_zeroes_only_the_range(backend):
    unit = backend.page_size
    backend.allocate(0, 4 * unit)
    backend.write(0, b"\xa5" * (4 * unit))
    backend.punch_hole(unit, 2 * unit)
    assert bytes(backend.view(unit, 2 * unit)) == bytes(2 * unit), "punched memory reads as zero"
    assert bytes(backend.view(0, unit)) == b"\xa5" * unit, "memory before the hole is kept"
    assert bytes(backend.view(3 * unit, unit)) == b"\xa5" * unit, "memory after the hole is kept"
    backend.allocate(unit, 2 * unit)
    assert bytes(backend.view(unit, 2 * unit)) == bytes(2 * unit), "refaulted memory is still zero"


def test_backend_bytes_follow_allocation_and_punch(backend):
    unit = max(backend.page_size, SZ_2M if backend.name == "thp" else 0)  # THP may back 4K with 2M
    backend.allocate(0, backend.size)
    assert backend.backend_bytes() == backend.size, "a fully allocated file holds exactly its size"
    backend.punch_hole(0, unit)
    assert backend.backend_bytes() == backend.size - unit, "a punched range is given back"
    backend.allocate(0, unit)
    assert backend.backend_bytes() == backend.size


def test_extents_sorted_coalesced_inside_and_complete(backend):
    unit = max(backend.page_size, SZ_2M)
    for start in (0, 3 * unit, 4 * unit, 7 * unit):  # two allocated runs with a gap between them
        backend.allocate(start, unit)
    backend.punch_hole(0, backend.size)
    backend.allocate(0, unit)
    backend.allocate(3 * unit, 2 * unit)
    backend.allocate(7 * unit, unit)
    extents = backend.physical_extents()
    check_extents(extents, backend.size)
    assert extent_bytes(extents) == 4 * unit == backend.backend_bytes(), "extents cover allocated memory"
    covered = {e.offset // unit for e in extents} | {(e.offset + e.size - 1) // unit for e in extents}
    assert covered <= {0, 3, 4, 7}, "only allocated memory has extents"


def test_close_is_idempotent_even_with_a_view_held(backend):
    backend.allocate(0, backend.page_size)
    held = backend.view(0, 16)
    backend.close()
    backend.close()
    del held


# --- memfd backends: pagemap ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["anon", "thp"])
def test_pages_allocated_elsewhere_are_found(name):
    """A page allocated in the file but not mapped here (written through the fd) still has an extent."""
    b = load_backend(name)(4 * MIB, SZ_4K)
    try:
        os.pwrite(b.fileno(), b"x" * PAGE_SIZE, 2 * MIB)
        assert b.backend_bytes() > 0
        extents = b.physical_extents()
        check_extents(extents, b.size)
        assert any(e.offset <= 2 * MIB < e.offset + e.size for e in extents), "the fd-written page is there"
        assert bytes(b.view(2 * MIB, 1)) == b"x"
    finally:
        b.close()


def test_pagemap_gives_real_frames():
    b = load_backend("anon")(MIB, SZ_4K)
    try:
        b.allocate(0, MIB)
        assert b.info()["phys_source"] == "pagemap", "as root, extents are real physical frames"
        assert all(e.phys > 0 for e in b.physical_extents())
    finally:
        b.close()


def test_without_pfns_extents_fall_back_to_folios(tmp_path):
    """Without CAP_SYS_ADMIN pagemap hides PFNs: extents become one per folio, and info() says so."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_SYS_ADMIN")
    code = textwrap.dedent("""
        from ufsgmem.plugins import load_backend
        b = load_backend("anon")(1 << 20, 4096)
        b.allocate(0, 64 << 10)
        extents = b.physical_extents()
        print(b.info()["phys_source"], len(extents), {e.size for e in extents}, extents[0].offset)
    """)
    out = subprocess.run([setpriv, "--bounding-set", "-sys_admin", sys.executable, "-c", code],
                         capture_output=True, text=True, check=True).stdout.split(None, 1)
    assert out[0] == "virtual" and "CAP_SYS_ADMIN" in out[1]
    assert out[1].rsplit(")", 1)[1].split() == ["16", "{4096}", "0"], out[1]


# --- thp -----------------------------------------------------------------------------------------------
def _huge_blocks(extents) -> int:
    """2 MiB blocks that are 2 MiB aligned in the file and in memory and wholly inside one extent."""
    count = 0
    for e in extents:
        first = -(-e.offset // SZ_2M) * SZ_2M
        while first + SZ_2M <= e.offset + e.size:
            count += (e.phys + first - e.offset) % SZ_2M == 0
            first += SZ_2M
    return count


def test_thp_really_obtains_huge_pages_and_says_so():
    b = load_backend("thp")(16 * MIB, SZ_4K)
    try:
        b.allocate(0, b.size)
        info = b.info()
        assert info["shmem_enabled"] in ("advise", "always", "within_size", "force"), info["note"]
        assert info["mapping_2m_aligned"]
        assert info["huge_pages_obtained"] and info["huge_bytes"] > 0, "root can enable shmem THP here"
        assert _huge_blocks(b.physical_extents()) >= info["huge_bytes"] // SZ_2M, \
            "every PMD-mapped 2M page is a physically contiguous, aligned 2M block"
    finally:
        b.close()


def test_thp_reports_no_huge_pages_when_none_can_exist():
    b = load_backend("thp")(MIB, SZ_4K)  # smaller than a huge page: 4K folios only
    try:
        b.allocate(0, b.size)
        info = b.info()
        assert info["huge_pages_obtained"] is False and info["huge_bytes"] == 0
        assert info["resident_bytes"] == MIB
    finally:
        b.close()


def test_thp_knob_is_restored_after_the_last_close():
    before = thp_knob.current()
    b = load_backend("thp")(4 * MIB, SZ_4K)
    assert thp_knob.current() != "never", "while a THP backend is open, MADV_HUGEPAGE is effective"
    b.close()
    others = [p for p in thp_knob._load()["holders"] if p != os.getpid()]
    if before == "never" and not others:
        assert thp_knob.current() == "never", "the value found is put back"
    assert os.getpid() not in thp_knob._load()["holders"]


# --- hugetlb -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page_size,count", [(SZ_2M, 8), (SZ_1G, 1)], ids=["2M", "1G"])
def test_hugetlb_preallocates_real_huge_pages(hugepages, page_size, count):
    size = page_size * count
    with hugepages(page_size, count):
        before = pool_available(page_size)
        progress = []
        b = load_backend("hugetlb")(size, page_size, progress=lambda done, total: progress.append((done, total)))
        try:
            assert pool_available(page_size) == before - count, "creation took every page from the pool"
            assert b.backend_bytes() == size and b.info()["huge_pages_held"] == count
            assert progress and progress[-1] == (size, size), "progress reaches the total"
            assert [d for d, _ in progress] == sorted(d for d, _ in progress)
            extents = b.physical_extents()
            check_extents(extents, size)
            assert extent_bytes(extents) == size
            for e in extents:
                assert e.offset % page_size == 0 and e.phys % page_size == 0 and e.size % page_size == 0, \
                    f"{e}: hugetlb memory comes in naturally aligned {page_size >> 20}M pieces"
        finally:
            b.close()
        assert pool_available(page_size) == before, "close gives every page back to the pool"


def test_hugetlb_pool_too_small_is_enomem_naming_the_shortfall(hugepages):
    with hugepages(SZ_2M, 3):
        have = pool_available(SZ_2M)
        size = (have + 5) * SZ_2M
        with pytest.raises(OSError) as info:
            load_backend("hugetlb")(size, SZ_2M)
        assert info.value.errno == errno.ENOMEM
        match = re.search(r"hugetlb pool has (\d+) free 2M pages, the (\d+)M file needs (\d+): short by (\d+); "
                          r"raise /proc/sys/vm/nr_hugepages", str(info.value))
        assert match, str(info.value)
        has, mib, needs, short = map(int, match.groups())
        assert (mib, needs) == (size >> 20, have + 5) and short == needs - has
        assert pool_available(SZ_2M) == have, "a failed creation takes nothing from the pool"


def test_hugetlb_failure_midway_gives_back_what_was_taken(hugepages, monkeypatch):
    """If faulting stops partway (the pool raced away), the pages already taken go back, then ENOMEM."""
    cls = load_backend("hugetlb")

    class FailsThird(cls):
        calls = 0

        def _populate(self, offset, size):
            FailsThird.calls += 1
            if FailsThird.calls == 3:
                raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
            super()._populate(offset, size)

    monkeypatch.setattr(hugetlb_mod, "CHUNK", SZ_2M)  # one chunk per page, so the failure is midway
    with hugepages(SZ_2M, 4):
        before = pool_available(SZ_2M)
        with pytest.raises(OSError, match=r"preallocation failed at 4M") as info:
            FailsThird(4 * SZ_2M, SZ_2M)
        assert info.value.errno == errno.ENOMEM
        assert pool_available(SZ_2M) == before, "the two pages faulted before the failure are back"


def test_hugetlb_through_the_core_is_enomem(hugepages):
    with hugepages(SZ_2M, 1):
        size = (pool_available(SZ_2M) + 1) * SZ_2M
        with pytest.raises(OSError, match="short by 1") as info:
            GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP, backend="hugetlb", page_size=SZ_2M)
        assert info.value.errno == errno.ENOMEM


def test_hugetlb_punch_returns_pages_and_allocate_takes_them_again(hugepages):
    with hugepages(SZ_2M, 4):
        b = load_backend("hugetlb")(4 * SZ_2M, SZ_2M)
        try:
            held = pool_available(SZ_2M)
            b.write(SZ_2M, b"data")
            b.punch_hole(SZ_2M, 2 * SZ_2M)
            assert pool_available(SZ_2M) == held + 2, "punch gives the huge pages back"
            assert b.backend_bytes() == 2 * SZ_2M
            b.allocate(SZ_2M, 2 * SZ_2M)
            assert pool_available(SZ_2M) == held and b.backend_bytes() == 4 * SZ_2M
            assert bytes(b.view(SZ_2M, 4)) == bytes(4), "the refaulted page is zero"
        finally:
            b.close()


def test_hugetlb_refault_without_a_free_page_is_enomem(hugepages):
    """A punched page can be taken by someone else; allocating it again is then ENOMEM, not SIGBUS."""
    with hugepages(SZ_2M, 2):
        with GuestMemfd(2 * SZ_2M, GUEST_MEMFD_FLAG_MMAP, backend="hugetlb", page_size=SZ_2M) as gmem:
            gmem.punch_hole(0, SZ_2M)
            thief = load_backend("hugetlb")(pool_available(SZ_2M) * SZ_2M, SZ_2M)
            try:
                with pytest.raises(OSError, match="no free 2M huge page to refault") as info:
                    gmem.allocate(0, SZ_2M)
                assert info.value.errno == errno.ENOMEM
                with pytest.raises(OSError) as info:
                    gmem.guest_write(0, b"x")
                assert info.value.errno == errno.ENOMEM, "first use of the hole fails cleanly too"
            finally:
                thief.close()
            gmem.allocate(0, SZ_2M)
            assert gmem.backend.backend_bytes() == 2 * SZ_2M


def test_hugetlb_backend_bytes_stay_the_file_size_across_conversions(hugepages):
    """P6: conversions never allocate; a preallocated file holds exactly its size."""
    with hugepages(SZ_2M, 4):
        with GuestMemfd(4 * SZ_2M, GUEST_MEMFD_FLAG_MMAP, backend="hugetlb", page_size=SZ_2M) as gmem:
            gmem.guest_write(0, b"kept")
            for i in range(2000):
                offset = (i * 7 % 2048) * PAGE_SIZE
                gmem.set_memory_attributes(offset, PAGE_SIZE, SHARED)
                gmem.set_memory_attributes(offset, PAGE_SIZE, PRIVATE)
            assert gmem.backend.backend_bytes() == 4 * SZ_2M
            assert bytes(gmem.guest_read(0, 4)) == b"kept"


# --- sim -----------------------------------------------------------------------------------------------
def sim(size=256 * MIB, page_size=SZ_4K, **options):
    return load_backend("sim")(size, page_size, **options)


def test_sim_unfragmented_is_the_identity():
    b = sim(fragmentation=0.0, phys_base=1 << 32)
    b.allocate(0, 8 * MIB)
    b.allocate(64 * MIB, 4 * MIB)
    assert [tuple(e) for e in b.physical_extents()] == [(0, 1 << 32, 8 * MIB),
                                                         (64 * MIB, (1 << 32) + 64 * MIB, 4 * MIB)]


def test_sim_fragmentation_breaks_contiguity_more_as_it_grows():
    counts = []
    for f in (0.0, 0.3, 0.7, 1.0):
        b = sim(size=SZ_1G, fragmentation=f, seed=3)
        b.allocate(0, SZ_1G)
        extents = b.physical_extents()
        check_extents(extents, SZ_1G)
        assert extent_bytes(extents) == SZ_1G
        counts.append(len(extents))
    assert counts[0] == 1 and counts == sorted(counts) and counts[-1] > 400, counts


def test_sim_is_deterministic_from_the_seed():
    def layout(seed):
        b = sim(fragmentation=0.5, seed=seed)
        b.allocate(0, 64 * MIB)
        b.punch_hole(8 * MIB, 16 * MIB)
        b.allocate(8 * MIB, 4 * MIB)
        return [tuple(e) for e in b.physical_extents()]
    assert layout(7) == layout(7)
    assert layout(7) != layout(8)


def test_sim_max_contiguity_caps_extents():
    b = sim(size=SZ_1G, fragmentation=0.0, max_contiguity=16 * MIB, seed=1)
    b.allocate(0, SZ_1G)
    extents = b.physical_extents()
    check_extents(extents, SZ_1G)
    assert all(e.size <= 16 * MIB and e.phys % (16 * MIB) == e.offset % (16 * MIB) for e in extents)
    assert len(extents) >= SZ_1G // (16 * MIB) // 2, "blocks land in shuffled places"


def test_sim_huge_pages_are_aligned_physical_chunks():
    b = sim(size=4 * SZ_1G, page_size=SZ_1G, fragmentation=1.0, seed=5)
    assert b.preallocates and b.backend_bytes() == 4 * SZ_1G
    for e in b.physical_extents():
        assert e.phys % SZ_1G == 0 and e.size % SZ_1G == 0


def test_sim_punch_gives_chunks_back_and_zeroes():
    b = sim(fragmentation=0.5, seed=2)
    b.allocate(0, 8 * MIB)
    b.write(2 * MIB + 5, b"abc")
    used = b.info()["chunks_used"]
    b.punch_hole(2 * MIB, 2 * MIB)
    assert b.info()["chunks_used"] == used - 1 and b.backend_bytes() == 6 * MIB
    assert b.info()["stored_pages"] == 0, "punched data is dropped"
    b.punch_hole(4 * MIB + PAGE_SIZE, PAGE_SIZE)
    assert b.info()["chunks_used"] == used - 1, "a partly allocated chunk stays"
    assert bytes(b.view(2 * MIB, 8)) == bytes(8)


def test_sim_zero_writes_cost_nothing():
    b = sim()
    b.allocate(0, MIB)
    b.write(0, b"\x01" * PAGE_SIZE)
    b.write(0, bytes(PAGE_SIZE))
    assert b.info()["stored_pages"] == 0


@pytest.mark.parametrize("options", [{"fragmentation": 1.5}, {"chunk": 3000}, {"phys_base": 12345},
                                     {"phys_size": MIB}, {"max_contiguity": MIB}, {"fragmentaton": 0.5},
                                     {"seed": "abc"}, {"chunk": "2Q"}])
def test_sim_bad_options_are_einval(options):
    with pytest.raises(OSError) as info:
        sim(**options)
    assert info.value.errno == errno.EINVAL


def test_sim_huge_pages_need_aligned_phys_base():
    with pytest.raises(OSError, match="phys_base") as info:
        sim(size=SZ_1G, page_size=SZ_1G, phys_base=SZ_2M)
    assert info.value.errno == errno.EINVAL


def test_sim_options_accept_strings_from_a_cli():
    b = sim(fragmentation="0.5", seed="3", chunk="4M", phys_base="0x100000000", preallocate="yes")
    assert (b.fragmentation, b.seed, b.chunk, b.phys_base, b.preallocates) == (0.5, 3, 4 * MIB, 1 << 32, True)
    assert b.backend_bytes() == b.size


@pytest.mark.parametrize("name", ["anon", "thp"])
def test_memfd_backends_refuse_options(name):
    with pytest.raises(OSError, match="takes no options, got colour") as info:
        load_backend(name)(MIB, SZ_4K, colour="blue")
    assert info.value.errno == errno.EINVAL


def test_sim_view_is_capped():
    with pytest.raises(OSError) as info:
        sim(size=SZ_1G).view(0, SZ_1G)
    assert info.value.errno == errno.ENOMEM


def test_sim_one_tebibyte_through_the_core():
    """1 TiB, preallocated in 2M pages and fragmented: metadata stays O(size / chunk), never per page."""
    size = 1 << 40
    with GuestMemfd(size, GUEST_MEMFD_FLAG_MMAP, backend="sim", page_size=SZ_2M,
                    backend_options={"fragmentation": 0.25, "seed": 11}) as gmem:
        assert gmem.backend.backend_bytes() == size
        assert gmem.status()["allocated_bytes"] == size
        gmem.guest_write(700 << 30, b"far away")
        for k in range(4):
            offset = (k * 250 << 30) + k * SZ_2M
            gmem.set_memory_attributes(offset, SZ_2M, SHARED)
            gmem.host_write(offset + 1, b"shared")
            gmem.set_memory_attributes(offset, SZ_2M, PRIVATE)
            assert bytes(gmem.guest_read(offset + 1, 6)) == b"shared", "content survives conversion"
        gmem.punch_hole(100 << 30, SZ_1G)
        extents = gmem.backend.physical_extents()
        assert extent_bytes(extents) == size - SZ_1G == gmem.backend.backend_bytes()
        starts = np.array([e.offset for e in extents])
        assert (np.diff(starts) > 0).all()
        assert bytes(gmem.guest_read(700 << 30, 8)) == b"far away"
        assert gmem.backend.info()["metadata_bytes"] < 32 * MIB, "no per-4K-page metadata"
        assert gmem.status()["huge_folios"]["whole"] == size // SZ_2M - 512


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fragmentation=st.sampled_from([0.0, 0.5, 1.0]), max_contiguity=st.sampled_from([None, 64 << 10]),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 63), st.integers(1, 16)), max_size=40))
def test_sim_allocator_model(fragmentation, max_contiguity, ops):
    """Random allocate/punch sequences against a set of allocated pages: bytes, extents and chunk
    ownership always agree, and no physical chunk ever backs two file chunks."""
    chunk, size = 16 << 10, 64 * PAGE_SIZE
    b = sim(size=size, chunk=chunk, fragmentation=fragmentation, max_contiguity=max_contiguity,
            phys_size=2 * size, seed=4)
    model: set[int] = set()
    for allocating, first, count in ops:
        last = min(first + count, 64)
        if allocating:
            b.allocate(first * PAGE_SIZE, (last - first) * PAGE_SIZE)
            model |= set(range(first, last))
        else:
            b.punch_hole(first * PAGE_SIZE, (last - first) * PAGE_SIZE)
            model -= set(range(first, last))
        extents = b.physical_extents()
        check_extents(extents, size)
        pages = {(e.offset >> 12) + i for e in extents for i in range(e.size >> 12)}
        assert pages == model and b.backend_bytes() == len(model) * PAGE_SIZE
        owners = {}
        for e in extents:
            for i in range(e.size >> 12):
                phys_chunk, file_chunk = (e.phys + i * PAGE_SIZE) // chunk, (e.offset + i * PAGE_SIZE) // chunk
                assert owners.setdefault(phys_chunk, file_chunk) == file_chunk, "one owner per chunk"
                assert (e.phys + i * PAGE_SIZE) % chunk == (e.offset + i * PAGE_SIZE) % chunk
        assert b.info()["chunks_used"] == len({p * PAGE_SIZE // chunk for p in model})
