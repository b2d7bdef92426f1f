"""``python -m ufsgmem.conformance [--reference auto|live|record] [--record-file FILE]
[--write FILE | --check FILE | --record [FILE]] [--mountpoint DIR] [--subject ufsgmem|run|core]``

Runs every case on ufsgmem and compares it with the kernel's guest_memfd, then prints the verdicts (exit
status 1 on any FAIL). The kernel's side is the live kernel where this machine's kernel has guest_memfd,
otherwise the kept record (``ufsgmem/conformance/records/``: the one of the running kernel's release if
there is one, else the newest); ``--reference`` forces either. Compared with a live kernel, the run also
checks the record and prints each case where the kernel no longer does what was recorded as a
``KERNEL CHANGE`` (exit status 1 too: record the kernel).

``--record`` runs every case on the live kernel only and writes its observations, the kernel release,
the date and the KVM capabilities to FILE (default ``ufsgmem/conformance/records/linux-RELEASE.json``);
it needs a kernel with guest_memfd (exit status 2 without one, with the reason).

With ``--write`` it writes the compatibility page; with ``--check`` it exits 1 if the page differs from a
fresh run. Without ``--mountpoint`` it mounts ufsgmem on a temporary directory (``ufsgmem mount``) and
unmounts it afterwards. ``--subject core`` compares the in-process core instead (no mount needed).

The mount's run (the default) also runs every case as a program under ``ufsgmem run`` (the third
subject, :mod:`.under_run`) and the page gets its column, and the list of the mount's deviations ``run``
removes; where ``run`` cannot work here, the page says why instead. ``--subject run`` runs only that
subject (a failure of the child under ``run`` is exit status 1 with its output, never an empty column).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .. import kvm
from . import record as records
from . import report, runner, under_run
from .subjects import CoreSubject, MountSubject, temporary_mount


def reference_for(choice: str, record_file: str | None) -> tuple[runner.Reference, records.Record | None]:
    """The reference to judge against, and (for a live one) the record to check the live kernel with."""
    live_reason = kvm.skip_reason()
    if choice == "live" and live_reason:
        raise records.RecordError(f"the live kernel guest_memfd is unavailable: {live_reason}")
    # the running kernel's own record only where it is the live reference: compared with a record, every
    # machine uses the newest, so the page it writes is the same everywhere
    release = os.uname().release if live_reason is None else None
    record = records.load(record_file) if record_file else records.select(release)
    if choice == "record" or (choice == "auto" and live_reason):
        return record, None
    return runner.LiveKernel(), record


def run(subject: str, mountpoint: str | None, reference, record=None) -> list[runner.Verdict]:
    if subject == "core":
        return runner.run(CoreSubject, "core", reference, record=record)
    if subject == "run":
        return runner.judge_observations(under_run.observe_all(), "run", reference, record=record)
    with contextlib.ExitStack() as stack:
        if mountpoint is None:
            mountpoint = stack.enter_context(temporary_mount())
        return runner.run(lambda: MountSubject(mountpoint), "ufsgmem", reference, record=record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.conformance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="FILE", help="write the compatibility page (markdown)")
    what.add_argument("--check", metavar="FILE", help="exit 1 if FILE differs from a fresh run")
    what.add_argument("--record", metavar="FILE", nargs="?", const="",
                      help="record the live kernel's observations (default: records/linux-RELEASE.json)")
    parser.add_argument("--reference", choices=("auto", "live", "record"), default="auto",
                        help="what ufsgmem is compared with (auto: the live kernel where it has guest_memfd)")
    parser.add_argument("--record-file", metavar="FILE", help="compare with this record instead of the kept one")
    parser.add_argument("--mountpoint", help="use this existing ufsgmem mount")
    parser.add_argument("--subject", choices=("ufsgmem", "run", "core"), default="ufsgmem",
                        help="a mount (and the same cases under ufsgmem run), only ufsgmem run, or the core")
    args = parser.parse_args(argv)
    try:
        if args.record is not None:
            made = records.record_live_kernel(args.record or None)
            print(f"recorded {len(made.entries)} cases of Linux {made.release} ({made.date}) in {made.path}")
            return 0
        reference, record = reference_for(args.reference, args.record_file)
    except records.RecordError as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 2
    print(f"conformance: comparing {args.subject} with the {reference.label}"
          + (f", and the live kernel with the {record.label}" if record is not None else ""), file=sys.stderr)
    try:
        verdicts = run(args.subject, args.mountpoint, reference, record)
        under = None
        if args.subject == "ufsgmem":
            reason = under_run.unavailable_reason()
            under = reason or run("run", None, reference, record)
    except under_run.RunFailed as exc:
        print(f"conformance: {exc}", file=sys.stderr)
        return 1
    print(report.console(verdicts, record))
    if under is not None:
        print("under ufsgmem run: " + (f"not run here: {under}" if isinstance(under, str)
                                       else "\n" + report.console(under, record)))
    both = verdicts + (under if isinstance(under, list) else [])
    counts = report.summary(both)
    changes = [v for v in verdicts if v.kernel_change]
    page = report.render(verdicts, args.subject, reference, record, run=under)
    if args.write:
        with open(args.write, "w") as f:
            f.write(page)
    if args.check:
        with open(args.check) as f:
            if f.read() != page:
                print(f"conformance: {args.check} is stale; regenerate it with --write", file=sys.stderr)
                return 1
    return 1 if counts["FAIL"] or changes else 0


if __name__ == "__main__":
    sys.exit(main())
