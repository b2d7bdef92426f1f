"""compute_layout on hand-made snapshots: each view's rule, memslots, big granules, the public names."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from ufsgmem.errors import GuestMemfdError
from ufsgmem.gmem import GuestMemfd
from ufsgmem.layout import ARCHES, VIEWS, compute_layout
from ufsgmem.snapshot import Snapshot

K, M, G = 1 << 10, 1 << 20, 1 << 30
PHYS = 1 << 40


def snap(size=8 * M, holes=(), extents=None, folio=2 * M, split=None, memslot=None, pins=()):
    """Private memory with 4 KiB-aligned shared ``holes`` ((offset, size) pairs)."""
    starts, private = [0], [True]
    for off, length in sorted(holes):
        starts += [off, off + length]
        private += [False, True]
    if starts[-1] == size:
        starts, private = starts[:-1], private[:-1]
    if split is None:
        split = sorted({off // folio * folio for off, _ in holes}) if folio > 4 * K else []
    return Snapshot.build(size=size, flags=0, backend="test", folio_size=folio, attr_starts=starts,
                          attr_private=private, extents=extents if extents is not None else [(0, PHYS, size)],
                          split_folios=split, pins=pins, memslot=memslot)


def test_public_names():
    assert VIEWS == ("guest", "shared", "kvm")
    assert set(ARCHES) == {"x86_64", "arm64-4k", "arm64-16k", "arm64-64k"}
    assert ARCHES["arm64-16k"].sizes == (16 * K, 2 * M, 32 * M, 1 * G)
    assert ARCHES["arm64-64k"].sizes == (64 * K, 2 * M, 512 * M, 16 * G)


def test_views_of_one_hole():
    s = snap(holes=[(3 * M, 4 * K)])
    assert compute_layout(s, "guest", "x86_64").counts_by_size() == {2 * M: 4}
    shared = compute_layout(s, "shared", "x86_64")
    assert list(shared.leaves())[0][:3] == (3 * M, PHYS + 3 * M, 4 * K) and shared.leaf_count == 1
    kvm = compute_layout(s, "kvm", "x86_64")
    assert kvm.counts_by_size() == {2 * M: 3, 4 * K: 512}
    assert kvm.counts_by_level() == {2: 3, 1: 512}
    assert kvm.counts_by_attribute() == {"private": 514, "shared": 1}


def test_unallocated_memory_is_absent_in_every_view():
    s = snap(extents=[(0, PHYS, 2 * M), (4 * M, PHYS + 4 * M, 4 * M)])
    for view in ("guest", "kvm"):
        layout = compute_layout(s, view, "x86_64")
        assert [(l.guest, l.size) for l in layout.leaves()] == [(0, 2 * M), (4 * M, 2 * M), (6 * M, 2 * M)]
    assert compute_layout(s, "shared", "x86_64").leaf_count == 0


def test_physical_misalignment_limits_blocks():
    s = snap(extents=[(0, PHYS + 4 * K, 8 * M)])
    assert compute_layout(s, "guest", "x86_64").counts_by_size() == {4 * K: 2048}
    s = snap(extents=[(0, PHYS + 64 * K, 8 * M)])
    assert compute_layout(s, "guest", "arm64-4k").counts_by_size() == {64 * K: 128}


def test_memslot_translates_and_misalignment_disables_huge_kvm_blocks():
    s = snap(memslot=(G, 0, 8 * M))
    layout = compute_layout(s, "kvm", "x86_64")
    assert layout.guest[0] == G and layout.counts_by_size() == {2 * M: 4}
    s = snap(memslot=(G + 4 * K, 0, 8 * M - 4 * K), extents=[(0, PHYS + 4 * K, 8 * M)])
    # guest and phys stay co-aligned, so the guest view keeps 2M blocks; KVM refuses them (gfn vs offset)
    assert compute_layout(s, "guest", "x86_64").counts_by_size()[2 * M] == 3
    assert compute_layout(s, "kvm", "x86_64").counts_by_size() == {4 * K: 2047}


def test_kvm_folio_rules():
    # 4K folios: KVM maps 4K pages whatever the physical contiguity
    assert compute_layout(snap(folio=4 * K), "kvm", "x86_64").counts_by_size() == {4 * K: 2048}
    # a fully shared 2M folio is split: no 2M leaf there, even though the attribute is uniform
    s = snap(holes=[(2 * M, 2 * M)])
    assert compute_layout(s, "kvm", "x86_64").counts_by_size() == {2 * M: 3, 4 * K: 512}
    assert compute_layout(s, "shared", "x86_64").counts_by_size() == {2 * M: 1}
    # inside a split 1G folio, uniform 2M blocks stay 2M
    s = snap(size=G, folio=G, holes=[(5 * M, 4 * K)])
    assert compute_layout(s, "kvm", "x86_64").counts_by_size() == {2 * M: 511, 4 * K: 512}


@pytest.mark.parametrize("arch,granule", [("arm64-16k", 16 * K), ("arm64-64k", 64 * K)])
def test_a_4k_boundary_inside_a_big_granule(arch, granule):
    s = snap(size=64 * M, holes=[(granule * 5 + 4 * K, 4 * K)], folio=4 * K, split=[])
    guest = compute_layout(s, "guest", arch)
    assert guest.mapped_bytes == 64 * M and guest.counts_by_attribute()["mixed"] == 1
    kvm = compute_layout(s, "kvm", arch)
    assert kvm.mapped_bytes == 64 * M - granule and kvm.meta["unmapped_bytes"] == granule
    assert granule * 5 not in {l.guest for l in kvm.leaves()}
    shared = compute_layout(s, "shared", arch)
    assert shared.leaf_count == 0 and shared.meta["unmapped_bytes"] == 4 * K


def test_contiguous_hints_and_levels_on_arm64_4k():
    layout = compute_layout(snap(size=34 * M, holes=[(32 * M + 64 * K, 4 * K)], folio=4 * K, split=[]),
                            "guest", "arm64-4k")
    assert layout.counts_by_size() == {32 * M: 1, 2 * M: 1}
    layout = compute_layout(snap(size=34 * M, holes=[(32 * M + 64 * K, 4 * K)], folio=2 * M), "kvm", "arm64-4k")
    assert layout.counts_by_size() == {2 * M: 16, 64 * K: 31, 4 * K: 16}
    assert layout.counts_by_level() == {2: 16, 3: 47}


def test_layout_is_immutable_and_deterministic():
    s = snap(holes=[(M, 8 * K), (5 * M, 4 * K)])
    a, b = compute_layout(s, "kvm", "x86_64"), compute_layout(s, "kvm", "x86_64")
    for name in ("guest", "phys", "size", "count", "attribute", "level", "perms"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
        with pytest.raises(ValueError):
            getattr(a, name)[0] = 1
    with pytest.raises(Exception):
        a.view = "guest"


def test_bad_input():
    with pytest.raises(GuestMemfdError) as exc:
        compute_layout(snap(), "host", "x86_64")
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(GuestMemfdError, match="unknown arch 'sparc'; available: x86_64, arm64-4k"):
        compute_layout(snap(), "guest", "sparc")
    with pytest.raises(GuestMemfdError, match="inside the"):
        compute_layout(snap(memslot=(0, 4 * M, 8 * M)), "guest", "x86_64")
    with pytest.raises(GuestMemfdError, match="page aligned"):
        compute_layout(snap(memslot=(100, 0, 4 * M)), "guest", "x86_64")


def test_empty_and_unallocated_snapshots():
    s = snap(extents=[])
    for view in VIEWS:
        layout = compute_layout(s, view, "arm64-16k")
        assert layout.leaf_count == 0 and layout.counts_by_size() == {} and len(layout) == 0


def test_from_a_live_anon_guest_memfd():
    with GuestMemfd(4 * M, 3, backend="anon") as g:
        g.guest_write(0, b"\1" * (4 * M))
        g.set_memory_attributes(M, 8 * K, 8)
        s = g.snapshot()
    layout = compute_layout(s, "guest", "x86_64")
    assert layout.mapped_bytes == 4 * M, "every allocated page is mapped on a 4K-granule arch"
    ext = {int(o): int(p) for o, p, _ in s.extents}
    assert layout.leaf_count <= 1024 and all(l.phys >= 0 for l in layout.leaves())
    assert compute_layout(s, "shared", "x86_64").mapped_bytes == 4 * M - 8 * K
    assert compute_layout(s, "kvm", "x86_64").counts_by_attribute() == {"private": 2, "shared": 1022}
    assert ext, "root reads real PFNs from pagemap"
