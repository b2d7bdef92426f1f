"""Measure what one user's flood of guest writes makes the server hold (report, not assert).

On an ``--allow-other`` mount with the default per-user bounds, an unprivileged user (uid 65533, no
account needed) creates ``--files`` files of 1 MiB and runs a thread per file that pwrites 1 MiB to its
file's ``guest`` over and over for ``--seconds``; the kernel sends one direct write of an inode at a time,
so a thread per file is what puts many writes in flight. Meanwhile the server's RssAnon (its own memory, not the files' shared pages) is sampled every
20 ms. Reports the peak and the median, and how many writes succeeded or were refused. Run it with
``PYTHONPATH=OTHER_TREE`` to measure another checkout (the server inherits it).

Usage:
  .venv/bin/python scripts/flood_memory.py [--files 256] [--seconds 10]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import statistics
import sys
import threading
import time

from ufsgmem.testing import mounted

MiB = 1 << 20
MALLORY = 65533


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):  # the server's own memory: not the files' (shared memfd pages)
                return int(line.split()[1]) << 10
    return 0


def flood(mountpoint: str, files: int, seconds: float, out: int) -> None:
    os.setgroups([])
    os.setresgid(MALLORY, MALLORY, MALLORY)
    os.setresuid(MALLORY, MALLORY, MALLORY)
    fds = []
    for i in range(files):
        with open(os.path.join(mountpoint, "ctl"), "w") as ctl:
            ctl.write(f"create flood{i} size={MiB}")
        fds.append(os.open(os.path.join(mountpoint, f"flood{i}", "guest"), os.O_RDWR))
    outcomes: dict[str, int] = {}
    os.write(out, b"go\n")
    deadline = time.monotonic() + seconds
    data = b"\xa5" * MiB

    def writer(fd: int) -> None:
        while time.monotonic() < deadline:
            try:
                os.pwrite(fd, data, 0)
                outcome = "ok"
            except OSError as exc:
                outcome = errno.errorcode[exc.errno]
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    pool = [threading.Thread(target=writer, args=(fd,)) for fd in fds]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for i, fd in enumerate(fds):
        os.close(fd)
        with open(os.path.join(mountpoint, "ctl"), "w") as ctl:
            ctl.write(f"destroy flood{i}")
    os.write(out, (json.dumps(outcomes) + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--per-user", default="", help="ufsgmem mount --per-user bounds (default: the defaults)")
    args = parser.parse_args()
    with mounted(allow_other=True, prefix="ufsgmem-flood-", **({"per_user": args.per_user} if args.per_user else {})) as mnt:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            code = 0
            try:
                flood(mnt.path, args.files, args.seconds, write_end)
            except BaseException as exc:  # noqa: BLE001 - to the parent
                os.write(write_end, f"failed: {exc!r}\n".encode())
                code = 1
            os._exit(code)
        os.close(write_end)
        lines = os.fdopen(read_end)
        before = rss(mnt.pid)
        started = lines.readline().strip()
        if started != "go":
            print(started)
            os.waitpid(pid, 0)
            return 1
        samples = []
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            samples.append(rss(mnt.pid))
            time.sleep(0.02)
        print(f"server from {os.path.dirname(sys.modules['ufsgmem'].__file__)}, "
              f"{time.strftime('%H:%M UTC %Y-%m-%d', time.gmtime())}: {args.files} files, {args.seconds:g} s")
        print(f"  writes: {lines.readline().strip()}")
        print(f"  server RssAnon before {before / MiB:.1f} MiB, during: median {statistics.median(samples) / MiB:.1f} "
              f"MiB, peak {max(samples) / MiB:.1f} MiB, after {rss(mnt.pid) / MiB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
