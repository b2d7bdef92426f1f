"""Measure many conversions at once, and what the hand-off to the executor costs a lone one (report, not assert).

``burst``: for each thread count, N threads convert their own 1 MiB (``--each``) to private at the same moment (after a
barrier), through the ioctl on ``mem``: of one file (N MiB) or of N files (1 MiB each), the ranges dirty
in this process's mapping or never mapped (clean). Reports the time from the barrier until the last one
returns, and the latency of ``statvfs(MOUNTPOINT)`` (always a request to the server: a stat of ``ctl``
is answered from the kernel's attribute cache) asked over and over while they run. A burst that does not
finish within ``--timeout`` aborts the connection and is reported as a hang.

``p3``: P3's round trip (4 KiB shared->private->shared through the ioctl, the page dirtied in another
process just before) and P3.clean (a page nobody maps), on two servers mounted side by side and measured
in alternating blocks: this tree's, and ``--tree OLD`` (another checkout, e.g. the commit before the
hand-off; its compiled binding must be built) or this tree with ``--inline-slots`` set.

Usage:
  .venv/bin/python scripts/concurrency_figures.py burst [--threads 32,64,128,256,512] [--timeout 120]
  .venv/bin/python scripts/concurrency_figures.py p3 [--reps 300] [--blocks 6] (--tree DIR | --inline-slots N)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from ufsgmem.address import parse_size
from ufsgmem.bench.dirtier import Dirtier
from ufsgmem.client import GmemFile, Mount
from ufsgmem.mounts import unmount
from ufsgmem.fuse import server as fuse_server
from ufsgmem import mounts
from ufsgmem.fuse.abort import abort_mount
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

MiB = 1 << 20
PS = 4096
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A server started by hand: optionally with lowlevel.INLINE_SLOTS set first (ignored by trees without it).
SERVER = """
import sys
import ufsgmem.fuse.lowlevel as lowlevel
if sys.argv[1] != "-":
    lowlevel.INLINE_SLOTS = int(sys.argv[1])
