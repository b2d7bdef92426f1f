"""Per-user bounds (issue 17, finding 4): one user of an ``--allow-other`` mount cannot exhaust the server
for the others.

Mallory creates files, opens snapshots, commits memory and takes huge pages until each is refused, and
holds it all while Alice creates, maps, writes and converts a file of her own. Each refusal is a clean
errno whose reason names the bound and the option that sets it. Before, nothing was bounded per user:
10 000 small files took the server's whole descriptor limit, snapshots held server memory without end,
and one user could take the whole ``--max-memory`` or huge page pool.

The users' system calls run in forked children that drop to unused uids, so no account is created.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time

import pytest

from fusefix import mounted, open_files, requires_fuse, wait_for
from ufsgmem import hugepages as hugepages_lib
from ufsgmem.fuse.users import UserLimits

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096
MiB = 1 << 20
ALICE, MALLORY = 65534, 65533


class Child:
    """A forked child running as ``uid`` that runs ``fn(report)`` and then holds whatever it opened until
    :meth:`finish`; ``report(obj)`` sends the parent one JSON line."""

    def __init__(self, uid: int, fn):
        up_r, self._up_w = os.pipe()
        self._down_r, down_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            os.close(up_r)
            os.close(down_w)
            code = 0
            try:
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
                fn(self._report)
                self._report("done")
                os.read(self._down_r, 1)  # hold everything until the parent says so
            except BaseException as exc:  # noqa: BLE001 - to the parent
                self._report(f"failed: {exc!r}")
                code = 1
            os._exit(code)
        os.close(self._up_w)
        os.close(self._down_r)
        self._up = os.fdopen(up_r)
        self._down = down_w

    def _report(self, obj) -> None:
        os.write(self._up_w, (json.dumps(obj) + "\n").encode())

    def next(self):
        line = self._up.readline()
        assert line, "the child died"
        return json.loads(line)

    def finish(self) -> None:
        os.close(self._down)
        os.waitpid(self.pid, 0)
        self._up.close()


def write_request(path: str, request: str) -> tuple[str, str]:
    """One request: ("ok" or the errno name, the read-back)."""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, request.encode())
            outcome = "ok"
        except OSError as exc:
            outcome = errno.errorcode[exc.errno]
        return outcome, os.read(fd, 1 << 16).decode(errors="replace")
    finally:
        os.close(fd)


def create_until_refused(ctl: str, request, most: int) -> dict:
    """Send ``request(n)`` for n = 0, 1, ... until one is refused (at most ``most`` accepted): how many were
    accepted, the refusal's errno name and its read-back."""
    n = 0
    while True:
        outcome, why = write_request(ctl, request(n))
        if outcome != "ok":
            return {"files": n, "errno": outcome, "why": why}
        n += 1
        assert n <= most, f"{n} accepted, past {most}"


def alice_uses_a_file(mount: str, report) -> None:
    """Create, map, write, convert private and back, read back through the mapping."""
    ctl = os.path.join(mount, "ctl")
    outcome, why = write_request(ctl, f"create alice size={MiB} flags=mmap|init_shared")
    assert outcome == "ok", why
    fd = os.open(os.path.join(mount, "alice", "mem"), os.O_RDWR)
    m = mmap.mmap(fd, MiB)
    m[:8] = b"alice's!"
    fctl = os.path.join(mount, "alice", "ctl")
    for attributes in ("private", "shared"):
        outcome, why = write_request(fctl, f"set_memory_attributes offset=0 size={MiB} attributes={attributes}")
        assert outcome == "ok", why
    outcome, why = write_request(fctl, f"allocate offset=0 size={MiB}")
    assert outcome == "ok", why
    report(bytes(m[:8]).decode())
    m.close()
    os.close(fd)
    assert write_request(ctl, "destroy alice")[0] == "ok"


