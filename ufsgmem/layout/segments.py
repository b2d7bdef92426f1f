"""From a snapshot to *segments*: guest-address intervals inside which a block's only limits are alignment.

A segment ``[start, end)`` is physically contiguous with one ``delta = guest - phys``, and carries what a
view needs to know about it: its attribute (where the view keeps attributes apart) and a ``cap``, the
largest leaf the view allows there. A block is allowed exactly when it lies inside one segment, is
aligned in guest *and* physical space (``delta % size == 0``) and is no larger than the cap; each of these
conditions also holds for every aligned sub-block, which the tiling's minimality proof relies on.

How each view cuts the memory into segments (the rules are documented in ``docs/layout.md``):

* ``guest``: physical extents only (attributes do not matter; leaves are labelled afterwards);
* ``shared``: extents cut by attribute runs, shared pieces only;
* ``kvm``: extents cut by attribute runs and split folios; the cap is the folio size (a whole folio),
  the largest leaf below it inside a split folio, and no huge leaf the memslot's guest↔offset
  misalignment forbids.

Everything is numpy over the break points (extent edges, attribute boundaries, split folio edges), so the
cost is linear in runs + extents; the sorts merge already-sorted arrays (timsort is linear on those).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from ..errors import fail
from ..uapi import PAGE_SIZE
from .arch import Arch

VIEWS = ("guest", "shared", "kvm")

SHARED, PRIVATE, MIXED = 0, 1, 2
ATTRIBUTE_NAMES = ("shared", "private", "mixed")


@dataclass(frozen=True)
class GuestSpace:
    """The snapshot translated into guest addresses through its memslot (default: guest = file offset)."""

    guest_base: int
    offset: int
    size: int
    ext_start: np.ndarray  # guest start of each coalesced extent
    ext_end: np.ndarray
    ext_delta: np.ndarray  # guest - phys
    attr_start: np.ndarray  # guest start of each attribute run inside the slot (first = guest_base)
    attr_private: np.ndarray
    split_start: np.ndarray  # guest ranges of split folios, clipped to the slot
    split_end: np.ndarray

    @property
    def shift(self) -> int:
        return self.guest_base - self.offset

    @property
    def end(self) -> int:
        return self.guest_base + self.size

    def attr_end(self) -> np.ndarray:
        return np.append(self.attr_start[1:], self.end)


def merge_sorted(arrays: list[np.ndarray]) -> np.ndarray:
    """The distinct values of already-sorted arrays, in order. A stable sort is timsort, which merges the
    sorted runs it finds, so this costs O(n log k) for k inputs: linear for the handful we pass."""
    merged = np.sort(np.concatenate(arrays), kind="stable")
    if len(merged) < 2:
        return merged
    keep = np.ones(len(merged), dtype=bool)
    keep[1:] = merged[1:] != merged[:-1]
    return merged[keep]


def group_edges(new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last index of each group, where ``new[i]`` marks the first element of a group."""
    first = np.flatnonzero(new)
    return first, np.append(first[1:], len(new)).astype(np.int64) - 1 if len(first) else first


def memslot_of(snapshot) -> tuple[int, int, int]:
    """The snapshot's memslot, checked; without one the whole file at guest address 0."""
    if snapshot.memslot is None:
        return 0, 0, snapshot.size
    guest_base, offset, size = snapshot.memslot
    if min(guest_base, offset) < 0 or size <= 0 or offset + size > snapshot.size:
        raise fail(errno.EINVAL, f"memslot offset {offset:#x} size {size:#x} must lie inside the "
                                 f"{snapshot.size:#x}-byte file")
    if (guest_base | offset | size) % PAGE_SIZE:
        raise fail(errno.EINVAL, f"memslot guest {guest_base:#x}, offset {offset:#x}, size {size:#x} "
                                 "must be page aligned")
    return guest_base, offset, size


