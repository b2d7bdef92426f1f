"""Physical truth: layouts of real memory, with real PFNs from /proc/self/pagemap, and at 1 TiB scale.

* hugetlb 1G: a 1 GiB file on one 1 GiB huge page with a few 4 KiB shared holes is ONE 1 GiB block in
  the guest view, only the holes in the shared view, and in the kvm view exactly the 2 MiB blocks holding
  a hole are split (the split 1G folio keeps its uniform 2 MiB pieces).
* anon 4K: the guest view coalesces only as far as the page allocator's PFNs allow; the test records it.
* 1 TiB, 100 000 holes, one contiguous extent: every view's counts are exact (time is `ufsgmem bench`'s).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SZ_1G, SZ_2M
from layout_model import PAGE, tib_snapshot
from ufsgmem.gmem import GuestMemfd
from ufsgmem.layout import compute_layout

HOLES = (0x1000, 0x40_5000, 0x40_9000, 0x3000_0000, 0x3FFF_F000)


def compact_memory() -> None:
    """Ask the kernel to defragment free memory first: a 1 GiB page needs 1 GiB of contiguous memory."""
    try:
        with open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1")
    except OSError:
        pass  # not root or no compaction: the reservation then says why it could not get the page


@pytest.mark.hugetlb
def test_hugetlb_1g_page_with_shared_holes(hugepages):
    compact_memory()
    with hugepages(SZ_1G, 1):
        with GuestMemfd(SZ_1G, 1, backend="hugetlb", page_size=SZ_1G) as g:
            for off in HOLES:
                g.set_memory_attributes(off, PAGE, 0)
            s = g.snapshot()
    assert len(s.extents) == 1, f"one 1 GiB page is one physical extent, got {s.extents.tolist()}"
    offset, phys, size = s.extents[0].tolist()
    assert (offset, size) == (0, SZ_1G) and phys % SZ_1G == 0 and phys > 0, "real, 1G-aligned PFNs"

    guest = compute_layout(s, "guest", "x86_64")
    assert [(l.guest, l.phys, l.size, l.attribute) for l in guest.leaves()] == [(0, phys, SZ_1G, "mixed")]

    shared = compute_layout(s, "shared", "x86_64")
    assert [(l.guest, l.phys, l.size) for l in shared.leaves()] == [(h, phys + h, PAGE) for h in HOLES]

    kvm = compute_layout(s, "kvm", "x86_64")
    blocks_with_holes = {h // SZ_2M * SZ_2M for h in HOLES}
    assert kvm.counts_by_size() == {SZ_2M: 512 - len(blocks_with_holes), PAGE: 512 * len(blocks_with_holes)}
    small = {l.guest // SZ_2M * SZ_2M for l in kvm.leaves() if l.size == PAGE}
    assert small == blocks_with_holes, "exactly the 2 MiB blocks holding a hole are split"
    assert all(l.phys == phys + l.guest for l in kvm.leaves())


@pytest.mark.hugetlb
def test_hugetlb_2m_pages_split_only_where_shared(hugepages):
    with hugepages(SZ_2M, 8):
        with GuestMemfd(8 * SZ_2M, 1, backend="hugetlb", page_size=SZ_2M) as g:
            g.set_memory_attributes(3 * SZ_2M + PAGE, PAGE, 0)
            s = g.snapshot()
    kvm = compute_layout(s, "kvm", "x86_64")
    assert kvm.counts_by_size() == {SZ_2M: 7, PAGE: 512}
    guest = compute_layout(s, "guest", "x86_64")
    assert guest.counts_by_size() == {SZ_2M: 8}, "each 2 MiB huge page is at least one 2 MiB block"


def test_anon_4k_coalesces_only_as_far_as_real_pfns_allow(record_property):
    with GuestMemfd(64 << 20, 3, backend="anon") as g:
        g.guest_write(0, b"\1" * (64 << 20))
        s = g.snapshot()
    ext = s.extents
    assert int(ext[:, 2].sum()) == 64 << 20 and (ext[:, 1] > 0).all(), "root reads every page's real PFN"
    for arch in ("x86_64", "arm64-4k"):
        layout = compute_layout(s, "guest", arch)
        assert layout.mapped_bytes == 64 << 20
        # the layout can never beat the physical extents: each leaf lies inside one extent
        assert layout.leaf_count >= len(ext)
        record_property(f"{arch}_guest_leaves", layout.counts_by_size())
    record_property("anon_extents", len(ext))
    record_property("anon_longest_extent", int(ext[:, 2].max()))


def test_1tib_with_100k_holes_is_exact():
    s = tib_snapshot()
    holes = s.attr_starts[1::2]
    assert len(holes) == 100_000
    assert compute_layout(s, "guest", "x86_64").counts_by_size() == {SZ_1G: 1024}
    shared = compute_layout(s, "shared", "x86_64")
    assert shared.counts_by_size() == {PAGE: 100_000} and np.array_equal(shared.guest, holes)
    kvm = compute_layout(s, "kvm", "x86_64")
    split_2m = len(np.unique(holes // SZ_2M))
    assert kvm.counts_by_size() == {SZ_2M: 1024 * 512 - split_2m, PAGE: 512 * split_2m}
    assert kvm.mapped_bytes == 1 << 40 and len(kvm) < 6 * 100_000, "rows stay linear in the holes"
    arm = compute_layout(s, "kvm", "arm64-4k")
    assert arm.mapped_bytes == 1 << 40 and arm.counts_by_attribute()["shared"] == 100_000