from ufsgmem.fuse.server import main
sys.exit(main(sys.argv[2:]))
"""


@contextlib.contextmanager
def server(tree: str = HERE, inline_slots: int | None = None):
    """A mount served from source tree ``tree``; unmounted (and aborted if need be) at the end."""
    path = tempfile.mkdtemp(prefix="ufsgmem-conc-")
    env = dict(os.environ, PYTHONPATH=tree)
    read_end, write_end = os.pipe()
    log = open(fuse_server.logfile_path(path), "ab")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, "-" if inline_slots is None else str(inline_slots),
                             "--ready-fd", str(write_end), path], pass_fds=(write_end,), env=env, cwd=tree,
                            start_new_session=True, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode().strip()
    if not message.startswith("ready"):
        raise RuntimeError(f"server from {tree}: {message or proc.wait()}")
    try:
        yield path
    finally:
        with open(fuse_server.logfile_path(path)) as f:
            text = f.read()
        if any(word in text for word in (" WARNING ", " ERROR ", "Traceback")):
            print(f"server log:\n{text}", file=sys.stderr)
        if mounts.mount_type(path):
            unmount(path, timeout=10)
        if mounts.mount_type(path):
            abort_mount(path)
            unmount(path, timeout=10)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(fuse_server.logfile_path(path))
        with contextlib.suppress(OSError):
            os.rmdir(path)


# --- burst ------------------------------------------------------------------------------------------
def burst(mountpoint: str, threads: int, many_files: bool, dirty: bool, timeout: float, each: int = MiB) -> dict:
    mount = Mount(mountpoint)
    names = [f"b{i}" for i in range(threads)] if many_files else ["b"]
    for name in names:
        mount.create(name, each if many_files else threads * each, "mmap|init_shared")
    files = [GmemFile(os.path.join(mountpoint, n)) for n in names]
    jobs = [(files[i], 0) if many_files else (files[0], i * each) for i in range(threads)]
    maps = []
    if dirty:
        for f in files:
            m = f.map()
            m.array()[:] = 1  # every page dirty in this process
            maps.append(m)
    barrier = threading.Barrier(threads + 1)
    ends = [None] * threads
    errors = []

    def convert(i: int) -> None:
        f, offset = jobs[i]
        try:
            barrier.wait(timeout)
            f.set_memory_attributes(offset, each, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            ends[i] = time.perf_counter()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    stop = threading.Event()
    probes: list[float] = []

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            try:
                os.statvfs(mountpoint)
            except OSError as exc:
                errors.append(exc)
                return
            probes.append(time.perf_counter() - t)
            time.sleep(0.002)

    workers = [threading.Thread(target=convert, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    prober = threading.Thread(target=probe, daemon=True)
    barrier.wait(timeout)
    start = time.perf_counter()
    prober.start()
    deadline = time.monotonic() + timeout
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    hung = any(w.is_alive() for w in workers)
    if hung:
        abort_mount(mountpoint)
        for w in workers:
            w.join(10)
    stop.set()
    prober.join(10)
    finished = [e for e in ends if e is not None]
    result = {"threads": threads, "files": len(files), "dirty": dirty, "hung": hung, "errors": len(errors),
              "all_done_s": max(finished) - start if finished and not hung else None,
              "statvfs_n": len(probes),
              "statvfs_median_ms": 1e3 * statistics.median(probes) if probes else None,
              "statvfs_max_ms": 1e3 * max(probes) if probes else None}
    if not hung:
        for m in maps:
            m.close()
        for f, name in zip(files, names):
            f.close()
            mount.destroy(name)
    return result


def run_burst(args) -> None:
    counts = [int(n) for n in args.threads.split(",")]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"{os.cpu_count()} CPUs, tree {args.tree}")
    print("| threads | files | pages | all done | statvfs during it: n, median, max |")
    print("|---|---|---|---|---|")
    for many in (False, True):
        for dirty in (True, False):
            for n in counts:
                with server(args.tree) as mountpoint:  # a fresh mount per case: a hang must not spoil the next
                    r = burst(mountpoint, n, many, dirty, args.timeout, parse_size(args.each))
                done = f"**hung** (aborted after {args.timeout:.0f} s)" if r["hung"] else \
                    f"{r['all_done_s']:.2f} s" if r["all_done_s"] is not None else "none finished"
                if r["errors"]:
                    done += f", {r['errors']} errors"
                lat = "none answered" if not r["statvfs_n"] else \
                    f"{r['statvfs_n']}, {r['statvfs_median_ms']:.2f} ms, {r['statvfs_max_ms']:.1f} ms"
                print(f"| {n} | {r['files']} | {'dirty' if dirty else 'clean'} | {done} | {lat} |", flush=True)


# --- p3 -----------------------------------------------------------------------------------------------
def round_trip(f: GmemFile, offset: int) -> float:
    start = time.perf_counter()
    f.set_memory_attributes(offset, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    f.set_memory_attributes(offset, PS, 0)
    return time.perf_counter() - start


@contextlib.contextmanager
def p3_setting(mountpoint: str, size: int):
    mount = Mount(mountpoint)
    f = mount.create("p3", size, "mmap|init_shared")
    try:
        with Dirtier(os.path.join(f.path, "mem"), size) as dirtier:
            yield f, dirtier
    finally:
        f.close()
        mount.destroy("p3")


def run_p3(args) -> None:
    size = 64 * MiB
    other = ("tree " + args.tree) if args.tree else f"inline_slots={args.inline_slots}"
    series = {name: {"dirty": [], "clean": []} for name in ("this", "other")}
    with server() as ours, server(args.tree or HERE, args.inline_slots) as theirs, \
            p3_setting(ours, size) as a, p3_setting(theirs, size) as b:
        rep = 0
        for block in range(args.blocks):
            for name, (f, dirtier) in (("this", a), ("other", b)) if block % 2 == 0 else (("other", b), ("this", a)):
                for i in range(args.reps // args.blocks):
                    offset = ((rep + i) * PS) % (size // 2)
                    dirtier.dirty(offset, PS)
                    series[name]["dirty"].append(round_trip(f, offset))
                    series[name]["clean"].append(round_trip(f, size // 2 + offset))
            rep += args.reps // args.blocks
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}, "
          f"{args.reps} round trips each in {args.blocks} alternating blocks; other = {other}")
    for kind in ("dirty", "clean"):
        mine, theirs = (np.array(series[n][kind]) * 1e6 for n in ("this", "other"))
        print(f"P3{'' if kind == 'dirty' else '.clean'}: this tree median {np.median(mine):.0f} µs "
              f"(p10 {np.percentile(mine, 10):.0f}, p90 {np.percentile(mine, 90):.0f}); other median "
              f"{np.median(theirs):.0f} µs (p10 {np.percentile(theirs, 10):.0f}, "
              f"p90 {np.percentile(theirs, 90):.0f}); "
              f"ratio {np.median(mine) / np.median(theirs):.2f}")


@contextlib.contextmanager
def registered():
    """Count as a test run (tests/conftest.py): a suite finishing meanwhile then leaves our mounts alone."""
    runs = "/run/ufsgmem/test-runs"
    os.makedirs(runs, exist_ok=True)
    mark = os.path.join(runs, str(os.getpid()))
    open(mark, "w").close()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(mark)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("burst")
    b.add_argument("--threads", default="32,64,128,256,512")
    b.add_argument("--timeout", type=float, default=120.0)
    b.add_argument("--each", default="1M", help="bytes each thread converts (default 1M)")
    b.add_argument("--tree", default=HERE, help="serve from this source tree (default: this one)")
    p = sub.add_parser("p3")
    p.add_argument("--reps", type=int, default=300)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--tree", help="the other server's source tree")
    p.add_argument("--inline-slots", type=int, help="the other server: this tree with lowlevel.INLINE_SLOTS set")
    args = parser.parse_args()
    if args.what == "p3" and not args.tree and args.inline_slots is None:
        parser.error("p3 needs --tree or --inline-slots")
    with registered():
        run_burst(args) if args.what == "burst" else run_p3(args)


if __name__ == "__main__":
    main()
