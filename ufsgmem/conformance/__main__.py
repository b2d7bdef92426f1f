"""``python -m ufsgmem.conformance [--write FILE | --check FILE] [--mountpoint DIR] [--subject core]``

Runs every case on the kernel and on ufsgmem and prints the verdicts (exit status 1 on any FAIL). With
``--write`` it writes the compatibility page; with ``--check`` it exits 1 if the page differs from a
fresh run. Without ``--mountpoint`` it mounts ufsgmem on a temporary directory (``ufsgmem mount``) and
unmounts it afterwards. ``--subject core`` compares the in-process core instead (no mount needed).
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from .. import kvm
from . import report, runner
from .subjects import CoreSubject, KernelSubject, MountSubject, temporary_mount


def run(subject: str, mountpoint: str | None) -> list[runner.Verdict]:
    if subject == "core":
        return runner.run(CoreSubject, "core", KernelSubject)
    with contextlib.ExitStack() as stack:
        if mountpoint is None:
            mountpoint = stack.enter_context(temporary_mount())
        return runner.run(lambda: MountSubject(mountpoint), "ufsgmem", KernelSubject)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="FILE", help="write the compatibility page (markdown)")
    what.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from a fresh run")
    parser.add_argument("--mountpoint", help="use this existing ufsgmem mount")
    parser.add_argument("--subject", choices=("ufsgmem", "core"), default="ufsgmem")
    args = parser.parse_args(argv)
    reason = kvm.skip_reason()
    if reason:
        print(f"conformance: the kernel reference is unavailable: {reason}", file=sys.stderr)
        return 2
    verdicts = run(args.subject, args.mountpoint)
    for v in verdicts:
        print(f"{v.verdict:9} {v.case.name}" + (f"  ({v.why})" if v.verdict == "FAIL" else ""))
    counts = report.summary(verdicts)
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    page = report.render(verdicts, "ufsgmem" if args.subject == "ufsgmem" else "core")
    if args.write:
        with open(args.write, "w") as f:
            f.write(page)
    if args.check:
        with open(args.check) as f:
            if f.read() != page:
                print(f"conformance: {args.check} is stale; regenerate it with --write", file=sys.stderr)
                return 1
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
