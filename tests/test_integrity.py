"""Data integrity under conversions: four writers on one file while a fifth process converts random ranges
private and back (issue 9: "every byte written while shared is there at the end; no process ever reads
bytes it did not write").

The file is cut into 64-byte records; writer ``w`` owns every fourth record (``r % 4 == w``), so every
page holds records of all four writers and every conversion hits all of them. A record is versioned::

    "UGMR" | writer u16 | 0 u16 | index u32 | seq u64 | payload (28 bytes, keyed by SEED) | blake2b-128

* **writers** map ``mem`` once (MAP_SHARED) and write records through that mapping with plain stores.
  A store to a page that is private is SIGBUS, which Python cannot survive, so every batch of writes runs
  in a forked grandchild that shares the mapping: for each record it reads the record and checks that it
  holds only bytes its writer may have put there, stores the new version, reads it back, and then
  acknowledges it through a pipe. When the grandchild dies of SIGBUS, the writes it acknowledged are
  done, the one in flight may be torn (it becomes a possible value of that record), and the record is
  written again later with a new version. Any other death, or a check that fails, fails the test.
* the **converter** has its own descriptor of ``mem`` and calls ``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)``
  directly: it keeps up to a few random page ranges private at once, converting a new one private or an
  old one back to shared, until every writer has done its share of new writes; then it converts the whole
  file shared and tells the writers, who finish their pending writes (any SIGBUS now is a failure) and
  check all their records through their own mapping.
* the **parent** then compares every record, through the guest view and through a fresh mapping, with
  the last version its writer had acknowledged (zeros for a record never written): a lost write and a
  foreign byte are both reported by record.

Everything is bounded: a deadline for the whole run, one per batch, and one for each wait on a pipe;
each child runs in its own process group, which is killed (by its id) when anything fails. Seeds are
fixed; processes synchronise through pipes only.
"""

from __future__ import annotations

import faulthandler
import fcntl
import hashlib
import json
import mmap
import os
import random
import select
import signal
import struct
import sys
import time
import traceback

import pytest

from fusefix import requires_fuse
from ufsgmem.uapi import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SIZE,
)

pytestmark = [requires_fuse, pytest.mark.fuse]

SEED = 0x5EED_0009
WRITERS = 4
SIZE = 1 << 20
PAGES = SIZE // PAGE_SIZE
REC = 64
RECORDS = SIZE // REC
PER_WRITER = RECORDS // WRITERS
HOT = 64                   # half of the writes go to 64 records per writer, spread one per 4 pages
NEW_WRITES = 4000          # new versions per writer while the converter runs
BATCH = 24                 # writes per grandchild (fewer when one dies of SIGBUS)
MAX_PRIVATE = 4            # ranges the converter keeps private at once
MAX_RANGE = 12             # pages per range
MAX_CONVERSIONS = 100000   # the converter stops at this many even if the writers are slow
BUDGET = 60.0              # seconds for the whole run, children included
BATCH_TIMEOUT = 20.0       # seconds for one grandchild

HEADER = struct.Struct("<4sHHIQ")
MAGIC = b"UGMR"
PAYLOAD = REC - HEADER.size - 16


def record(writer: int, index: int, seq: int) -> bytes:
    """Version ``seq`` of the writer's record ``index`` (seq 0: never written, zeros)."""
    if seq == 0:
        return bytes(REC)
    head = HEADER.pack(MAGIC, writer, 0, index, seq)
    body = head + hashlib.blake2b(head, digest_size=PAYLOAD, key=SEED.to_bytes(8, "little")).digest()
    return body + hashlib.blake2b(body, digest_size=16).digest()


def describe(data: bytes) -> str:
    """What a record holds, for messages: whose version it is, and whether it is whole."""
    if data == bytes(REC):
        return "zeros"
    magic, writer, _, index, seq = HEADER.unpack_from(data)
    whole = data[-16:] == hashlib.blake2b(data[:-16], digest_size=16).digest()
    return (f"{'whole' if whole else 'TORN/CORRUPT'} record magic={magic!r} writer={writer} index={index} "
            f"seq={seq} bytes={data.hex()}")


def offset_of(writer: int, index: int) -> int:
    return (index * WRITERS + writer) * REC


def possible(data: bytes, candidates: list[bytes]) -> bool:
    """Whether every byte of ``data`` is the same byte of one of ``candidates`` (a torn write mixes the
    version before it with the one in flight, and nothing else)."""
    if data in candidates:
        return True
    return all(any(c[k] == data[k] for c in candidates) for k in range(REC))


