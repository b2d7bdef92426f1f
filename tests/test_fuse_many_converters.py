"""Many conversions at once never wedge the mount (issue 17, finding 2).

libfuse serves a mount with at most 32 worker threads. A conversion of dirty memory waits in its revocation
until the kernel has written those pages back, as WRITE requests some other thread must serve. With 32
(or 64) threads converting one file at the same moment, every worker used to be taken: one revoking, the
rest waiting for the file's lock, none left for the write-backs, and the whole mount hung (even a stat)
until the connection was aborted. Here many threads each dirty their own range through a shared mapping,
meet at a barrier and convert it to private with the ioctl on ``mem`` at once; all must finish with their
bytes intact (read through ``NAME/guest``), and the mount must keep answering other requests meanwhile.

Every case here hung on the old code (and the test aborted the connection after its deadline).

Bounded: every wait has a deadline; when one passes, the test aborts the FUSE connection (which fails every
request still waiting, so the blocked threads return) and fails, instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
import time

import numpy as np
import pytest

from fusefix import mounted, requires_fuse
from ufsgmem.client import GmemFile
from ufsgmem.fuse.abort import abort_mount
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

pytestmark = [requires_fuse, pytest.mark.fuse]
MiB = 1 << 20
DEADLINE = 60.0  # seconds for everything to finish; today's code never does


def pattern(index: int, size: int) -> bytes:
    """Bytes no other thread (or round) writes: the index in every 8-byte word, with the word's position."""
    words = np.arange(size // 8, dtype=np.uint64) | np.uint64(index << 32)
    return words.tobytes()


class Probe:
    """Asks the mount for something every few milliseconds while conversions run (``statvfs`` of the
    mount and a read of ``NAME/status``: both always reach the server) and counts the answers."""

    def __init__(self, mountpoint: str, status: str):
        self.mountpoint, self.status = mountpoint, status
        self.answers = 0
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                os.statvfs(self.mountpoint)
                with open(self.status, "rb") as f:
                    f.read()
                self.answers += 1
                self.stop.wait(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


@contextlib.contextmanager
def bounded(mount):
    """Run the body; if it raises (a deadline passed), abort the mount's connection before failing, so
    threads stuck in the kernel return and the mount can be torn down."""
    try:
        yield
    except BaseException:
        abort_mount(mount.path)
        raise


def wait_all(threads: list[threading.Thread], deadline: float, what: str) -> None:
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise AssertionError(f"timed out after {DEADLINE} s: {what} (the mount is wedged)")


def convert_at_once(mount, jobs: list[tuple[GmemFile, int, int]], round: int = 0) -> None:
    """Each job ``(file, offset, size)``: its range is dirtied through a mapping of the file, then one
    thread per job converts it to private, all at the same moment; then every range reads back through
    ``NAME/guest`` as written. A probe must keep getting answers meanwhile."""
    tag = round * len(jobs)
    maps = {id(g): g.map() for g, _, _ in jobs}
    barrier = threading.Barrier(len(jobs) + 1)
    failures: list[BaseException] = []
    done = [False] * len(jobs)

    for i, (g, offset, size) in enumerate(jobs):  # dirty, through this process's mapping
        maps[id(g)].array()[offset:offset + size] = np.frombuffer(pattern(tag + i, size), np.uint8)

    def convert(i: int, g: GmemFile, offset: int, size: int) -> None:
        try:
            barrier.wait(DEADLINE)
            g.set_memory_attributes(offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            done[i] = True
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    first = jobs[0][0]
    probe = Probe(mount.path, os.path.join(first.path, "status"))
    threads = [threading.Thread(target=convert, args=(i, *job), daemon=True) for i, job in enumerate(jobs)]
    deadline = time.monotonic() + DEADLINE
    with bounded(mount):
        for t in threads:
            t.start()
        barrier.wait(DEADLINE)  # every range is dirty; the conversions start now
        probe.thread.start()
        while probe.answers == 0 and probe.thread.is_alive():  # the mount answers while they run
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {DEADLINE} s: statvfs/status got no answer while "
                                     f"{len(jobs) - sum(done)} conversions ran (the mount is wedged)")
            time.sleep(0.005)
        wait_all(threads, deadline, f"{len(jobs) - sum(done)} of {len(jobs)} conversions still running")
        probe.stop.set()
        wait_all([probe.thread], deadline, "a statvfs or status read got no answer")
    assert not failures, failures[:3]
    assert not probe.errors, probe.errors
    assert all(done)
    for m in maps.values():
        m.close()
    for i, (g, offset, size) in enumerate(jobs):
        got = g.guest_read(offset, size)
        assert got == pattern(tag + i, size), f"thread {i}'s bytes at {offset:#x} changed"
        assert g.get_attributes(offset, size) == [(offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)]


def one_file(mount, name: str, threads: int, each: int, rounds: int = 1) -> None:
    """``rounds`` times: ``threads`` threads convert their own dirty ``each`` bytes of one file at once,
    then the file goes back to shared."""
    mount.ctl(f"create {name} size={threads * each} flags=mmap|init_shared")
    with contextlib.closing(GmemFile(os.path.join(mount.path, name))) as g:
        for r in range(rounds):
            convert_at_once(mount, [(g, i * each, each) for i in range(threads)], r)
            g.set_memory_attributes(0, threads * each, 0)


@pytest.mark.timeout(300)
def test_64_threads_convert_their_own_dirty_mib_of_one_file_at_once():
    with mounted() as mount:
        one_file(mount, "vm64", 64, MiB)


@pytest.mark.timeout(300)
def test_32_threads_convert_their_own_dirty_4mib_of_one_file_at_once():
    with mounted() as mount:
        one_file(mount, "vm32", 32, 4 * MiB, rounds=2)


@pytest.mark.timeout(300)
def test_64_threads_convert_64_files_at_once():
    with mounted() as mount:
        files = []
        for i in range(64):
            mount.ctl(f"create f{i} size={MiB} flags=mmap|init_shared")
            files.append(GmemFile(os.path.join(mount.path, f"f{i}")))
        try:
            convert_at_once(mount, [(g, 0, MiB) for g in files])
        finally:
            for g in files:
                g.close()


# --- the server stops while conversions wait -------------------------------------------------------------
def in_kernel_wait(tids: list[int]) -> int:
    """How many of this process's threads ``tids`` wait for a FUSE answer."""
    count = 0
    for tid in tids:
        with contextlib.suppress(OSError):
            with open(f"/proc/self/task/{tid}/wchan") as f:
                count += f.read() == "request_wait_answer"
    return count


@pytest.mark.timeout(300)
def test_stopping_the_server_with_conversions_queued_and_running_ends_them_all():
    """SIGTERM while one big dirty conversion runs and 64 more of the same file wait behind it: every one
    returns (converted, or failed with the connection: ENOTCONN or ECONNABORTED), and the server exits
    and unmounts. Before, a worker blocked in a revocation kept libfuse's loop from ever returning (its
    write-backs had nobody left to serve them), so the server hung until something aborted it."""
    big, threads = 256 * MiB, 64
    from ufsgmem import mounts
    from ufsgmem.fuse import server as fuse_server
    from ufsgmem.mounts import start_background, unmount
    from ufsgmem.syscalls import pid_alive
    path = tempfile.mkdtemp(prefix="ufsgmem-test-")
    pid = start_background(path)
    try:
        with bounded(type("M", (), {"path": path})):
            with open(os.path.join(path, "ctl"), "w") as f:
                f.write(f"create stop size={big + threads * MiB} flags=mmap|init_shared")
            g = GmemFile(os.path.join(path, "stop"))
            m = g.map()
            m.array()[:] = 7  # all dirty: the big conversion writes 256 MiB back
            outcomes: list[object] = [None] * (threads + 1)
            tids: list[int] = []
            barrier = threading.Barrier(threads + 2)

            def convert(i: int, offset: int, size: int) -> None:
                tids.append(threading.get_native_id())
                barrier.wait(DEADLINE)
                try:
                    g.set_memory_attributes(offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
                    outcomes[i] = "converted"
                except OSError as exc:
                    outcomes[i] = exc.errno

            jobs = [(0, big)] + [(big + i * MiB, MiB) for i in range(threads)]
            workers = [threading.Thread(target=convert, args=(i, *job), daemon=True) for i, job in enumerate(jobs)]
            for w in workers:
                w.start()
            barrier.wait(DEADLINE)
            deadline = time.monotonic() + DEADLINE
            while in_kernel_wait(tids) < threads // 2:  # most are in flight
                if time.monotonic() > deadline or all(o is not None for o in outcomes):
                    break
                time.sleep(0.001)
            os.kill(pid, signal.SIGTERM)
            wait_all(workers, deadline, "conversions still waiting after the server was told to stop")
            while pid_alive(pid):
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not exit within {DEADLINE} s of SIGTERM")
                time.sleep(0.01)
        assert all(o is not None for o in outcomes)
        assert set(outcomes) <= {"converted", errno.ENOTCONN, errno.ECONNABORTED}, outcomes
        assert not mounts.mount_type(path), "the server exited without unmounting"
        with open(fuse_server.logfile_path(path)) as f:
            log = f.read()
        assert "Traceback" not in log, log
        m.close()
    finally:
        if mounts.mount_type(path):
            abort_mount(path)
            unmount(path, timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(fuse_server.logfile_path(path))
        os.rmdir(path)
