"""Measure what held results cost the server: its resident memory with many ``snapshot`` files and
``get_attributes`` results of one fragmented file held open, and after they are closed (report, not assert).

One file of ``--runs`` attribute runs (every other page private), then, on the same mount: the server's
VmRSS before; with ``--held`` snapshots open; after reading each of them to the end; after closing them;
the same for ``--held`` control files each holding a ``get_attributes`` result. The server runs as the
user who mounted, whose results are not bounded, so nothing is refused. ``--tree DIR`` serves the mount
from another checkout (e.g. the code before results were rendered as read; its binding must be built).

Usage:
  .venv/bin/python scripts/results_memory.py [--runs 400000] [--held 80] [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from concurrency_figures import HERE, server  # noqa: E402

from ufsgmem.client import Mount  # noqa: E402
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE  # noqa: E402

PS = 4096
MiB = 1 << 20


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmRSS")


def server_pid(mountpoint: str) -> int:
    """The server of ``mountpoint``: the process whose command line names it (started by ``server``)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mountpoint) in args and any(b"ufsgmem.fuse.server" in a for a in args):
            return int(pid)
    raise RuntimeError(f"no server for {mountpoint}")


def settle(path: str) -> None:
    """RELEASE reaches the server after close returns: a few requests later it has been served."""
    for _ in range(20):
        os.stat(path)
    time.sleep(0.5)


def read_and_close(fds: list[int], ctl_path: str, row) -> None:
    """Read each held result to its end, then close them all, reporting the server's memory after each."""
    size = 0
    for fd in fds:
        size = 0
        while chunk := os.read(fd, 128 << 10):
            size += len(chunk)
    row(f"... each read to the end ({size / MiB:.1f} MiB each)")
    for fd in fds:
        os.close(fd)
    settle(ctl_path)
    row("... closed")


def measure(mountpoint: str, runs: int, held: int) -> None:
    pid = server_pid(mountpoint)
    mount = Mount(mountpoint)
    pages = runs + 1
    f = mount.create("frag", pages * PS, "mmap|init_shared")
    start = time.perf_counter()
    for page in range(1, pages, 2):
        f.set_memory_attributes(page * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    made = time.perf_counter() - start
    with open(os.path.join(mountpoint, "frag", "status")) as s:
        print(f"file: {json.load(s)['attribute_runs']} attribute runs ({made:.0f} s to make)")
    snap_path = os.path.join(mountpoint, "frag", "snapshot")
    ctl_path = os.path.join(mountpoint, "frag", "ctl")

    def row(what: str) -> None:
        print(f"  {what:<44} VmRSS {rss(pid) / MiB:8.1f} MiB")

    settle(ctl_path)
    row("before")
    fds = [os.open(snap_path, os.O_RDONLY) for _ in range(held)]
    row(f"{held} snapshots open")
    read_and_close(fds, ctl_path, row)
    fds = []
    for _ in range(held):
        fd = os.open(ctl_path, os.O_RDWR)
        os.write(fd, b"get_attributes")
        fds.append(fd)
    row(f"{held} get_attributes results held")
    read_and_close(fds, ctl_path, row)
    mount.destroy("frag")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=400_000)
    parser.add_argument("--held", type=int, default=80)
    parser.add_argument("--tree", default=HERE, help="serve from this checkout")
    args = parser.parse_args()
    with server(os.path.abspath(args.tree)) as mountpoint:
        print(f"server from {args.tree}, {time.strftime('%H:%M UTC %Y-%m-%d', time.gmtime())}")
        measure(mountpoint, args.runs, args.held)
    return 0


if __name__ == "__main__":
    sys.exit(main())