def guest_space(snapshot) -> GuestSpace:
    guest_base, offset, size = memslot_of(snapshot)
    shift, lo, hi = guest_base - offset, offset, offset + size

    ext = np.asarray(snapshot.extents, dtype=np.int64).reshape(-1, 3)
    start = np.maximum(ext[:, 0], lo)
    end = np.minimum(ext[:, 0] + ext[:, 2], hi)
    keep = start < end
    phys = ext[keep, 1] + (start[keep] - ext[keep, 0])
    start, end = start[keep], end[keep]
    order = np.argsort(start, kind="stable")
    start, end, phys = start[order], end[order], phys[order]
    delta = start - phys
    # coalesce rows that continue each other in both spaces (a backend need not have done it)
    new = np.ones(len(start), dtype=bool)
    new[1:] = (start[1:] != end[:-1]) | (delta[1:] != delta[:-1])
    first, last = group_edges(new)
    ext_start, ext_end, ext_delta = start[first] + shift, end[last] + shift, delta[first] + shift

    a_start = np.asarray(snapshot.attr_starts, dtype=np.int64)
    a_priv = np.asarray(snapshot.attr_private, dtype=bool)
    i0 = max(int(np.searchsorted(a_start, lo, side="right")) - 1, 0)
    i1 = int(np.searchsorted(a_start, hi, side="left"))
    attr_start = a_start[i0:i1].copy()
    attr_start[0] = lo
    attr_private = a_priv[i0:i1]

    folio = snapshot.folio_size
    split = np.asarray(snapshot.split_folios, dtype=np.int64)
    s_start, s_end = np.maximum(split, lo), np.minimum(split + folio, hi)
    keep = s_start < s_end
    return GuestSpace(guest_base, offset, size, ext_start, ext_end, ext_delta,
                      attr_start + shift, attr_private, s_start[keep] + shift, s_end[keep] + shift)


@dataclass(frozen=True)
class Segments:
    start: np.ndarray
    end: np.ndarray
    delta: np.ndarray
    cap: np.ndarray
    attribute: np.ndarray  # SHARED / PRIVATE, or MIXED where the view keeps attributes together

    @property
    def bytes(self) -> int:
        return int((self.end - self.start).sum())


def kvm_caps(snapshot, space: GuestSpace, arch: Arch) -> tuple[int, int]:
    """``(cap in a whole folio, cap in a split folio)`` for the kvm view, after the memslot rule."""
    folio = snapshot.folio_size
    whole = arch.largest_at_most(max(folio, arch.granule))
    split = arch.largest_at_most(folio // 2) if folio > arch.granule else whole
    # docs/design.md §7.4.4: an unaligned gfn↔offset binding is allowed, but forbids huge mappings at that
    # level
    slot = arch.largest_dividing(space.shift) or arch.granule
    return min(whole, slot), min(split, slot)


def segments(snapshot, space: GuestSpace, view: str, arch: Arch) -> Segments:
    """The view's segments in guest-address order (see the module docstring)."""
    if view not in VIEWS:
        raise fail(errno.EINVAL, f"unknown view {view!r}; available: {', '.join(VIEWS)}")
    if not len(space.ext_start):
        empty = np.zeros(0, dtype=np.int64)
        return Segments(empty, empty, empty, empty, empty.astype(np.int8))
    points = [space.ext_start, space.ext_end]
    if view != "guest":
        points.append(space.attr_start)
    if view == "kvm":
        points += [space.split_start, space.split_end]
    cuts = merge_sorted(points)
    start, end = cuts[:-1], cuts[1:]

    e = np.searchsorted(space.ext_start, start, side="right") - 1
    allocated = (e >= 0) & (start < space.ext_end[np.maximum(e, 0)])
    delta = space.ext_delta[np.maximum(e, 0)]
    a = np.searchsorted(space.attr_start, start, side="right") - 1
    private = space.attr_private[np.maximum(a, 0)]
    attribute = np.where(private, PRIVATE, SHARED).astype(np.int8)
    cap = np.full(len(start), arch.max_size, dtype=np.int64)

    keep = allocated
    if view == "guest":
        attribute[:] = MIXED  # labelled per leaf later
    elif view == "shared":
        keep = keep & ~private
    else:
        whole, split = kvm_caps(snapshot, space, arch)
        s = np.searchsorted(space.split_start, start, side="right") - 1
        in_split = (s >= 0) & (start < space.split_end[np.maximum(s, 0)]) if len(space.split_start) else \
            np.zeros(len(start), dtype=bool)
        cap = np.where(in_split, split, whole).astype(np.int64)
    start, end, delta, cap, attribute = start[keep], end[keep], delta[keep], cap[keep], attribute[keep]

    # join neighbours with equal keys, so no segment boundary is artificial
    new = np.ones(len(start), dtype=bool)
    new[1:] = ((start[1:] != end[:-1]) | (delta[1:] != delta[:-1]) | (cap[1:] != cap[:-1])
               | (attribute[1:] != attribute[:-1]))
    first, last = group_edges(new)
    return Segments(start[first], end[last], delta[first], cap[first], attribute[first])
