"""Memory cgroups: a mapper under a memory limit gets its bytes, SIGBUS, ENOMEM or the OOM killer, never a hang.

The server writes back dirty pages for the processes that map its files, and a write-back allocates backend
memory (``GuestMemfd._touch``: MADV_POPULATE_WRITE on the memfd). Measured on Linux 6.18 with cgroup v1,
no swap:

* **Server outside the mapper's cgroup** (the deployment rule, docs/reliability.md): a mapper limited to
  64 MiB dirties every page of a 256 MiB file in ~0.9 s and of a 1 GiB file in ~4.6 s (its cgroup hits the
  limit ~500 000 times: clean pages are dropped and fault back from the server), and every byte reads back,
  in the mapper and through ``guest``. Limits down to 12 MiB complete too; at 8 MiB the mapper's own
  interpreter does not fit and the OOM killer takes it.
* **Server and mapper in one limited cgroup**, as it was: with 64 or 128 MiB (little above what the three
  Python processes need, ~40 MiB) the OOM killer took the server within a second and the mapper got
  SIGBUS. With more room (160-240 MiB for a 256 MiB file, 256 MiB for 1 GiB) it hung every time: a server
  thread allocates, the charge reclaims, reclaim waits in ``folio_wait_writeback`` for a FUSE page under
  write-back that only the server can finish, and the threads serving those write-backs wait for the
  lock or the GIL the first one holds. Neither releasing the GIL around the backend's allocation nor
  allocating before taking the file's lock ended it (then six threads waited in reclaim at once, each for
  a write-back another was serving): every write-back needs memory, and only write-backs free it there.
  Raising the limit did not end it; aborting the FUSE connection did. ``PR_SET_IO_FLUSHER`` would keep
  that reclaim from waiting, but needs CAP_SYS_RESOURCE (EPERM in this container).
* **So a server started in a limited cgroup leaves it** (``server.harden``): it moves to the nearest
  cgroup no limit binds and keeps the tightest limit as its ``--max-memory``. The mapper in that cgroup
  then completes, with reclaim writing pages back (176 MiB under 200 MiB), or meets the cap with SIGBUS
  (256 MiB): ``test_a_server_started_in_a_limited_cgroup_leaves_it_and_hangs_no_mapper``.

Every wait is bounded by the mapper's progress (it reports every 8 MiB); on a stall the connection is
aborted first, the processes are ours and are ended by pid, and each cgroup made here is removed even when
the test fails. The last tests check :mod:`ufsgmem.fuse.memcg` (finding the limits that bind a process,
and the warning the server logs where it cannot leave them) on fake cgroup trees and on a real one.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pytest

from fusefix import mounted, requires_fuse
from ufsgmem.mounts import unmount
from ufsgmem.fuse import memcg
from ufsgmem.fuse import server as fuse_server
from ufsgmem import mounts
from ufsgmem.fuse.abort import abort_mount
from ufsgmem.syscalls import pid_alive

MIB = 1 << 20
ENDINGS = ("completed", "SIGBUS", "OOM-killed", "ENOMEM", "server OOM-killed")  # anything but a hang
STEP = 8 * MIB  # the mapper reports its progress this often


# --- memory cgroups we make, and always remove -----------------------------------------------------------
class Hang(AssertionError):
    """A mapper (or the server) made no progress within the bound."""


@dataclass
class Cgroup:
    directory: str
    version: int

    @property
    def procs(self) -> str:
        return os.path.join(self.directory, "cgroup.procs")

    def _read(self, knob: str) -> str:
        with open(os.path.join(self.directory, knob)) as f:
            return f.read()

    def set_limit(self, limit: int | None) -> None:
        """Limit the cgroup to ``limit`` bytes; None lifts the limit."""
        knob = "memory.limit_in_bytes" if self.version == 1 else "memory.max"
        with open(os.path.join(self.directory, knob), "w") as f:
            f.write(str(limit) if limit is not None else "-1" if self.version == 1 else "max")

    def limit(self) -> int | None:
        text = self._read("memory.limit_in_bytes" if self.version == 1 else "memory.max").strip()
        return None if text == "max" or int(text) >= memcg.V1_UNLIMITED else int(text)

    def usage(self) -> int:
        return int(self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current"))

    def oom_kills(self) -> int:
        text = self._read("memory.oom_control" if self.version == 1 else "memory.events")
        return int(dict(line.split() for line in text.splitlines()).get("oom_kill", 0))

    def limit_hits(self) -> int:
        """How often a charge met the limit (v1 memory.failcnt; v2 the "max" events)."""
        if self.version == 1:
            return int(self._read("memory.failcnt"))
        return int(dict(line.split() for line in self._read("memory.events").splitlines()).get("max", 0))

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError):
            return [int(p) for p in self._read("cgroup.procs").split()]
        return []


def where_to_make() -> tuple[str | None, int, str]:
    """``(reason, version, parent)``: where a child memory cgroup of ours can go, or why none can."""
    dirs = {version: directory for version, _, directory in memcg.memory_cgroup_directories()}
    if 1 in dirs and os.path.isdir(dirs[1]):
        return None, 1, dirs[1]
    if 2 in dirs and os.path.isdir(dirs[2]):
        try:
            with open(os.path.join(dirs[2], "cgroup.subtree_control")) as f:
                enabled = f.read().split()
        except OSError as exc:
            return f"cgroup v2 at {dirs[2]}: {exc.strerror}", 2, dirs[2]
        if "memory" not in enabled:
            return (f"cgroup v2: the memory controller is not enabled for the children of {dirs[2]} (and a cgroup "
                    f"that holds processes cannot enable it)", 2, dirs[2])
        return None, 2, dirs[2]
    return "no memory cgroup hierarchy is mounted (neither v1 memory nor v2)", 0, ""


_names = itertools.count()


def _remove(cg: Cgroup, parent: str, timeout: float = 30) -> None:
    """rmdir ``cg``; processes still in it (only ours can be) are moved to ``parent`` first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.rmdir(cg.directory)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise AssertionError(f"cannot remove the cgroup {cg.directory}: {exc.strerror}; "
                                     f"processes in it: {cg.pids()}") from exc
        for pid in cg.pids():
            with contextlib.suppress(OSError), open(os.path.join(parent, "cgroup.procs"), "w") as f:
                f.write(str(pid))
        time.sleep(0.01)  # a process that just exited leaves its cgroup asynchronously: poll, bounded


