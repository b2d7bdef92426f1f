"""P5 (docs/design.md §5): export a 1 TiB guest with 100 000 shared 4 KiB holes in all three views, timed.

The snapshot is built directly (one physically contiguous extent, 1 GiB folios, the folios holding a hole
split), so the figure is the layout and exporter cost alone. ``ufsgmem bench`` can call :func:`measure`;
by hand: ``python -m ufsgmem.layout.bench [EXPORTER]`` (default json).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from ..plugins import export
from ..snapshot import Snapshot

PAGE = 4096


def holes_snapshot(size: int = 1 << 40, holes: int = 100_000, seed: int = 1) -> Snapshot:
    """``size`` bytes of private memory with ``holes`` distinct, non-adjacent 4 KiB shared pages."""
    rng = np.random.default_rng(seed)
    pages = np.sort(rng.choice(size // PAGE // 2, holes, replace=False)) * 2 * PAGE
    starts = np.empty(2 * holes + 1, dtype=np.int64)
    starts[0], starts[1::2], starts[2::2] = 0, pages, pages + PAGE
    private = np.ones(len(starts), dtype=bool)
    private[1::2] = False
    if starts[-1] == size:
        starts, private = starts[:-1], private[:-1]
    return Snapshot.build(size=size, flags=0, backend="sim", folio_size=1 << 30, attr_starts=starts,
                          attr_private=private, extents=[(0, 1 << 42, size)],
                          split_folios=np.unique(pages >> 30) << 30)


def measure(exporter: str = "json", arch: str = "x86_64", snapshot: Snapshot | None = None) -> dict:
    """Seconds per view and in total, output bytes, and attribute-run metadata bytes per run."""
    snapshot = snapshot if snapshot is not None else holes_snapshot()
    result = {"exporter": exporter, "arch": arch, "runs": len(snapshot.attr_starts), "views": {}}
    total = 0.0
    for view in ("guest", "shared", "kvm"):
        t0 = time.perf_counter()
        data = export(exporter, snapshot, view=view, arch=arch)
        dt = time.perf_counter() - t0
        total += dt
        result["views"][view] = {"seconds": round(dt, 4), "bytes": len(data)}
    result["seconds"] = round(total, 4)
    result["metadata_bytes_per_run"] = snapshot.metadata_bytes() / len(snapshot.attr_starts)
    return result


if __name__ == "__main__":
    import json
    print(json.dumps(measure(*(sys.argv[1:2] or ["json"])), indent=2))
