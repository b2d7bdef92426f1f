"""The layout against an independent page-by-page model: exact coverage, every leaf allowed by its view's
rule, correct labels and permissions, no overlap, and the minimum number of leaves (dynamic program)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from layout_model import PAGE, Model, Pages
from ufsgmem.layout import ARCHES, VIEWS, Arch, LeafSize, compute_layout

K = 1024
# Scaled-down chains keep every level reachable in a few hundred pages.
SMALL = Arch("test-4k", (LeafSize(4 * K, 3), LeafSize(16 * K, 3, 4), LeafSize(64 * K, 2), LeafSize(256 * K, 1)),
             "arm64")
SMALL_16K = Arch("test-16k", (LeafSize(16 * K, 3), LeafSize(64 * K, 3, 4), LeafSize(256 * K, 2)), "arm64")


def check(pages: Pages, view: str, arch, coalesce: bool = True) -> None:
    layout = compute_layout(pages.snapshot(coalesce), view, arch)
    model = Model(pages, view, arch)
    leaves = list(layout.leaves())
    covered = set()
    last_end = None
    for leaf in leaves:
        assert last_end is None or leaf.guest >= last_end, f"leaves overlap or are out of order at {leaf}"
        last_end = leaf.guest + leaf.size
        assert model.allowed(leaf.guest, leaf.size), f"{view}: leaf not allowed by the rule: {leaf}"
        f = model.file_page(leaf.guest)
        assert leaf.phys == pages.phys[f], f"leaf phys differs from the page's: {leaf}"
        label = model.label(leaf.guest, leaf.size)
        assert leaf.attribute == label, f"{leaf} should be {label}"
        assert leaf.perms == ("rw-" if label == "shared" else "rwx")
        assert leaf.level == arch.leaf(leaf.size).level
        covered.update(range(leaf.guest, leaf.guest + leaf.size, arch.granule))
    assert covered == model.mappable(), f"{view}: coverage differs from the mappable granules"
    assert len(leaves) == layout.leaf_count == sum(layout.counts_by_size().values())
    assert len(leaves) == model.minimum(), f"{view} on {arch.name}: not minimal"
    assert layout.meta["unmapped_bytes"] >= 0


@st.composite
def page_states(draw, max_pages=160, folios=(4 * K, 16 * K, 32 * K, 64 * K, 256 * K)):
    npages = draw(st.integers(1, max_pages))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    private = np.zeros(npages, dtype=bool)
    value, f = rnd.random() < 0.5, 0
    while f < npages:
        run = rnd.choice([1, 1, 2, 3, 4, 8, 16, 64, 128])
        private[f:f + run] = value
        value, f = not value, f + run
    phys = np.full(npages, -1, dtype=np.int64)
    f, base = 0, 0
    while f < npages:
        run = rnd.choice([1, 2, 3, 4, 5, 16, 17, 64, 100, 256])
        kind = rnd.random()
        if kind < 0.15:
            pass  # a hole: not allocated
        else:
            if kind < 0.45 or f == 0:  # a fresh extent somewhere, aligned to 256K plus a skew
                skew = rnd.choice([0, 0, 0, f * PAGE % (256 * K), PAGE, 3 * PAGE, 16 * K])
                base = rnd.randrange(1, 64) * (1 << 20) + skew
            phys[f:f + run] = base + np.arange(min(run, npages - f)) * PAGE
        base += run * PAGE
        f += run
    folio = draw(st.sampled_from(folios))
    fpages = folio // PAGE
    split = np.zeros(npages, dtype=bool)
    for start in range(0, npages, fpages):
        block = slice(start, start + fpages)
        shared = (~private[block]).any()
        if rnd.random() < 0.1:
            shared = not shared  # snapshots built by hand may disagree; the rule reads split_folios as given
        split[block] = shared and fpages > 1
    memslot = None
    if draw(st.booleans()):
        off = rnd.randrange(0, npages) * PAGE
        size = rnd.randrange(1, npages - off // PAGE + 1) * PAGE
        gb = rnd.choice([off, 0, 1 << 20, (1 << 20) + PAGE, rnd.randrange(0, 512) * PAGE, off + 64 * K])
        memslot = (gb, off, size)
    return Pages(private, phys, folio, split, memslot)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page_states(), st.sampled_from(VIEWS), st.sampled_from([SMALL, SMALL_16K]), st.booleans())
def test_small_arches_against_the_model(pages, view, arch, coalesce):
    check(pages, view, arch, coalesce)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(page_states(max_pages=1536, folios=(4 * K, 2 << 20)), st.sampled_from(VIEWS),
       st.sampled_from(["x86_64", "arm64-4k"]))
def test_real_4k_arches_against_the_model(pages, view, arch):
    check(pages, view, ARCHES[arch])


def test_known_minimum_beats_a_naive_split():
    """A 2M-aligned extent with one shared page: guest 1 block, shared 1 leaf, kvm 511 + 1 + ... exact."""
    n = 1024  # 4 MiB
    private = np.ones(n, dtype=bool)
    private[700] = False
    phys = (8 << 20) + np.arange(n, dtype=np.int64) * PAGE
    split = np.zeros(n, dtype=bool)
    split[512:] = True
    pages = Pages(private, phys, 2 << 20, split)
    for view in VIEWS:
        check(pages, view, ARCHES["x86_64"])
    layout = compute_layout(pages.snapshot(), "kvm", "x86_64")
    assert layout.counts_by_size() == {2 << 20: 1, PAGE: 512}
    layout = compute_layout(pages.snapshot(), "kvm", "arm64-4k")
    assert layout.counts_by_size() == {2 << 20: 1, 64 * K: 31, PAGE: 16}


@pytest.mark.parametrize("arch", ["arm64-16k", "arm64-64k"])
def test_big_granules_against_the_model(arch):
    """Granules above 4 KiB: 4 KiB boundaries inside a granule (mixed granules) in every view."""
    rnd = random.Random(7)
    for trial in range(3):
        n = 4096  # 16 MiB
        private = np.ones(n, dtype=bool)
        for _ in range(6):
            s = rnd.randrange(n)
            private[s:s + rnd.choice([1, 4, 16, 40])] = False
        phys = (64 << 20) + np.arange(n, dtype=np.int64) * PAGE
        phys[rnd.randrange(n):] += rnd.choice([PAGE, 64 * K, 2 << 20])
        phys[rnd.randrange(n):rnd.randrange(n)] = -1
        pages = Pages(private, phys, rnd.choice([4 * K, 2 << 20]), np.zeros(n, dtype=bool))
        for view in VIEWS:
            check(pages, view, ARCHES[arch])
