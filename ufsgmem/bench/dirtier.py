"""A second process that keeps a ``mem`` file mapped and dirties ranges on request.

P2 asks for the round trip of a range that is *mapped and dirty in another process*: the revocation must
then unmap it there and write the dirty pages back through FUSE before the attribute flips. The dirtier is
this module run as a child (``python -m ufsgmem.bench.dirtier PATH SIZE``); it reads ``offset length``
lines on stdin, writes one byte per page of that range through its mapping, and answers ``ok``.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np

from ..uapi import PAGE_SIZE


class Dirtier:
    def __init__(self, path: str, size: int):
        self._proc = subprocess.Popen([sys.executable, "-m", "ufsgmem.bench.dirtier", path, str(size)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._counter = 0

    def dirty(self, offset: int, length: int) -> None:
        self._counter = (self._counter + 1) % 250
        self._proc.stdin.write(f"{offset} {length} {self._counter + 1}\n")
        self._proc.stdin.flush()
        answer = self._proc.stdout.readline().strip()
        if answer != "ok":
            raise RuntimeError(f"dirtier failed at {offset:#x}+{length:#x}: {answer or 'it died'}")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def main(path: str, size: int) -> int:
    fd = os.open(path, os.O_RDWR)
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    pages = np.frombuffer(mapping, dtype=np.uint8)
    for line in sys.stdin:
        offset, length, value = (int(v) for v in line.split())
        pages[offset:offset + length:PAGE_SIZE] = value
        print("ok", flush=True)
    del pages
    mapping.close()
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
