"""Exporter ``png``: a picture of the layout a person reads at a glance.

Four strips over the memslot's guest address range, top to bottom: the memory attribute (private blue,
shared orange, unallocated grey), the leaf size the view uses (one colour per size, white = not mapped),
memory in split huge folios (red) and pinned pages (purple); under them, the number of leaves of each size.

Aggregation keeps it readable at any scale: the address range is cut into a fixed number of bins and each
bin shows byte fractions computed from the runs (cumulative sums, linear in runs), never per page. Any bin
holding shared memory, a split folio or a pin gets at least a clearly visible tint, so 100 000 scattered
4 KiB holes in 1 TiB still show where they are. Matplotlib runs on its Agg backend (no display needed).
"""

from __future__ import annotations

import io

import numpy as np

from ufsgmem.address import format_size
from ufsgmem.exporter import LayoutExporter
from ufsgmem.layout.segments import guest_space

BINS = 880  # about one bin per pixel of the strips
PRIVATE_RGB = np.array([0.20, 0.40, 0.64])
SHARED_RGB = np.array([0.96, 0.47, 0.00])
EMPTY_RGB = np.array([0.85, 0.85, 0.85])
SPLIT_RGB = np.array([0.80, 0.00, 0.00])
PIN_RGB = np.array([0.46, 0.31, 0.48])
MIN_TINT = 0.6


def covered(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bytes of the sorted, disjoint intervals ``[starts, ends)`` inside each bin between ``edges``."""
    if not len(starts):
        return np.zeros(len(edges) - 1)
    lengths = (ends - starts).astype(np.float64)
    before = np.concatenate([[0.0], np.cumsum(lengths)])
    i = np.searchsorted(starts, edges, side="right") - 1
    inside = np.clip(edges - starts[np.maximum(i, 0)], 0, lengths[np.maximum(i, 0)])
    cum = np.where(i >= 0, before[np.maximum(i, 0)] + inside, 0.0)
    return np.diff(cum)


def _dilate(mask: np.ndarray, reach: int = 2) -> np.ndarray:
    """Widen sparse marks by ``reach`` bins each side, so a single 4 KiB event is a few pixels wide."""
    out = mask.copy()
    for k in range(1, reach + 1):
        out[k:] |= mask[:-k]
        out[:-k] |= mask[k:]
    return out


def _tint(base: np.ndarray, colour: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Blend ``colour`` in by ``fraction``; where there is any, at least MIN_TINT (and on nearby bins)."""
    weight = np.where(_dilate(fraction > 0), np.maximum(fraction, MIN_TINT), 0.0)[:, None]
    return base * (1 - weight) + colour * weight


def stacked(fractions: np.ndarray, palette: np.ndarray, height: int = 48) -> np.ndarray:
    """An (height, bins, 3) image: each column stacks the sizes' byte fractions from the bottom, every
    size present getting at least two rows; white above the mapped fraction."""
    present = fractions > 0
    floor = np.where(present, np.maximum(fractions, 2.0 / height), 0.0)
    total = fractions.sum(axis=0)
    scale = np.divide(total, floor.sum(axis=0), out=np.zeros_like(total), where=floor.sum(axis=0) > 0)
    cum = np.cumsum(floor * scale, axis=0)  # (sizes, bins)
    ys = (np.arange(height)[::-1] + 0.5) / height  # image row 0 is the top
    index = (cum[:, None, :] <= ys[None, :, None]).sum(axis=0)  # (height, bins); len(sizes) = white
    colours = np.vstack([palette, np.ones((1, 3))])
    return colours[index]


def strips(layout, snapshot, bins: int = BINS) -> dict[str, np.ndarray]:
    """The per-bin images and the numbers behind them (exposed for tests)."""
    space = guest_space(snapshot)
    lo, hi = space.guest_base, space.end
    edges = np.linspace(lo, hi, bins + 1)
    width = np.diff(edges)
    attr_end = space.attr_end()
    shared = covered(space.attr_start[~space.attr_private], attr_end[~space.attr_private], edges) / width
    allocated = covered(space.ext_start, space.ext_end, edges) / width
    unallocated = np.clip(1 - allocated, 0, 1)
    unallocated = np.where(unallocated > 1e-9, unallocated, 0)
    base = np.tile(PRIVATE_RGB, (bins, 1))
    # top row: honest byte fractions; bottom row: where any shared (or unallocated) memory is at all
    # shared and unallocated bytes may overlap (a shared page never touched): count it once, as shared
    unshared_empty = np.minimum(unallocated, 1 - shared)
    honest = base * (1 - shared - unshared_empty)[:, None] + SHARED_RGB * shared[:, None] \
        + EMPTY_RGB * unshared_empty[:, None]
    where = _tint(_tint(base, EMPTY_RGB, unallocated), SHARED_RGB, shared)
    attribute = np.stack([honest, where])

    sizes = layout.arch.sizes
    ends = layout.guest + layout.bytes
    by_size = np.stack([covered(layout.guest[layout.size == s], ends[layout.size == s], edges)
                        for s in sizes]) / width
    leaf = stacked(by_size, size_palette(len(sizes)))

    split_starts = np.sort(np.asarray(snapshot.split_folios, dtype=np.int64)) + space.shift
    split_count = np.histogram(split_starts, bins=edges)[0]
    pins = np.asarray(snapshot.pins, dtype=np.int64).reshape(-1, 3)
    pinned = covered(pins[:, 0] + space.shift, pins[:, 0] + pins[:, 1] + space.shift, edges) / width
    in_split = covered(space.split_start, space.split_end, edges) / width
    split_rgb = _tint(np.ones((bins, 3)), SPLIT_RGB, in_split)
    pin_rgb = _tint(np.ones((bins, 3)), PIN_RGB, pinned)
    return {"edges": edges, "shared": shared, "allocated": allocated, "by_size": by_size, "split": split_count, "in_split": in_split,
            "pinned": pinned, "attribute": attribute, "leaf": leaf, "split_rgb": split_rgb[None],
            "pin_rgb": pin_rgb[None]}


def size_palette(n: int) -> np.ndarray:
    from matplotlib import colormaps
    return colormaps["viridis"](np.linspace(0.95, 0.05, n))[:, :3]


def _address_ticks(ax, lo: int, hi: int) -> None:
    ticks = np.linspace(lo, hi, 9)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_addr(int(t)) for t in ticks], fontsize=8)