@contextlib.contextmanager
def memory_cgroup(limit: int | None = None):
    """A fresh child memory cgroup of this process's own, limited to ``limit`` bytes (None: unlimited);
    removed afterwards whatever happens. Skips only when none can be made here."""
    reason, version, parent = where_to_make()
    if reason:
        pytest.skip(f"cannot make a memory cgroup: {reason}")
    directory = os.path.join(parent, f"ufsgmem-test-{os.getpid()}-{next(_names)}")
    try:
        os.mkdir(directory)
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup under {parent}: {exc.strerror}")
    cg = Cgroup(directory, version)
    try:
        if limit is not None:
            cg.set_limit(limit)
        yield cg
    finally:
        _remove(cg, parent)


# --- the mapper, and bounded waits on it ----------------------------------------------------------------
MAPPER = r"""
import mmap, os, sys
with open(sys.argv[1], "w") as f:  # join the cgroup before anything is mapped
    f.write(str(os.getpid()))
import numpy as np
mem, size, seed, step = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])

def expected(first, n):  # word i of the file: unique, and different for every run
    return np.arange(first, first + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)

try:
    m = mmap.mmap(os.open(mem, os.O_RDWR), size)
except OSError as exc:
    print("error", exc.errno, flush=True)
    sys.exit(3)
words, chunk = np.frombuffer(m, dtype=np.uint64), (1 << 20) // 8
for what in ("wrote", "checked"):
    bad = 0
    for first in range(0, size // 8, chunk):
        if what == "wrote":
            words[first:first + chunk] = expected(first, chunk)
        else:
            bad += int(np.count_nonzero(words[first:first + chunk] != expected(first, chunk)))
        if (first + chunk) * 8 % step == 0:
            print(what, (first + chunk) * 8, flush=True)
print("bad", bad, flush=True)
"""


