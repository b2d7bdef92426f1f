"""Tile segments with the fewest aligned leaves, as runs of equal leaves; label leaves by attribute.

Why the greedy tiling is minimal. Call a block *allowed* when it lies inside one segment, is aligned in
guest and physical space, and is no larger than the segment's cap. The leaf sizes form a nested chain
(each divides the next), so any two aligned blocks are either disjoint or one contains the other: the
allowed blocks form a laminar family, closed under taking aligned sub-blocks. Take any tiling of the
mappable memory and any *maximal* allowed block M. No tile strictly contains M (it would be a larger
allowed block), so the tiles meeting M lie inside M and cover it; replacing them by M never adds a tile.
Hence tiling by the maximal allowed blocks is minimal, and it is what the greedy computes.

Inside one segment ``[s, e)`` (trimmed to the granule) the blocks of size >= b form the interval
``[align_up(s, b), align_down(e, b))``, so the leaves of size b are a head run and a tail run between that
interval and the next larger size's. That gives at most two runs per leaf size per segment, computed for
all segments at once with numpy: the layout's size is linear in segments, never in pages.
"""

from __future__ import annotations

import numpy as np

from .arch import Arch
from .segments import MIXED, PRIVATE, SHARED, GuestSpace, Segments, merge_sorted


def _align_up(x: np.ndarray, b: int) -> np.ndarray:
    return -(-x // b) * b


def _align_down(x: np.ndarray, b: int) -> np.ndarray:
    return x // b * b


def effective_cap(seg: Segments, arch: Arch) -> np.ndarray:
    """Largest leaf per segment: its cap, limited by the physical alignment (``delta``); 0 = unmappable."""
    best = np.zeros(len(seg.start), dtype=np.int64)
    for size in arch.sizes:
        best = np.where((seg.delta % size == 0) & (size <= seg.cap), size, best)
    return best


def tile(seg: Segments, arch: Arch) -> dict[str, np.ndarray]:
    """Runs of equal leaves (``guest``, ``phys``, ``size``, ``count``, ``segment``), in guest order."""
    granule = arch.granule
    cap = effective_cap(seg, arch)
    start, end = _align_up(seg.start, granule), _align_down(seg.end, granule)
    ups = [_align_up(start, b) for b in arch.sizes]
    downs = [_align_down(end, b) for b in arch.sizes]
    valid = [(u < d) & (b <= cap) for u, d, b in zip(ups, downs, arch.sizes)]

    pieces = []
    next_up = next_down = None
    for j in range(len(arch.sizes) - 1, -1, -1):
        b, u, d = arch.sizes[j], ups[j], downs[j]
        if next_up is None:
            nu, nd = d, d
        else:
            nu, nd = np.where(valid[j + 1], next_up, d), np.where(valid[j + 1], next_down, d)
        for lo, hi in ((u, nu), (nd, d)):
            ok = valid[j] & (lo < hi)
            idx = np.flatnonzero(ok)
            pieces.append((lo[idx], (hi[idx] - lo[idx]) // b, np.full(len(idx), b, dtype=np.int64), idx))
        next_up, next_down = u, d

    guest = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    order = np.argsort(guest, kind="stable")
    guest = guest[order]
    count = np.concatenate([p[1] for p in pieces])[order]
    size = np.concatenate([p[2] for p in pieces])[order]
    segment = np.concatenate([p[3] for p in pieces])[order]
    return {"guest": guest, "phys": guest - seg.delta[segment], "size": size, "count": count,
            "attribute": seg.attribute[segment].astype(np.int8)}


def label_by_attribute(runs: dict[str, np.ndarray], space: GuestSpace) -> dict[str, np.ndarray]:
    """Split runs at attribute boundaries and label each piece private, shared or mixed (guest view).

    A boundary inside a run cuts it at the edges of the leaf holding it: that leaf is mixed unless the
    boundary falls on its edge. The number of pieces grows by at most two per boundary.
    """
    g, p, b, c = runs["guest"], runs["phys"], runs["size"], runs["count"]
    if not len(g):
        return runs
    end = g + b * c
    bounds = space.attr_start[1:]
    r = np.searchsorted(g, bounds, side="right") - 1
    inside = (r >= 0) & (bounds > g[np.maximum(r, 0)]) & (bounds < end[np.maximum(r, 0)])
    bounds, r = bounds[inside], r[inside]
    lo = g[r] + (bounds - g[r]) // b[r] * b[r]
    hi = g[r] + -(-(bounds - g[r]) // b[r]) * b[r]
    points = merge_sorted([g, lo, hi[hi < end[r]]])
    rr = np.searchsorted(g, points, side="right") - 1
    piece_end = np.minimum(np.append(points[1:], np.iinfo(np.int64).max), end[rr])

    a = np.searchsorted(space.attr_start, points, side="right") - 1
    uniform = space.attr_end()[a] >= piece_end
    attribute = np.where(uniform, np.where(space.attr_private[a], PRIVATE, SHARED), MIXED).astype(np.int8)
    return {"guest": points, "phys": p[rr] + (points - g[rr]), "size": b[rr],
            "count": (piece_end - points) // b[rr], "attribute": attribute}


def merge_runs(runs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Join neighbouring runs of the same leaf size and attribute that continue each other."""
    g, p, b, c, a = runs["guest"], runs["phys"], runs["size"], runs["count"], runs["attribute"]
    if len(g) < 2:
        return runs
    step = b * c
    join = np.zeros(len(g), dtype=bool)
    join[1:] = (b[1:] == b[:-1]) & (a[1:] == a[:-1]) & (g[1:] == g[:-1] + step[:-1]) \
        & (p[1:] == p[:-1] + step[:-1])
    first = np.flatnonzero(~join)
    total = np.add.reduceat(c, first) if len(first) else c[:0]
    return {"guest": g[first], "phys": p[first], "size": b[first], "count": total, "attribute": a[first]}
