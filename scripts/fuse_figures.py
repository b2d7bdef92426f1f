"""Measure the FUSE data path (report, not assert): P1 first-touch write throughput of a 1 GiB ``mem``
mapping, and P2 the 2 MiB shared->private->shared round trip with the range mapped and dirty in another
process. Usage: .venv/bin/python scripts/fuse_figures.py [--size 1G] [--rounds 20]"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from fusefix import Gmem, mounted  # noqa: E402

from ufsgmem.address import parse_size  # noqa: E402


def first_touch(g: Gmem) -> float:
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = mmap.mmap(fd, g.size, mmap.MAP_SHARED)
    os.close(fd)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc = ctypes.CDLL(None)
    t0 = time.perf_counter()
    for off in range(0, g.size, 4096):  # one write per 4K page, as the kernel baseline does
        ctypes.memset(addr + off, 1, 1)
    elapsed = time.perf_counter() - t0
    del libc
    m.close()
    return g.size / elapsed / 1e9


def round_trips(g: Gmem, rounds: int) -> list[float]:
    size = 2 << 20
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other process: map and dirty the range before every round
        fd = os.open(g.path("mem"), os.O_RDWR)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED)
        while os.read(r, 1) == b"d":
            m[:] = b"\x5a" * size
            os.write(w2, b"k")
        os._exit(0)
    ctl = os.open(g.path("ctl"), os.O_RDWR)
    times = []
    for _ in range(rounds):
        os.write(w, b"d")
        os.read(r2, 1)
        t0 = time.perf_counter()
        os.write(ctl, f"set_memory_attributes offset=0 size={size} attributes=private".encode())
        os.write(ctl, f"set_memory_attributes offset=0 size={size} attributes=shared".encode())
        times.append(time.perf_counter() - t0)
    os.write(w, b"q")
    os.waitpid(pid, 0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    size = parse_size(args.size)
    with mounted() as mount:
        mount.ctl(f"create p1 size={size} flags=mmap|init_shared")
        g = Gmem(mount, "p1", size)
        print(f"P1 first-touch write, {args.size} mem mapping: {first_touch(g):.2f} GB/s")
        mount.ctl("create p2 size=2M flags=mmap|init_shared")
        times = round_trips(Gmem(mount, "p2", 2 << 20), args.rounds)
        print(f"P2 2 MiB shared->private->shared, dirty in another process: median "
              f"{statistics.median(times) * 1e3:.3f} ms, min {min(times) * 1e3:.3f} ms ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