def mallory_takes_everything(mount: str, report) -> None:
    """Files until refused, memory until refused, snapshots of a fragmented file until refused; the last
    refusal of each goes to the parent."""
    ctl = os.path.join(mount, "ctl")
    took = create_until_refused(ctl, lambda n: f"create m{n} size={4 * MiB} flags=mmap|init_shared", 10_000)
    report(took)
    files = took["files"]
    committed = 0
    for i in range(files):
        outcome, why = write_request(os.path.join(mount, f"m{i}", "ctl"), f"allocate offset=0 size={4 * MiB}")
        if outcome != "ok":
            report({"memory": committed, "errno": outcome, "why": why})
            break
        committed += 4 * MiB
    # fragment m0: every other page private, so its snapshot and get_attributes are big
    fctl = os.fdopen(os.open(os.path.join(mount, "m0", "ctl"), os.O_RDWR), "r+b", buffering=0)
    for page in range(0, 1024, 2):
        fctl.write(f"set_memory_attributes offset={page * PS} size={PS} attributes=private".encode())
    held = []
    while True:
        try:
            held.append(os.open(os.path.join(mount, "m0", "snapshot"), os.O_RDONLY))
        except OSError as exc:
            report({"snapshots": len(held), "errno": errno.errorcode[exc.errno]})
            break
        assert len(held) < 10_000
    # get_attributes results, each kept by its open ctl, until refused (there may be room for a few)
    while True:
        fd = os.open(os.path.join(mount, "m0", "ctl"), os.O_RDWR)
        held.append(fd)
        try:
            os.write(fd, b"get_attributes")
        except OSError as exc:
            report({"get_attributes": errno.errorcode[exc.errno], "why": os.read(fd, 4096).decode()})
            break
        assert len(held) < 10_000
    # the handle bound: status files until refused (small results, never refused for their size)
    while True:
        try:
            held.append(os.open(os.path.join(mount, "m1", "status"), os.O_RDONLY))
        except OSError as exc:
            report({"handles": len(held) + 1, "errno": errno.errorcode[exc.errno]})  # + fctl
            break
        assert len(held) < 10_000
    mallory_takes_everything.held = (held, fctl)  # kept open until the child exits


def test_one_user_cannot_exhaust_the_server_for_another():
    bounds = "files=16,handles=48,memory=32M,results=256K"
    with mounted(allow_other=True, max_memory=128 * MiB, per_user=bounds) as mount:
        mallory = Child(MALLORY, lambda report: mallory_takes_everything(mount.path, report))
        try:
            files = mallory.next()
            assert (files["files"], files["errno"]) == (16, "ENOSPC"), files
            assert "files" in files["why"] and "--per-user files=" in files["why"], files["why"]
            memory = mallory.next()
            assert (memory["memory"], memory["errno"]) == (32 * MiB, "ENOMEM"), memory
            assert "--per-user memory=" in memory["why"], memory["why"]
            snapshots = mallory.next()
            assert snapshots["errno"] == "ENOMEM" and 0 < snapshots["snapshots"] < 48, snapshots
            get_attributes = mallory.next()
            assert get_attributes["get_attributes"] == "ENOMEM" and "results=" in get_attributes["why"], \
                get_attributes
            handles = mallory.next()
            assert (handles["handles"], handles["errno"]) == (48, "EMFILE"), handles
            assert mallory.next() == "done"

            # while Mallory holds all that, Alice's file works
            alice = Child(ALICE, lambda report: alice_uses_a_file(mount.path, report))
            assert alice.next() == "alice's!"
            assert alice.next() == "done"
            alice.finish()

            with open(os.path.join(mount.path, "m0", "status")) as f:
                status = json.load(f)
            assert status["owner_bounds"]["files"] == {"held": 16, "max": 16}, status["owner_bounds"]
            assert status["owner_bounds"]["handles"]["held"] == 48
        finally:
            mallory.finish()
        # gone with her descriptors: what she held is given back (RELEASE arrives after close returns;
        # the status read itself is a handle of root's, not hers)
        def bounds_now():
            with open(os.path.join(mount.path, "m0", "status")) as f:
                return json.load(f)["owner_bounds"]

        wait_for(lambda: bounds_now()["handles"]["held"] == 0 and bounds_now()["results"]["held"] == 0, 30,
                 lambda: f"Mallory's handles and results to be given back: {bounds_now()}")
        for i in range(16):
            mount.ctl(f"destroy m{i}")


