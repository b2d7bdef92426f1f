"""Allocator-policy workbench: generate guest traces, replay them against backends, compare the results.

  ufsgmem policy generate cc --size 1T --seed 1 -o cc.jsonl
  ufsgmem policy run cc.jsonl pkvm.jsonl --backend anon --backend sim:fragmentation=0.5,page_size=2M \\
          --plots out/ --json out/report.json
  ufsgmem policy validate TRACE...
  ufsgmem policy workloads

Workloads: cc (few large early conversions), pkvm (many small share/unshare cycles), virtio (a moving
ring of shared bounce slots). A backend/policy is NAME[:key=value,...]; page_size=SIZE sets the folio
size, every other option goes to the backend. Replays run in-process on the core (no mount needed).
The trace format and how to read the table and plots: docs/policy.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from ..address import format_size, parse_size
from ..plugins import load_backend
from ..policy import generators, report
from ..policy.replay import BackendSpec, replay
from ..policy.trace import TraceError, load, save

HELP = "generate workload traces and compare allocator policies by replaying them"


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", metavar="ACTION")
    gen = sub.add_parser("generate", help="write a synthetic workload trace")
    gen.add_argument("workload", choices=generators.WORKLOADS)
    gen.add_argument("--size", required=True, help="guest_memfd size (e.g. 64G, 1T)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--records", type=int, default=generators.DEFAULT_RECORDS,
                     help=f"records after create (default {generators.DEFAULT_RECORDS})")
    gen.add_argument("--page-size", help="page_size to put in the create record (optional)")
    gen.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="workload parameter (see `ufsgmem policy workloads`)")
    gen.add_argument("-o", "--output", required=True, help="trace file to write (JSON lines)")

    run = sub.add_parser("run", help="replay traces against backends and compare")
    run.add_argument("traces", nargs="+", metavar="TRACE")
    run.add_argument("--backend", action="append", required=True, metavar="NAME[:key=value,...]",
                     help="a backend/policy to replay against; repeat to compare several")
    run.add_argument("--sample-every", type=int, default=None, metavar="K",
                     help="sample memory and folios every K records (default: about 200 samples)")
    run.add_argument("--layout-every", type=int, default=0, metavar="K",
                     help="also compute the S2 layout every K records (default: only at the end)")
    run.add_argument("--arch", default="x86_64", help="architecture for S2 block sizes (default x86_64)")
    run.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    run.add_argument("--plots", metavar="DIR", help="write folios/memory/s2_blocks/conversions PNGs here")
    run.add_argument("--table", metavar="FILE", help="also write the text table to FILE")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")

    val = sub.add_parser("validate", help="check traces, reporting the first bad line of each")
    val.add_argument("traces", nargs="+", metavar="TRACE")

    sub.add_parser("workloads", help="list the workloads and their parameters")


def run(args) -> int:
    action = getattr(args, "policy_command", None)
    if action is None:
        print("ufsgmem policy: choose an action: generate, run, validate, workloads", file=sys.stderr)
        return 2
    return {"generate": _generate, "run": _run, "validate": _validate, "workloads": _workloads}[action](args)


def _generate(args) -> int:
    params = {}
    for item in args.param:
        key, eq, value = item.partition("=")
        if not eq:
            print(f"ufsgmem policy generate: --param {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        params[key] = value
    try:
        page_size = parse_size(args.page_size) if args.page_size else None
        trace = generators.generate(args.workload, args.size, seed=args.seed, records=args.records,
                                    page_size=page_size, **params)
    except ValueError as exc:
        print(f"ufsgmem policy generate: {exc}", file=sys.stderr)
        return 2
    save(trace, args.output)
    counts = ", ".join(f"{op} {n}" for op, n in trace.counts().items() if n)
    print(f"{args.output}: {trace.name}, {len(trace)} records ({counts})")
    return 0


def _validate(args) -> int:
    bad = 0
    for path in args.traces:
        try:
            trace = load(path)
        except (TraceError, OSError) as exc:
            print(f"{exc}", file=sys.stderr)
            bad += 1
            continue
        print(f"{path}: ok, {trace.name}, {format_size(trace.size)}, {len(trace)} records")
    return 1 if bad else 0


def _param_text(value) -> str:
    if value is None:
        return "auto"
    if isinstance(value, int) and value >= 4096 and value % 4096 == 0:
        return format_size(value)
    return str(value)


def _workloads(args) -> int:
    for name in generators.WORKLOADS:
        params = ", ".join(f"{k}={_param_text(v)}" for k, v in generators.PARAMS[name].items())
        print(f"{name:7} {generators.DESCRIPTIONS[name]}\n        parameters: {params}")
    return 0


class _Progress:
    """Progress on stderr, at most a few lines a second, ending each run's line with its time."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()

    def __call__(self, label: str, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.enabled or (done < total and now - self.last < (0.5 if self.tty else 5.0)):
            return
        self.last = now
        text = f"  {label}: {done}/{total} records ({100 * done // total}%)"
        if self.tty:
            print("\r" + text, end="\n" if done == total else "", file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _run(args) -> int:
    try:
        specs = [BackendSpec.parse(text) for text in args.backend]
        traces = [load(path) for path in args.traces]
    except (ValueError, OSError) as exc:  # TraceError is a ValueError and names FILE:LINE
        print(f"ufsgmem policy run: {exc}", file=sys.stderr)
        return 2
    for spec in specs:  # an unknown name fails now (listing the known ones), not after an hour of replay
        load_backend(spec.name)
    try:
        from ..layout import get_arch
        get_arch(args.arch)
    except ImportError:
        pass  # the report says the S2 counts are missing, and why
    except OSError as exc:  # an unknown arch is a usage error, refused before any replay
        print(f"ufsgmem policy run: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"ufsgmem policy run: {exc}", file=sys.stderr)
        return 2
    progress = _Progress(not args.quiet)
    runs = []
    for trace in traces:
        for spec in specs:
            if not args.quiet:
                print(f"replaying {trace.name} ({format_size(trace.size)}, {len(trace)} records) on "
                      f"{spec.text}", file=sys.stderr)
            runs.append(replay(trace, spec, sample_every=args.sample_every, layout_every=args.layout_every,
                               arch=args.arch, progress=progress))
    text = report.table(runs)
    sys.stdout.write(text)
    if args.table:
        _write(args.table, text)
    if args.json:
        _write(args.json, report.to_json(runs, {"arch": args.arch}))
    if args.plots:
        for path in report.plot(runs, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if any(r.failure for r in runs) else 0
