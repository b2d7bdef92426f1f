"""Measure ufsgmem beside the kernel, shmem and anonymous memory, in one run, with ratios.

Every figure of docs/design.md §5 (P1..P6) is printed next to its reference, with the ratio and whether the
target is met: P1 against the kernel's guest_memfd (and shmem memfd), P2 and P3 against the FUSE floor
server built and measured in the same run, STREAM (conversions per second) against a --hot-path python
mount alternating with the default one. Context figures (read throughput, round trips against the
kernel's punch-hole + refault, the Python hot path's conversions per second, the FUSE page-cache cost)
follow. Each figure is the median of several repetitions; --json writes the raw repetitions, the spread,
the machine and the versions. Needs /dev/fuse. A reference the machine lacks (the kernel's guest_memfd or
/dev/kvm, huge pages, a C compiler for the floor server, root for the CPU latency device, a server that
knows --hot-path) is listed as unavailable with the reason, and the run goes on. hugetlb figures reserve
2 MiB pages for the run and give them back.

A full run takes several minutes (1 GiB mappings, 64 GiB and 1 TiB sparse files); --quick uses small
sizes and few repetitions and finishes in under a minute (a smoke test, not a measurement).
"""

from __future__ import annotations

import json

HELP = "benchmark P1-P6 against the FUSE floor, shmem, and the kernel guest_memfd where there is one"


def configure(parser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write every figure, raw repetitions and machine info")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions (< 1 minute)")


def run(args) -> int:
    from ..bench.suite import Config, report, run as run_suite, to_json

    cfg = Config.quick_config() if args.quick else Config()
    result = run_suite(cfg)
    print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(result), f, indent=2)
        print(f"wrote {args.json}")
    return 0