# --- plumbing -------------------------------------------------------------------------------------------
class Failed(Exception):
    pass


def read_exactly(fd: int, n: int, deadline: float, what: str) -> bytes:
    """``n`` bytes from a pipe before ``deadline``; Failed on EOF or timeout."""
    got = b""
    while len(got) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise Failed(f"timed out waiting for {what}")
        chunk = os.read(fd, n - len(got))
        if not chunk:
            raise Failed(f"EOF waiting for {what}")
        got += chunk
    return got


def child(body, error_file: str) -> int:
    """Fork a child running ``body()`` in its own process group (so that it can be killed with its
    grandchildren); it exits 0 on success, 1 otherwise, with the traceback on stderr and in
    ``error_file``."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setpgid(0, 0)
            body()
            code = 0
        except BaseException as exc:  # noqa: BLE001
            os.write(2, f"[integrity pid {os.getpid()}] {traceback.format_exc()}".encode())
            with open(error_file, "w") as f:
                f.write(str(exc) if isinstance(exc, Failed) else traceback.format_exc())
        finally:
            os._exit(code)
    try:
        os.setpgid(pid, pid)  # the child does it too; whichever runs first
    except OSError:
        pass
    return pid


def kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass


# --- the converter --------------------------------------------------------------------------------------
def set_attributes(fd: int, offset: int, size: int, attributes: int) -> None:
    arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, attributes, 0, 0, *(0,) * 11))
    fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)


def converter(mem: str, ready_r: int, done_r: int, shared_w: int, out: str, deadline: float) -> None:
    fd = os.open(mem, os.O_RDWR)
    read_exactly(ready_r, WRITERS, deadline, "the writers to map mem")
    rng = random.Random(SEED)
    private: list[tuple[int, int]] = []
    done = conversions = to_private = 0
    while done < WRITERS and conversions < MAX_CONVERSIONS and time.monotonic() < deadline:
        if select.select([done_r], [], [], 0)[0]:
            got = os.read(done_r, WRITERS)
            if not got:
                raise Failed("the writers' pipe closed")
            done += len(got)
            continue
        if len(private) < MAX_PRIVATE and (not private or rng.random() < 0.6):
            first = rng.randrange(PAGES)
            count = rng.randint(1, min(MAX_RANGE, PAGES - first))
            private.append((first, count))
            set_attributes(fd, first * PAGE_SIZE, count * PAGE_SIZE, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            to_private += 1
        else:
            first, count = private.pop(rng.randrange(len(private)))
            set_attributes(fd, first * PAGE_SIZE, count * PAGE_SIZE, 0)
        conversions += 1
    if done < WRITERS:
        read_exactly(done_r, WRITERS - done, deadline, "the writers to finish their new writes")
    set_attributes(fd, 0, SIZE, 0)
    os.close(fd)
    with open(out, "w") as f:
        json.dump({"conversions": conversions, "to_private": to_private}, f)
    os.write(shared_w, b"S" * WRITERS)  # one byte per writer: everything is shared now


# --- a writer -------------------------------------------------------------------------------------------
def run_batch(m: mmap.mmap, writer: int, items: list[tuple[int, int]], candidates: dict[int, list[bytes]],
              ack_w: int) -> None:
    """In the grandchild: check, write, read back and acknowledge each item; dies of SIGBUS on a private
    page. Never returns."""
    faulthandler.disable()  # pytest's handler would print a traceback for every SIGBUS
    signal.signal(signal.SIGBUS, signal.SIG_DFL)
    try:
        for index, seq in items:
            off = offset_of(writer, index)
            before = m[off:off + REC]
            allowed = candidates.get(index, [bytes(REC)])
            if not possible(before, allowed):
                raise Failed(f"writer {writer} read record {index} before writing seq {seq}: "
                             f"{describe(before)}; it may only hold {[describe(c) for c in allowed]}")
            data = record(writer, index, seq)
            m[off:off + REC] = data
            after = m[off:off + REC]
            if after != data:
                raise Failed(f"writer {writer} read record {index} back right after writing seq {seq}: "
                             f"{describe(after)}")
            candidates[index] = [data]
            os.write(ack_w, b"A")
        code = 0
    except Failed as exc:
        os.write(ack_w, b"X" + str(exc).encode())
        code = 3
    except BaseException:  # noqa: BLE001
        os.write(ack_w, b"X" + traceback.format_exc().encode())
        code = 4
    os._exit(code)


def writer_main(mem: str, writer: int, ready_w: int, done_w: int, shared_r: int, out: str,
                deadline: float) -> None:
    fd = os.open(mem, os.O_RDWR)
    m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)  # once: every mmap of mem drops the file's page cache
    os.close(fd)
    os.write(ready_w, b"R")
    rng = random.Random(SEED * 31 + writer)
    candidates: dict[int, list[bytes]] = {}  # what each record may hold (absent: zeros)
    last: dict[int, int] = {}                # the last acknowledged seq of each record
    retry: list[int] = []                    # records whose last write was not acknowledged
    seq = 0
    stats = {"batches": 0, "sigbus": 0, "acked": 0}

    def batch(indexes: list[int], all_shared: bool) -> list[int]:
        """Run one grandchild over ``indexes``; returns those not acknowledged."""
        nonlocal seq
        items = []
        for index in indexes:
            seq += 1
            items.append((index, seq))
        ack_r, ack_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(ack_r)
            run_batch(m, writer, items, candidates, ack_w)
        os.close(ack_w)
        stats["batches"] += 1
        acks = b""
        end = min(deadline, time.monotonic() + BATCH_TIMEOUT)
        try:
            while True:
                left = end - time.monotonic()
                if left <= 0 or not select.select([ack_r], [], [], left)[0]:
                    raise Failed(f"writer {writer}: a batch of {len(items)} writes took over "
                                 f"{BATCH_TIMEOUT:.0f} s (or the run's budget ran out)")
                chunk = os.read(ack_r, 1 << 16)
                if not chunk:
                    break
                acks += chunk
        except BaseException:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(ack_r)
        _, status = os.waitpid(pid, 0)
        ok, _, error = acks.partition(b"X")
        if error or ok.strip(b"A"):
            raise Failed(error.decode(errors="replace") or f"writer {writer}: bad acknowledgements {acks!r}")
        for index, s in items[:len(ok)]:
            candidates[index] = [record(writer, index, s)]
            last[index] = s
        stats["acked"] += len(ok)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and len(ok) == len(items):
            return []
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS):
            raise Failed(f"writer {writer}: a batch ended with status {status:#x} after {len(ok)} of "
                         f"{len(items)} writes")
        if len(ok) == len(items):
            raise Failed(f"writer {writer}: a batch died of SIGBUS after acknowledging all its writes")
        if all_shared:
            index, s = items[len(ok)]
            raise Failed(f"writer {writer}: SIGBUS on record {index} (offset {offset_of(writer, index):#x}, "
                         f"seq {s}) after the whole file was converted back to shared")
        stats["sigbus"] += 1
        index, s = items[len(ok)]  # in flight: it may be there, wholly or torn
        candidates.setdefault(index, [bytes(REC)]).append(record(writer, index, s))
        return [index for index, _ in items[len(ok):]]

    planned = 0
    while planned < NEW_WRITES:
        if time.monotonic() > deadline:
            raise Failed(f"writer {writer}: out of time after {planned} new writes")
        fresh = []
        while planned < NEW_WRITES and len(fresh) < BATCH:
            fresh.append(rng.randrange(HOT) * (PER_WRITER // HOT) if rng.random() < 0.5
                         else rng.randrange(PER_WRITER))
            planned += 1
        # Retries last: a page that was just private is likely to be private still.
        pending = fresh + retry[:BATCH]
        retry = retry[BATCH:] + batch(pending, all_shared=False)
    os.write(done_w, b"D")
    read_exactly(shared_r, 1, deadline, "the converter to make the file shared again")
    while retry:
        retry = retry[BATCH:] + batch(retry[:BATCH], all_shared=True)
    # Everything is shared and every last write acknowledged: check every record of this writer.
    for index in range(PER_WRITER):
        off = offset_of(writer, index)
        want = record(writer, index, last.get(index, 0))
        if m[off:off + REC] != want:
            raise Failed(f"writer {writer}, record {index}: holds {describe(m[off:off + REC])}, "
                         f"acknowledged {describe(want)}")
    m.close()
    with open(out, "w") as f:
        json.dump({"last": last, "stats": stats}, f)


# --- the test -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_writers_and_a_converter_lose_nothing_and_see_nothing_foreign(gmem, tmp_path):
    g = gmem(SIZE)
    mem = g.path("mem")
    start = time.monotonic()
    deadline = start + BUDGET - 10  # leave time for the final checks and the teardown
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    shared_r, shared_w = os.pipe()
    pids: dict[int, str] = {}
    try:
        pids[child(lambda: converter(mem, ready_r, done_r, shared_w, str(tmp_path / "converter.json"),
                                     deadline), str(tmp_path / "converter.err"))] = "converter"
        for w in range(WRITERS):
            pids[child(lambda w=w: writer_main(mem, w, ready_w, done_w, shared_r, str(tmp_path / f"w{w}.json"),
                                               deadline), str(tmp_path / f"writer {w}.err"))] = f"writer {w}"
        for fd in (ready_r, ready_w, done_r, done_w, shared_r, shared_w):
            os.close(fd)
        pidfds = {os.pidfd_open(pid): pid for pid in pids}
        failures = []
        try:
            while pidfds and not failures:
                left = start + BUDGET - 5 - time.monotonic()
                ready = select.select(list(pidfds), [], [], max(left, 0))[0]
                if not ready:
                    failures.append(f"timed out after {time.monotonic() - start:.1f} s; still running: "
                                    f"{sorted(pids[p] for p in pidfds.values())}")
                for pfd in ready:
                    pid = pidfds.pop(pfd)
                    os.close(pfd)
                    _, status = os.waitpid(pid, 0)
                    if status:
                        error = tmp_path / f"{pids[pid]}.err"
                        failures.append(f"{pids[pid]} failed (status {status:#x}): "
                                        + (error.read_text() if error.exists() else "no message; see stderr"))
                    del pids[pid]
        finally:
            for pfd in pidfds:
                os.close(pfd)
        assert not failures, "; ".join(failures)
    finally:
        for pid in pids:  # only those still running or not reaped
            kill_group(pid)
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
    elapsed = time.monotonic() - start

    conv = json.loads((tmp_path / "converter.json").read_text())
    results = [json.loads((tmp_path / f"w{w}.json").read_text()) for w in range(WRITERS)]
    last = [{int(i): s for i, s in r["last"].items()} for r in results]
    sigbus = sum(r["stats"]["sigbus"] for r in results)
    acked = sum(r["stats"]["acked"] for r in results)
    print(f"integrity: {elapsed:.1f} s, {conv['conversions']} conversions ({conv['to_private']} to private), "
          f"{acked} acknowledged writes, {sigbus} SIGBUS, per writer {[r['stats'] for r in results]}",
          file=sys.stderr)
    # The converter made everything shared again; get_attributes says so.
    runs = g.request(f"get_attributes offset=0 size={SIZE:#x}").decode()
    assert "private" not in runs, runs

    expected = bytearray(SIZE)
    for w in range(WRITERS):
        for index, s in last[w].items():
            off = offset_of(w, index)
            expected[off:off + REC] = record(w, index, s)

    def compare(image: bytes, view: str) -> None:
        if image == expected:
            return
        bad = [r for r in range(RECORDS) if image[r * REC:(r + 1) * REC] != expected[r * REC:(r + 1) * REC]]
        lines = [f"record {r} (writer {r % WRITERS}, index {r // WRITERS}, offset {r * REC:#x}): holds "
                 f"{describe(image[r * REC:(r + 1) * REC])}, acknowledged "
                 f"{describe(expected[r * REC:(r + 1) * REC])}" for r in bad[:10]]
        pytest.fail(f"{len(bad)} records differ from their last acknowledged version in the {view}:\n"
                    + "\n".join(lines))

    compare(g.guest_read(0, SIZE), "guest view")
    fd = os.open(mem, os.O_RDWR)
    try:
        with mmap.mmap(fd, SIZE, mmap.MAP_SHARED) as m:
            compare(m[:], "host view (a fresh mapping)")
    finally:
        os.close(fd)
    # The memory budget kept count through ~10 000 conversions racing fills and write-backs: a page is
    # committed when allocated or possibly cached (4 KiB folios), and the mount holds only this file.
    st = g.status()
    allocated, cached, committed = st["allocated_bytes"], st["page_cache_bytes_max"], st["committed_bytes"]
    assert max(allocated, cached) <= committed <= allocated + cached, st
    assert st["mount_memory"]["committed"] >= committed, st
    # The run must have exercised what it is about: writes that died on a private page and were redone.
    assert conv["to_private"] > 0 and sigbus > 0, (conv, sigbus)
    assert acked == WRITERS * NEW_WRITES  # each write planned was acknowledged once, first try or retried