def test_the_defaults_leave_room_for_another_user():
    """With the default bounds, Mallory's creates stop at 1024 files (ENOSPC) and her opens at 4096
    (EMFILE), costing the server at most two descriptors a file, while Alice's file still works."""
    with mounted(allow_other=True) as mount:
        def take(report):
            ctl = os.path.join(mount.path, "ctl")
            took = create_until_refused(ctl, lambda n: f"create m{n} size={PS}", 100_000)
            report(took)
            files = took["files"]
            held = []
            while True:
                try:
                    held.append(os.open(os.path.join(mount.path, f"m{len(held) % files}", "status"), os.O_RDONLY))
                except OSError as exc:
                    report({"handles": len(held), "errno": errno.errorcode[exc.errno]})
                    break
                assert len(held) < 100_000
            take.held = held

        mallory = Child(MALLORY, take)
        try:
            files = mallory.next()
            assert (files["files"], files["errno"]) == (1024, "ENOSPC"), files
            assert mallory.next() == {"handles": 4096, "errno": "EMFILE"}
            assert mallory.next() == "done"
            descriptors = len(open_files(mount.pid))
            assert descriptors <= 2 * 1024 + 64, descriptors
            alice = Child(ALICE, lambda report: alice_uses_a_file(mount.path, report))
            assert alice.next() == "alice's!"
            assert alice.next() == "done"
            alice.finish()
        finally:
            mallory.finish()
        for i in range(1024):
            mount.ctl(f"destroy m{i}")


def test_write_back_descriptors_are_bounded():
    """Issue 17: besides its memory, each file revoked once kept a write-back descriptor of its own until
    destroy, so many small files took the server's whole descriptor limit. Now they are kept for the 64
    most recently revoked files only: 80 files, each mapped, dirtied and converted (every dirty page kept),
    leave at most 64 descriptors of the mount in the server, and the memory's own (one per file, two
    before Python 3.13: its mmap module keeps a dup)."""
    with mounted() as mount:
        for i in range(80):
            mount.ctl(f"create f{i} size={16 * 1024} flags=mmap|init_shared")
            path = os.path.join(mount.path, f"f{i}", "mem")
            fd = os.open(path, os.O_RDWR)
            m = mmap.mmap(fd, PS)
            m[:4] = b"%04d" % i
            for attributes in ("private", "shared"):
                write_request(os.path.join(mount.path, f"f{i}", "ctl"),
                              f"set_memory_attributes offset=0 size={PS} attributes={attributes}")
            assert m[:4] == b"%04d" % i, f"file {i} lost its dirty page"
            m.close()
            os.close(fd)
        targets = open_files(mount.pid)
        on_mount = [t for t in targets if t.startswith(mount.path + "/")]
        assert 0 < len(on_mount) <= 64, len(on_mount)
        assert sum("memfd:ufsgmem" in t for t in targets) == 80 * (1 if sys.version_info >= (3, 13) else 2)
        for i in range(80):
            mount.ctl(f"destroy f{i}")