def expected(seed: int, first: int, n: int) -> np.ndarray:
    return np.arange(first, first + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)


def start_mapper(cg: Cgroup, mem: str, size: int, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MAPPER, cg.procs, mem, str(size), str(seed), str(STEP)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)


def threads(pid: int) -> str:
    """What each thread of ``pid`` waits in, counted: ``folio_wait_bit x1, futex_do_wait x12``."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read()
                wchan = "running" if wchan in ("", "0") else wchan
                counts[wchan] = counts.get(wchan, 0) + 1
    return ", ".join(f"{w} x{n}" for w, n in sorted(counts.items())) or "gone"


def follow(proc: subprocess.Popen, stall: float, total: float, watch: dict[str, int]) -> list[str]:
    """The mapper's lines until it exits. Raises :class:`Hang` when it prints nothing for ``stall`` s, runs
    past ``total`` s, or does not exit within ``stall`` s of closing its output. ``watch`` names processes
    (the server...) whose threads the message describes."""
    lines, partial = [], b""
    deadline = time.monotonic() + total
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            wait = min(stall, deadline - time.monotonic())
            if wait <= 0 or not selector.select(wait):
                break
            data = os.read(proc.stdout.fileno(), 1 << 16)
            if not data:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=stall)
                    return lines
                break
            *done, partial = (partial + data).split(b"\n")
            lines += [line.decode() for line in done]
    where = "; ".join(f"{name} {pid}: {threads(pid)}" for name, pid in {"mapper": proc.pid, **watch}.items())
    raise Hang(f"the mapper made no progress for {stall} s (last: {lines[-1:] or 'nothing'}); {where}")


def outcome(proc: subprocess.Popen, lines: list[str], cg: Cgroup, size: int) -> str:
    """What happened to a mapper that ended: "completed" (its own check found every word), "SIGBUS",
    "OOM-killed", "ENOMEM", or "server OOM-killed" (the mount gone before the mapper opened its file);
    anything else fails the test."""
    rc = proc.returncode
    if rc == 0:
        assert lines[-1:] == ["bad 0"] and f"checked {size}" in lines, lines[-3:]
        return "completed"
    if rc == -signal.SIGBUS:
        return "SIGBUS"
    if rc == -signal.SIGKILL:
        assert cg.oom_kills() > 0, "the mapper was SIGKILLed, and not by the OOM killer of its cgroup"
        return "OOM-killed"
    if rc == 3 and lines[-1:] == [f"error {errno.ENOMEM}"]:
        return "ENOMEM"
    if rc == 3 and lines[-1:] in ([f"error {errno.ENOTCONN}"], [f"error {errno.ECONNABORTED}"]) and cg.oom_kills():
        return "server OOM-killed"  # before the mapper opened the file: the mount is gone
    raise AssertionError(f"the mapper ended with status {rc}: {lines[-3:]}")


def check_bytes(guest: str, size: int, seed: int) -> None:
    """Every byte a completed mapper wrote is in the backend: read through ``guest`` (not a mapping)."""
    fd = os.open(guest, os.O_RDONLY)
    try:
        for offset in range(0, size, MIB):
            got = np.frombuffer(os.pread(fd, MIB, offset), dtype=np.uint64)
            want = expected(seed, offset // 8, MIB // 8)
            bad = np.nonzero(got != want)[0] if len(got) == len(want) else [0]
            assert len(bad) == 0, f"{len(bad)} words differ from offset {offset + int(bad[0]) * 8:#x}"
    finally:
        os.close(fd)


def run_mapper(cg: Cgroup, mount_path: str, size: int, *, stall: float, watch: dict[str, int]) -> str:
    """Create a file, let a mapper in ``cg`` dirty all of it, and judge the end (bytes checked when it
    completed). On a hang, abort the connection first (so the mapper ends), then raise :class:`Hang`."""
    name, seed = f"memcg{os.getpid()}_{next(_names)}", int.from_bytes(os.urandom(7), "little")
    with open(os.path.join(mount_path, "ctl"), "w") as f:
        f.write(f"create {name} size={size} flags=mmap|init_shared")
    mapper = start_mapper(cg, os.path.join(mount_path, name, "mem"), size, seed)
    try:
        try:
            lines = follow(mapper, stall=stall, total=max(240.0, size / MIB), watch=watch)
        except Hang as exc:
            state = f"; the cgroup holds {cg.usage() / MIB:.0f} MiB, limit {(cg.limit() or 0) / MIB:.0f} MiB"
            # Unwedge before failing, so nothing stays stuck: the abort ends the write-backs reclaim waits
            # for; lifting the limit ends reclaim that only throttles (it can loop for minutes otherwise).
            abort_mount(mount_path)
            cg.set_limit(None)
            with contextlib.suppress(subprocess.TimeoutExpired):
                mapper.wait(timeout=30)
            raise Hang(f"{exc}{state}") from None
        result = outcome(mapper, lines, cg, size)
        if result == "completed":
            check_bytes(os.path.join(mount_path, name, "guest"), size, seed)
        return result
    finally:
        if mapper.poll() is None:
            mapper.kill()
            mapper.wait(timeout=30)
        mapper.stdout.close()


# --- the deployment rule: server outside, mapper limited --------------------------------------------------
@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(400)  # the bounded waits below end well before; this only backs them up
@pytest.mark.parametrize("size", [256 * MIB, pytest.param(1024 * MIB, marks=pytest.mark.slow)],
                         ids=["256M", "1G"])
def test_a_limited_mapper_with_the_server_outside_never_hangs(size):
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(memory_cgroup(64 * MIB))
        mount = stack.enter_context(mounted())
        result = run_mapper(cg, mount.path, size, stall=60, watch={"server": mount.pid})
        assert result in ENDINGS


# --- server and mapper in one limited cgroup ------------------------------------------------------------
SERVER_IN_CGROUP = r"""
import os, sys
with open(sys.argv[1], "w") as f:  # the server (and its watcher) start inside the cgroup
    f.write(str(os.getpid()))