def _addr(x: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if x >= 1 << shift:
            return f"{x / (1 << shift):.4g}{unit}"
    return str(x)


class PngExporter(LayoutExporter):
    name = "png"
    suffix = ".png"

    def render(self, layout, snapshot) -> bytes:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        data = strips(layout, snapshot)
        lo, hi = data["edges"][0], data["edges"][-1]
        fig = Figure(figsize=(13, 6.2), dpi=100)
        grid = fig.add_gridspec(5, 1, height_ratios=[1.2, 1.2, 0.5, 0.5, 2.6], hspace=0.55,
                                left=0.12, right=0.80, top=0.88, bottom=0.08)
        rows = [("attribute\n(bytes / where)", data["attribute"]), (f"{layout.view} leaf", data["leaf"]),
                ("split folio", data["split_rgb"]), ("pinned", data["pin_rgb"])]
        for i, (label, rgb) in enumerate(rows):
            ax = fig.add_subplot(grid[i])
            ax.imshow(rgb, aspect="auto", extent=(lo, hi, 0, 1), interpolation="nearest")
            ax.set_yticks([])
            ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
            _address_ticks(ax, int(lo), int(hi))
            if i < len(rows) - 1:
                ax.set_xticklabels([])
        ax = fig.add_subplot(grid[4])
        counts = layout.counts_by_size()
        sizes = layout.arch.sizes
        palette = size_palette(len(sizes))
        values = [counts.get(s, 0) for s in sizes]
        names = [format_size(s) + ("*" if layout.arch.leaf(s).contiguous else "") for s in sizes]
        ax.barh(np.arange(len(sizes)), [v if v else np.nan for v in values], color=palette, log=True)
        ax.set_yticks(np.arange(len(sizes)), names)
        for y, v in enumerate(values):
            ax.text(max(v, 0.8), y, f" {v:,}", va="center", fontsize=8)
        ax.set_xlim(0.8, max(values + [10]) * 4)
        ax.set_xlabel("leaves (log scale)   * = contiguous hint", fontsize=8)
        ax.tick_params(labelsize=8)

        meta = layout.meta
        fig.suptitle(f"{meta.get('name') or 'guest_memfd'}: {_addr(meta['size'])}B, backend {meta['backend']}, "
                     f"folio {format_size(meta['folio_size'])} — view {layout.view}, arch {layout.arch.name}: "
                     f"{layout.leaf_count:,} leaves, {int(data['split'].sum()):,} split folios", fontsize=11)
        legend = [Patch(color=PRIVATE_RGB, label="private"), Patch(color=SHARED_RGB, label="shared"),
                  Patch(color=EMPTY_RGB, label="unallocated"), Patch(color=SPLIT_RGB, label="split folio"),
                  Patch(color=PIN_RGB, label="pinned"), Patch(color="white", label="not mapped", ec="0.5")]
        legend += [Patch(color=c, label=f"leaf {n}") for c, n in zip(palette, names)]
        fig.legend(handles=legend, loc="center right", fontsize=8, frameon=False)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()


#: The plugin object the entry point names (an instance, so `load_exporter(...).export(...)` just works).
EXPORTER = PngExporter()