def test_bounds_parse_and_say_what_is_wrong():
    limits = UserLimits.parse("files=3,memory=1G,huge=none")
    assert (limits.files, limits.memory, limits.huge, limits.handles) == (3, 1 << 30, None, 4096)
    assert "huge" in limits.lifted
    for bad in ("files", "nosuch=1", "files=0", "memory=lots"):
        with pytest.raises(ValueError):
            UserLimits.parse(bad)
    out = subprocess.run([sys.executable, "-m", "ufsgmem", "mount", "/nonexistent", "--per-user", "files=0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "must be positive" in out.stderr, out.stderr


@pytest.mark.hugetlb
def test_one_user_cannot_take_the_huge_page_pool(hugepages):
    """By default a user holds at most half of a huge page size's pool: Mallory's hugetlb creates are
    refused (ENOSPC, naming the bound) once she holds 2 of 4 pages, and Alice still gets one."""
    with hugepages(2 * MiB, 4), mounted(allow_other=True) as mount:
        # half of the whole pool: 2 of our 4 pages, or more where the machine had a pool already
        expected = hugepages_lib.read(2 * MiB) // 2

        def take_pages(report):
            report(create_until_refused(
                os.path.join(mount.path, "ctl"),
                lambda n: f"create h{n} size={2 * MiB} flags=mmap backend=hugetlb page_size=2M", expected))

        def alice(report):
            outcome, why = write_request(os.path.join(mount.path, "ctl"),
                                         f"create a size={2 * MiB} flags=mmap backend=hugetlb page_size=2M")
            assert outcome == "ok", why
            outcome, why = write_request(os.path.join(mount.path, "a", "ctl"),
                                         f"set_memory_attributes offset=0 size={2 * MiB} attributes=shared")
            assert outcome == "ok", why
            fd = os.open(os.path.join(mount.path, "a", "mem"), os.O_RDWR)
            m = mmap.mmap(fd, 2 * MiB)
            m[:4] = b"huge"
            report(bytes(m[:4]).decode())
            m.close()
            os.close(fd)
            assert write_request(os.path.join(mount.path, "ctl"), "destroy a")[0] == "ok"

        mallory = Child(MALLORY, take_pages)
        try:
            took = mallory.next()
            assert isinstance(took, dict), took  # else the child's own failure, as it reported it
            assert (took["files"], took["errno"]) == (expected, "ENOSPC"), took
            assert "hugetlb" in took["why"] and "--per-user huge=" in took["why"], took["why"]
            assert mallory.next() == "done"
            a = Child(ALICE, alice)
            assert a.next() == "huge"
            assert a.next() == "done"
            a.finish()
        finally:
            mallory.finish()
        for n in range(expected):
            mount.ctl(f"destroy h{n}")


def test_held_results_cost_their_arrays_not_their_text():
    """A snapshot and a ``get_attributes`` result of a file of 40 000 attribute runs are held as arrays
    (~9 bytes a run, what ``results`` counts) and rendered as they are read, byte for byte what they were;
    a result past the bound is refused before it is built, for what its arrays would take. Before, each
    was held and counted as its text (~17 and ~24 bytes a run), so these two did not fit in 1 MiB."""
    runs = 40_000
    with mounted(allow_other=True, per_user="results=1M") as mount:
        def hold(report):
            from ufsgmem import protocol
            from ufsgmem.client import GmemFile
            from ufsgmem.snapshot import Snapshot
            from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE

            ctl = os.path.join(mount.path, "ctl")
            assert write_request(ctl, f"create frag size={runs * PS} flags=mmap|init_shared")[0] == "ok"
            f = GmemFile(os.path.join(mount.path, "frag"))
            for page in range(1, runs, 2):
                f.set_memory_attributes(page * PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            snap_fd = os.open(os.path.join(mount.path, "frag", "snapshot"), os.O_RDONLY)
            text = b"".join(iter(lambda: os.read(snap_fd, 100_000), b""))  # reads that split blocks
            snapshot = Snapshot.from_json(text)
            assert len(snapshot.attr_starts) == runs and snapshot.to_json().encode() == text
            ctl_fd = os.open(os.path.join(mount.path, "frag", "ctl"), os.O_RDWR)
            os.write(ctl_fd, b"get_attributes")
            result = b"".join(iter(lambda: os.read(ctl_fd, 4096), b""))
            runs_read = [(o, s, 8 if a == "private" else 0) for o, s, a in
                         ((int(o, 16), int(s, 16), a) for o, s, a in
                          (r.replace("+", " ").replace("=", " ").split() for r in result.decode()[3:].split()))]
            assert len(runs_read) == runs
            assert result == protocol.ok_result(None, protocol.format_runs(runs_read))
            report("held")
            outcome, why = write_request(os.path.join(mount.path, "frag", "ctl"), "get_attributes")
            report({"errno": outcome, "why": why})
            # what a request's data holds while it waits counts too: 1 MiB more is refused before it runs
            outcome, why = write_request(os.path.join(mount.path, "frag", "ctl"), "x" * MiB)
            report({"errno": outcome, "why": why})
            hold.fds = (snap_fd, ctl_fd, f)

        mallory = Child(MALLORY, hold)
        try:
            assert mallory.next() == "held"
            with open(os.path.join(mount.path, "frag", "status")) as s:
                held = json.load(s)["owner_bounds"]["results"]["held"]
            assert 2 * 9 * runs <= held <= 2 * 10 * runs, held
            refused = mallory.next()
            assert refused["errno"] == "ENOMEM" and "results=" in refused["why"], refused
            from ufsgmem.address import format_size
            assert f"{format_size(9 * runs)} more would pass it" in refused["why"], refused["why"]
            refused = mallory.next()
            assert refused["errno"] == "ENOMEM" and "requests in flight" in refused["why"], refused
            assert mallory.next() == "done"
        finally:
            mallory.finish()
        mount.ctl("destroy frag")


def test_a_user_flooding_guest_writes_is_refused_and_another_user_converts():
    """The data of a guest write (up to 1 MiB) waits with its request, maybe long in the executor's queue,
    and counts against its writer's ``results`` bound until the write ends. Mallory's 32 threads each
    pwrite 1 MiB to a ``guest`` file of their own over and over (the kernel sends one direct write of an
    inode at a time): past 1 MiB in flight (two writes) her writes get ENOMEM and change nothing (every
    file reads back as its last acknowledged write), and Alice, while they go on, maps, converts and
    allocates. Before, nothing bounded what one user's waiting writes held: no write was refused."""
    threads, writes, seconds = 32, 16_000, 120  # Mallory reports after 16 000 writes with no refusal
    signals = tempfile.mkdtemp(prefix="ufsgmem-flood-")  # Mallory's threads stop once "stop" is there
    os.chmod(signals, 0o755)
    stop = os.path.join(signals, "stop")
    with mounted(allow_other=True, per_user="results=1M") as mount:
        def flood(report):
            import threading

            fds = []
            for i in range(threads):
                assert write_request(os.path.join(mount.path, "ctl"),
                                     f"create flood{i} size={MiB} flags=mmap|init_shared")[0] == "ok"
                fds.append(os.open(os.path.join(mount.path, f"flood{i}", "guest"), os.O_RDWR))
            last = [None] * threads  # the last acknowledged write of each thread (its own MiB)
            outcomes: dict[str, int] = {}
            refused, tried = threading.Event(), threading.Semaphore(0)
            deadline = time.monotonic() + seconds  # a bound, should the parent never say stop

            def writer(i: int) -> None:
                r = 0
                while not os.path.exists(stop) and time.monotonic() < deadline:
                    r += 1
                    data = bytes([i, r % 256]) * (MiB // 2)
                    try:
                        assert os.pwrite(fds[i], data, 0) == MiB
                        last[i] = r
                        outcome = "ok"
                    except OSError as exc:
                        outcome = errno.errorcode[exc.errno]
                        refused.set()
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    tried.release()

            pool = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
            for t in pool:
                t.start()
            for _ in range(writes):
                if refused.is_set() or not tried.acquire(timeout=seconds):
                    break
            report({"refused": refused.is_set()})
            for t in pool:
                t.join()
            intact = all(last[i] is None or os.pread(fds[i], MiB, 0) == bytes([i, last[i] % 256]) * (MiB // 2)
                         for i in range(threads))
            report({"outcomes": outcomes, "intact": intact})
            for i in range(threads):
                os.close(fds[i])
                assert write_request(os.path.join(mount.path, "ctl"), f"destroy flood{i}")[0] == "ok"

        mallory = Child(MALLORY, flood)
        try:
            assert mallory.next() == {"refused": True}, "32 x 1 MiB guest writes in flight passed a 1M bound"
            alice = Child(ALICE, lambda report: alice_uses_a_file(mount.path, report))
            assert alice.next() == "alice's!"
            assert alice.next() == "done"
            alice.finish()
            open(stop, "w").close()
            summary = mallory.next()
            assert set(summary["outcomes"]) == {"ok", "ENOMEM"}, summary
            assert summary["intact"], "a refused guest write changed the file"
            assert mallory.next() == "done"
        finally:
            open(stop, "w").close()
            mallory.finish()
            os.unlink(stop)
            os.rmdir(signals)
        with open(os.path.join(mount.path, "ctl"), "w") as f:  # a handle of root's: Mallory's count is back
            f.write(f"create probe size={PS}")
        wait_for(lambda: _results_held(mount.path, "probe") == 0, 30, "Mallory's results to be given back")
        mount.ctl("destroy probe")


def _results_held(path: str, name: str) -> int:
    with open(os.path.join(path, name, "status")) as f:
        return json.load(f)["owner_bounds"]["results"]["held"]
