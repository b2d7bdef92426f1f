"""``compute_layout``: a snapshot, a view and an architecture in; an immutable :class:`Layout` out.

Pure and deterministic: the same snapshot always gives the same layout, and nothing is changed. The steps
are (1) translate the snapshot into guest addresses through its memslot, (2) cut the memory into the
view's segments, (3) tile each segment with the fewest aligned leaves, (4) in the guest view label every
leaf private, shared or mixed, (5) join runs that continue each other.
"""

from __future__ import annotations

from .arch import Arch, get_arch
from .model import Layout
from .segments import guest_space, segments
from .tiling import label_by_attribute, merge_runs, tile


def compute_layout(snapshot, view: str = "guest", arch: "str | Arch" = "x86_64") -> Layout:
    """The stage-2 layout of ``snapshot`` for ``view`` (guest|shared|kvm) on ``arch``.

    Raises OSError(EINVAL) for an unknown view or arch, or a memslot outside the file.
    """
    arch = get_arch(arch)
    space = guest_space(snapshot)
    seg = segments(snapshot, space, view, arch)
    runs = tile(seg, arch)
    if view == "guest" and len(runs["guest"]):
        runs = label_by_attribute(runs, space)
    runs = merge_runs(runs)
    mapped = int((runs["size"] * runs["count"]).sum())
    meta = {
        "size": snapshot.size, "backend": snapshot.backend, "folio_size": snapshot.folio_size,
        "memslot": {"guest_base": space.guest_base, "offset": space.offset, "size": space.size},
        "eligible_bytes": seg.bytes, "unmapped_bytes": seg.bytes - mapped,
        "name": snapshot.meta.get("name", ""),
    }
    return Layout.from_runs(view, arch, runs, meta)
