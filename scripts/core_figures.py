#!/usr/bin/env python3
"""Core figures for issue 2: metadata per attribute run and 4 KiB conversion latency, by file size.

Builds a 1 TiB ``sim`` file (no real memory) with about 100 000 attribute runs by converting every
k-th page, reports what the core's run maps cost (``metadata_bytes``; the budget is 128 bytes per run),
then times single 4 KiB conversions, to private and back to shared, at a page far from the other runs,
and ``status()``, and does the same in a 1 GiB file (with few runs and with 100 000 runs). Timing is printed, never
asserted: it belongs here and in ``ufsgmem bench``, not in tests.

``--runmap`` instead times ``RunMap.set`` alone (no guest_memfd around it) in a 2^28-page map with 1,
1 000, 100 000 and 1 000 000 runs, plus a whole-map ``count``: the numbers that show whether an update
still grows with the number of runs beyond the log factor.

    .venv/bin/python scripts/core_figures.py [--runs 100000] [--repeat 2000] [--json FILE]
    .venv/bin/python scripts/core_figures.py --runmap [--repeat 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ufsgmem.address import format_size
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd
from ufsgmem.runmap import RunMap
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE, SZ_1G, SZ_2M

TIB = 1 << 40


def build(size: int, runs: int, page_size: int) -> GuestMemfd:
    """A file of ``size`` with about ``runs`` attribute runs: single pages flipped at even spacing."""
    huge = page_size > PAGE_SIZE
    flags = GUEST_MEMFD_FLAG_MMAP | (0 if huge else GUEST_MEMFD_FLAG_INIT_SHARED)
    g = GuestMemfd(size, flags, backend="sim", page_size=page_size)
    islands = max(0, (runs - 1) // 2)
    if islands:
        to = SHARED if huge else PRIVATE
        stride = (size // PAGE_SIZE) // (islands + 1)
        for i in range(1, islands + 1):
            g.set_memory_attributes(i * stride * PAGE_SIZE, PAGE_SIZE, to)
    return g


def time_conversions(g: GuestMemfd, repeat: int) -> dict:
    """Median and p90 of one 4 KiB conversion each way, at a page between two existing islands."""
    offset = g.size // 2 + 7 * PAGE_SIZE
    start = g.attribute_at(offset)
    other = SHARED if start == PRIVATE else PRIVATE
    there, back = [], []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        g.set_memory_attributes(offset, PAGE_SIZE, other)
        t1 = time.perf_counter_ns()
        g.set_memory_attributes(offset, PAGE_SIZE, start)
        t2 = time.perf_counter_ns()
        there.append(t1 - t0)
        back.append(t2 - t1)
    name = {PRIVATE: "private", SHARED: "shared"}
    return {
        f"to_{name[other]}_median_us": statistics.median(there) / 1000,
        f"to_{name[start]}_median_us": statistics.median(back) / 1000,
        f"to_{name[other]}_p90_us": statistics.quantiles(there, n=10)[-1] / 1000,
        f"to_{name[start]}_p90_us": statistics.quantiles(back, n=10)[-1] / 1000,
    }


def time_status(g: GuestMemfd, repeat: int = 20) -> float:
    """Median of ``status()``, which the policy workbench samples often (page counts, folio counts)."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        g.status()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def figures(size: int, runs: int, page_size: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    g = build(size, runs, page_size)
    built = time.perf_counter() - t0
    try:
        status = g.status()
        attr_bytes = g._attrs.metadata_bytes()
        row = {
            "size": format_size(size), "page_size": format_size(page_size),
            "attribute_runs": status["attribute_runs"],
            "attr_metadata_bytes": attr_bytes,
            "attr_bytes_per_run": attr_bytes / status["attribute_runs"],
            "metadata_bytes": status["metadata_bytes"],
            "metadata_bytes_per_run": status["metadata_bytes"] / status["attribute_runs"],
            "build_seconds": round(built, 2),
            "huge_folios": status["huge_folios"],
        }
        row.update(time_conversions(g, repeat))
        row["status_median_us"] = time_status(g)
        return row
    finally:
        g.close()


def runmap_figures(runs: int, repeat: int, npages: int = 1 << 28) -> dict:
    """Median ``set`` of one page (there and back) and whole-map ``count`` in a map with ``runs`` runs."""
    t0 = time.perf_counter()
    rm = RunMap(npages, 0)
    islands = max(0, (runs - 1) // 2)
    stride = npages // (islands + 1)
    for i in range(1, islands + 1):  # ascending, so building is cheap for any storage
        rm.set(i * stride, i * stride + 1, 1)
    built = time.perf_counter() - t0
    page = npages // 2 + 7
    there, back, count = [], [], []
    for i in range(repeat):
        t0 = time.perf_counter_ns()
        rm.set(page, page + 1, 1)
        t1 = time.perf_counter_ns()
        rm.set(page, page + 1, 0)
        t2 = time.perf_counter_ns()
        there.append(t1 - t0)
        back.append(t2 - t1)
        if i < 50:  # a whole-map count that walks every run takes long at 10^6 runs: 50 samples do
            rm.count(1)
            count.append(time.perf_counter_ns() - t2)
    return {"runs": len(rm), "build_seconds": round(built, 2),
            "set_split_median_us": statistics.median(there) / 1000,
            "set_merge_median_us": statistics.median(back) / 1000,
            "count_median_us": statistics.median(count) / 1000,
            "metadata_bytes_per_run": rm.metadata_bytes() / len(rm),
            "footprint_bytes_per_run": rm.footprint_bytes() / len(rm) if hasattr(rm, "footprint_bytes") else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--runmap", action="store_true", help="time RunMap.set alone at 1 to 10^6 runs")
    args = parser.parse_args(argv)
    if args.runmap:
        rows = [runmap_figures(runs, args.repeat) for runs in (1, 1_000, 100_000, 1_000_000)]
    else:
        rows = core_rows(args)
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def core_rows(args) -> list[dict]:
    return [
        figures(TIB, args.runs, PAGE_SIZE, args.repeat),
        figures(TIB, args.runs, SZ_2M, args.repeat),
        figures(SZ_1G, 1, PAGE_SIZE, args.repeat),
        figures(SZ_1G, args.runs, PAGE_SIZE, args.repeat),
    ]


if __name__ == "__main__":
    sys.exit(main())
