"""Several processes at once: map, write, convert disjoint and overlapping ranges; nothing lost, no
deadlock, and no private byte ever reaches the host side.

* owners: each owns a region; it writes a pattern through its mapping, converts the region to private,
  checks it through the guest, writes a secret and then a scrub pattern through the guest, converts back
  and checks the scrub pattern through a fresh mapping;
* flippers: two processes convert random, overlapping sub-ranges of one shared region to private and back;
  the region's content must survive every conversion;
* a reader tries read(2) and sendfile(2) of the file the whole time: both are EINVAL (guest_memfd has no
  read), so no byte may ever come back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random

import pytest

from fusefix import requires_fuse
from test_fuse_mem import map_mem

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096
REGION = 64 * PS
SECRET = b"PRIVATE-SECRET!!"
ROUNDS = 12


def fork(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"worker {os.getpid()}: {exc!r}\n".encode())
            code = 1
        os._exit(code)
    return pid


def owner(g, index: int) -> None:
    base = index * REGION
    rng = random.Random(index)
    for _ in range(ROUNDS):
        pattern = rng.randbytes(REGION)
        m = map_mem(g)
        m[base:base + REGION] = pattern
        g.convert(base, REGION, private=True)
        assert hashlib.sha256(g.guest_read(base, REGION)).digest() == hashlib.sha256(pattern).digest()
        g.guest_write(base, SECRET * (REGION // len(SECRET)))
        scrub = rng.randbytes(REGION)
        g.guest_write(base, scrub)
        g.convert(base, REGION, private=False)
        assert m[base:base + REGION] == scrub, "the old mapping sees the guest's scrub"
        m.close()


def flipper(g, base: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(ROUNDS * 3):
        first = rng.randrange(REGION // PS)
        count = rng.randrange(1, REGION // PS - first + 1)
        for private in (True, False):
            g.convert(base + first * PS, count * PS, private=private)


def reader(g, stop_fd: int) -> None:
    """read(2) and sendfile(2) of mem, the whole time: guest_memfd has no read, so every attempt is EINVAL
    and no byte, shared or private, ever comes back that way (mappings are the only way in)."""
    import select
    with open(os.devnull, "wb") as sink:
        while not select.select([stop_fd], [], [], 0)[0]:
            fd = os.open(g.path("mem"), os.O_RDONLY)
            try:
                for attempt in (lambda: os.read(fd, 16 * PS), lambda: os.sendfile(sink.fileno(), fd, 0, 16 * PS)):
                    try:
                        got = attempt()
                    except OSError as exc:
                        assert exc.errno in (errno.EINVAL, errno.ESPIPE), exc
                    else:
                        raise AssertionError(f"read {got!r:.40} from mem")
            finally:
                os.close(fd)


@pytest.mark.slow
def test_concurrent_processes(gmem):
    owners = 3
    g = gmem((owners + 1) * REGION)
    flip_base = owners * REGION
    initial = os.urandom(REGION)
    m = map_mem(g)
    m[flip_base:flip_base + REGION] = initial
    m.close()
    stop_r, stop_w = os.pipe()
    reader_pid = fork(lambda: reader(g, stop_r))
    workers = [fork(lambda i=i: owner(g, i)) for i in range(owners)]
    workers += [fork(lambda s=s: flipper(g, flip_base, s)) for s in (1, 2)]
    failed = [pid for pid in workers if os.waitpid(pid, 0)[1] != 0]
    os.write(stop_w, b"x")
    reader_status = os.waitpid(reader_pid, 0)[1]
    os.close(stop_r)
    os.close(stop_w)
    assert not failed, f"{len(failed)} worker(s) failed (see stderr)"
    assert reader_status == 0, "the reader saw a secret or an unexpected error"
    g.convert(flip_base, REGION, private=False)
    assert g.guest_read(flip_base, REGION) == initial, "content survived every overlapping conversion"
    assert map_mem(g)[flip_base:flip_base + REGION] == initial
