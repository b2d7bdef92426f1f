"""An independent, page-by-page model of the stage-2 layout rules, for checking ufsgmem.layout.

It shares nothing with the implementation but the arch size tables: every rule is re-stated per 4 KiB page
from docs/layout.md, and the minimum number of leaves comes from a dynamic program over granules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ufsgmem.layout.bench import holes_snapshot
from ufsgmem.snapshot import Snapshot

PAGE = 4096


@dataclass
class Pages:
    """Ground truth per 4 KiB file page."""

    private: np.ndarray  # bool
    phys: np.ndarray  # int64 physical address, -1 = not allocated
    folio_size: int
    split: np.ndarray  # bool: the page lies in a split folio
    memslot: tuple[int, int, int] | None = None

    @property
    def npages(self) -> int:
        return len(self.private)

    def snapshot(self, coalesce: bool = True) -> Snapshot:
        private = self.private
        change = np.flatnonzero(np.diff(private.astype(np.int8))) + 1
        starts = np.concatenate([[0], change])
        extents = []
        for f in range(self.npages):
            if self.phys[f] < 0:
                continue
            if coalesce and extents and extents[-1][0] + extents[-1][2] == f * PAGE \
                    and extents[-1][1] + extents[-1][2] == self.phys[f]:
                extents[-1][2] += PAGE
            else:
                extents.append([f * PAGE, int(self.phys[f]), PAGE])
        fpages = self.folio_size // PAGE
        split = sorted({f // fpages * self.folio_size for f in np.flatnonzero(self.split)})
        return Snapshot.build(size=self.npages * PAGE, flags=0, backend="model", folio_size=self.folio_size,
                              attr_starts=starts * PAGE, attr_private=private[starts],
                              extents=[tuple(e) for e in extents], split_folios=split, memslot=self.memslot)


class Model:
    """Per-page predicates of one view on one arch."""

    def __init__(self, pages: Pages, view: str, arch):
        self.p, self.view, self.arch = pages, view, arch
        self.gb, self.off, self.sz = pages.memslot or (0, 0, pages.npages * PAGE)
        self.G = arch.granule

    def file_page(self, guest: int) -> int | None:
        f = guest - self.gb + self.off
        if guest < self.gb or guest >= self.gb + self.sz:
            return None
        return f // PAGE

    def allowed(self, a: int, size: int) -> bool:
        if a % size or size not in self.arch.sizes:
            return False
        pages = [self.file_page(a + i * PAGE) for i in range(size // PAGE)]
        if any(f is None for f in pages):
            return False
        phys = self.p.phys[pages]
        if (phys < 0).any() or phys[0] % size or (np.diff(phys) != PAGE).any():
            return False
        private = self.p.private[pages]
        if self.view == "shared" and private.any():
            return False
        if self.view == "kvm":
            if private.any() and not private.all():
                return False
            if size > max(self.p.folio_size, self.G):
                return False
            if size >= self.p.folio_size > self.G and self.p.split[pages].any():
                return False
            if size > self.G and (self.gb - self.off) % size:
                return False
        return True

    def label(self, a: int, size: int) -> str:
        private = self.p.private[[self.file_page(a + i * PAGE) for i in range(size // PAGE)]]
        return "private" if private.all() else "shared" if not private.any() else "mixed"

    def granules(self) -> range:
        lo = self.gb // self.G * self.G
        hi = -(-(self.gb + self.sz) // self.G) * self.G
        return range(lo, hi, self.G)

    def mappable(self) -> set[int]:
        return {a for a in self.granules() if self.allowed(a, self.G)}

    def minimum(self) -> int:
        """Fewest leaves tiling exactly the mappable granules (dynamic program from the top down)."""
        grid = self.granules()
        if not len(grid):
            return 0
        lo, hi = grid.start, grid.stop
        best = {hi: 0}
        for a in range(hi - self.G, lo - 1, -self.G):
            if not self.allowed(a, self.G):
                best[a] = best[a + self.G]
                continue
            best[a] = min(1 + best[a + s] for s in self.arch.sizes if a + s <= hi and self.allowed(a, s))
        return best[lo]


def tib_snapshot(holes: int = 100_000, seed: int = 1) -> Snapshot:
    """1 TiB, one physically contiguous extent at 4 TiB, ``holes`` distinct 4 KiB shared pages, 1G folios,
    and the first hole pinned (the P5 benchmark's snapshot plus a pin)."""
    snap = holes_snapshot(holes=holes, seed=seed)
    first_hole = int(snap.attr_starts[1])
    return Snapshot.build(size=snap.size, flags=snap.flags, backend=snap.backend, folio_size=snap.folio_size,
                          attr_starts=snap.attr_starts, attr_private=snap.attr_private, extents=snap.extents,
                          split_folios=snap.split_folios, pins=[(first_hole, PAGE, 1)])
