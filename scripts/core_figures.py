#!/usr/bin/env python3
"""Core figures for issue 2: metadata per attribute run and 4 KiB conversion latency, by file size.

Builds a 1 TiB ``sim`` file (no real memory) with about 100 000 attribute runs by converting every
k-th page, reports what the core's run maps cost (``metadata_bytes``; the budget is 128 bytes per run),
then times single 4 KiB conversions, to private and back to shared, at a page far from the other runs,
and does the same in a 1 GiB file (with few runs and with 100 000 runs). Timing is printed, never
asserted: it belongs here and in ``ufsgmem bench``, not in tests.

    .venv/bin/python scripts/core_figures.py [--runs 100000] [--repeat 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from ufsgmem.address import format_size
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd
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
        return row
    finally:
        g.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    rows = [
        figures(TIB, args.runs, PAGE_SIZE, args.repeat),
        figures(TIB, args.runs, SZ_2M, args.repeat),
        figures(SZ_1G, 1, PAGE_SIZE, args.repeat),
        figures(SZ_1G, args.runs, PAGE_SIZE, args.repeat),
    ]
    for row in rows:
        print(json.dumps(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