from ufsgmem.mounts import start_background
pid = start_background(sys.argv[2])
print(pid, flush=True)
sys.stdin.read()  # until the test is done with the mount; then reap the server
os.waitpid(pid, 0)
"""


@contextlib.contextmanager
def server_in(cg: Cgroup):
    """A mount whose server runs in ``cg``; always unmounted (aborted first if it hangs), the server reaped."""
    from fusefix import Mount as FixMount
    path = tempfile.mkdtemp(prefix="ufsgmem-test-")
    starter = subprocess.Popen([sys.executable, "-c", SERVER_IN_CGROUP, cg.procs, path], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pid = None
    try:
        line = starter.stdout.readline()
        if not line.strip():
            raise AssertionError(f"the server did not start: {starter.communicate(timeout=30)[1]}")
        pid = int(line)
        yield FixMount(path, pid)
    finally:
        with contextlib.suppress(OSError):
            if mounts.mount_type(path):
                if pid is None or not pid_alive(pid):
                    abort_mount(path)
                unmount(path, timeout=10)  # SIGTERM; a stuck server is aborted and killed
        starter.stdin.close()
        try:
            starter.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the server did not exit: ours, by its pid
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
            starter.wait(timeout=30)
        starter.stdout.close()
        starter.stderr.close()
        with contextlib.suppress(OSError):
            os.unlink(fuse_server.logfile_path(path))
        with contextlib.suppress(OSError):
            os.rmdir(path)


@requires_fuse
@pytest.mark.fuse
@pytest.mark.timeout(400)
@pytest.mark.parametrize("size, ending", [(176 * MIB, "completed"), (256 * MIB, "SIGBUS")])
def test_a_server_started_in_a_limited_cgroup_leaves_it_and_hangs_no_mapper(size, ending):
    """Started inside its mappers' limited cgroup (where it used to hang them all, see the module
    docstring), the server moves itself out at start and keeps the limit as its memory cap. A mapper in
    that cgroup then completes (176 MiB: more than the cgroup holds beside the mapper's own ~35 MiB, so
    reclaim writes pages back, and less than the cap) with every byte checked, or runs into the cap with
    SIGBUS (256 MiB): never a hang."""
    limit = 200 * MIB
    with contextlib.ExitStack() as stack:
        cg = stack.enter_context(memory_cgroup(limit))
        mount = stack.enter_context(server_in(cg))
        with open(cg.procs) as f:
            assert str(mount.pid) not in f.read().split(), "the server is still in the limited cgroup"
        assert "left memory cgroup" in mount.log and "= 200M)" in mount.log, mount.log
        assert run_mapper(cg, mount.path, size, stall=20, watch={"server": mount.pid}) == ending
        if ending == "completed":
            assert cg.limit_hits() > 0, "the mapper's cgroup never met its limit: nothing was tested"
        with open(os.path.join(mount.path, "ctl"), "w") as f:
            f.write("create probe size=4096 flags=mmap|init_shared")
        with open(os.path.join(mount.path, "probe", "status")) as f:
            assert json.load(f)["mount_memory"]["max"] == limit


# --- ufsgmem.fuse.memcg: the warning the server logs -----------------------------------------------------
def tree(root, limits: dict[str, str], knob: str = "memory.limit_in_bytes") -> None:
    """Fake cgroup directories under ``root``: path -> the content of ``knob`` ("" for none)."""
    for rel, content in limits.items():
        directory = root / rel.strip("/") if rel.strip("/") else root
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text("")
        if content:
            (directory / knob).write_text(content + "\n")


V1_UNLIMITED = "9223372036854771712"


def mountinfo_v1(mountpoint, root="/") -> str:
    return (f"31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
            f"32 31 0:29 / /x/cpu rw,relatime - cgroup cgroup rw,cpu\n"
            f"35 31 0:32 {root} {str(mountpoint).replace(' ', chr(92) + '040')} rw,relatime shared:9 - cgroup "
            f"cgroup rw,memory\n")


def test_warning_names_the_tightest_v1_limit_on_the_way_up(tmp_path):
    root = tmp_path / "mem ory"  # a space: mountinfo escapes it
    tree(root, {"/": V1_UNLIMITED, "vms": str(512 * MIB), "vms/server": str(2 << 30), "vms/server/x": ""})
    (root / "vms" / "server" / "x" / "memory.limit_in_bytes").write_text(V1_UNLIMITED)
    cgroup = "5:cpu:/elsewhere\n4:memory:/vms/server/x\n0::/\n"
    limits = memcg.memory_limits(cgroup, mountinfo_v1(root))
    assert [(lim.cgroup, lim.limit) for lim in limits] == [("/vms/server", 2 << 30), ("/vms", 512 * MIB)]
    assert limits[0].directory == str(root / "vms" / "server")
    warning = memcg.limit_warning(cgroup, mountinfo_v1(root))
    assert warning is not None and "\n" not in warning
    assert "(memory.limit_in_bytes = 512 MiB on cgroup /vms)" in warning and "reliability.md" in warning


def test_no_warning_without_a_limit(tmp_path):
    tree(tmp_path / "memory", {"/": V1_UNLIMITED, "a": V1_UNLIMITED, "a/b": V1_UNLIMITED})
    assert memcg.limit_warning("4:memory:/a/b\n", mountinfo_v1(tmp_path / "memory")) is None
    assert memcg.limit_warning("4:cpu:/a/b\n", mountinfo_v1(tmp_path / "memory")) is None  # no memory line
    assert memcg.limit_warning("4:memory:/gone\n", mountinfo_v1(tmp_path / "nowhere")) is None  # unreadable
    assert memcg.limit_warning("4:memory:/a/b\n", "") is None  # nothing mounted


def test_warning_for_a_v2_memory_max(tmp_path):
    root = tmp_path / "unified"
    tree(root, {"/": "", "machine": str(3 << 30), "machine/vm0": "max", "machine/vm0/ufsgmem": "max"}, "memory.max")
    info = f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n"
    assert memcg.limit_warning("0::/machine/vm0/ufsgmem\n", info) == (
        "this server runs under a memory limit (memory.max = 3072 MiB on cgroup /machine): if processes that "
        "map its files share that cgroup, reclaim there can wait for write-backs only this server serves and "
        "hang them all; run the server in its own memory cgroup (docs/reliability.md)")
    assert memcg.limit_warning("0::/machine/vm0/ufsgmem\n",
                               info.replace("cgroup2 cgroup2", "tmpfs tmpfs")) is None


def test_leaving_goes_to_the_parent_of_the_topmost_limit(tmp_path):
    """Limits bind a whole subtree: leaving /vms/server/x under limits on /vms/server and /vms means
    moving into / (here a fake tree, whose cgroup.procs is a plain file)."""
    root = tmp_path / "memory"
    tree(root, {"/": V1_UNLIMITED, "vms": str(512 * MIB), "vms/server": str(2 << 30), "vms/server/x": ""})
    limits, failed = memcg.leave_limits("4:memory:/vms/server/x\n", mountinfo_v1(root))
    assert failed is None and [lim.cgroup for lim in limits] == ["/vms/server", "/vms"]
    assert (root / "cgroup.procs").read_text() == str(os.getpid())
    assert (root / "vms" / "cgroup.procs").read_text() == ""


def test_leaving_says_why_it_cannot(tmp_path):
    """A container that sees only its own limited subtree has nowhere to go: the reason comes back."""
    root = tmp_path / "memory"
    tree(root, {"/": str(256 * MIB)})
    limits, failed = memcg.leave_limits("4:memory:/\n", mountinfo_v1(root))
    assert [lim.limit for lim in limits] == [256 * MIB]
    assert failed is not None and "nowhere to go" in failed, failed
    assert not (tmp_path / "cgroup.procs").exists(), "it wrote outside the cgroup hierarchy"
    assert memcg.leave_limits("4:memory:/\n", "") == ([], None)  # nothing mounted: nothing to leave


def test_a_container_sees_only_its_subtree(tmp_path):
    """mountinfo's root is the container's cgroup: paths are relative to it, and the walk stops at the top
    of what is mounted (the host's limits above are not visible, and not guessed)."""
    root = tmp_path / "memory"
    tree(root, {"/": str(100 * MIB), "inner": V1_UNLIMITED})
    (tmp_path / "memory.limit_in_bytes").write_text("1\n")  # outside the mount: must not be read
    limits = memcg.memory_limits("4:memory:/docker/abc/inner\n", mountinfo_v1(root, root="/docker/abc"))
    assert [(lim.cgroup, lim.limit) for lim in limits] == [("/docker/abc", 100 * MIB)]
    assert memcg.memory_limits("4:memory:/docker/other\n", mountinfo_v1(root, root="/docker/abc")) == []


def test_warning_in_a_real_limited_cgroup():
    with memory_cgroup(96 * MIB) as cg:
        code = ("import os, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
                "from ufsgmem.fuse import memcg\n"
                "print([(l.directory, l.limit) for l in memcg.memory_limits()])\nprint(memcg.limit_warning())")
        out = subprocess.run([sys.executable, "-c", code, cg.procs], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        limits, warning = out.stdout.splitlines()
        assert (cg.directory, 96 * MIB) in eval(limits)  # noqa: S307 (our own repr of a list of tuples)
        assert warning.startswith("this server runs under a memory limit ")

