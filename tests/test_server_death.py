"""A server that dies at the moments ``test_reliability`` does not cover leaves no client hung.

``tests/test_reliability.py`` kills a server in the middle of a conversion. These kill it at the other
moments a VMM can meet, and check what the client sees, which must be an answer or an error (never a
wait that cannot end):

* ``test_a_mapping_touched_when_the_server_dies``: a process maps ``mem`` and leaves pages in three
  states: dirty, read (cached and clean), and never touched (not cached: ``MADV_RANDOM``, so no
  readahead fills neighbours, and ``mincore`` checks each page's state right before the kill). Once the
  server is SIGKILLed, every cached page still holds its bytes and takes a write, every uncached page is
  SIGBUS (its fill has nobody to answer it), and the process can munmap, close and exit.
* ``test_a_fault_blocked_when_the_server_dies``: the server is stopped (SIGSTOP), so a fault on an
  uncached page waits in the kernel for a READ answer that cannot come (``/proc/PID/wchan`` says
  ``request_wait_answer``); then the stopped server is SIGKILLed. The faulting process must get SIGBUS
  and go away: a request left queued on a connection nobody ends would keep it waiting for good.
* ``test_open_descriptors_when_an_idle_server_dies``: a process holds ``mem``, control, status and
  ``guest`` descriptors, no mapping; the server dies while idle. A request on a control file fails with
  ENOTCONN (ECONNABORTED if the watcher aborted first), close(2) returns at once, and the process
  exits, closing the rest.
* ``test_a_server_killed_the_moment_it_is_ready``: killed before its watcher's Python has started, the
  server is still watched (the watcher blocked its death signal before exec; this failed before).

After each, the server's watcher (``ufsgmem/fuse/abort.py``) must have aborted the connection and said
so in the log, and ``ufsgmem umount`` must remove the stale mount and report that the server is gone.
At these moments no thread of the server is stuck in the kernel, so its death alone closes
``/dev/fuse`` and the kernel ends the connection too: the client checks fail if that stops being true
(a thread of the server that cannot die, a ``/dev/fuse`` descriptor leaked to another process) and the
watcher does not make up for it; the watcher checks fail if the watcher does not fire.

Each wait is bounded: the clients run in subprocesses waited for with a timeout, the test has a
pytest timeout, and the cleanup kills what the test started (by pid, the server only if its start time
still matches) and aborts the FUSE connection before it unmounts, so a regression fails the test with
the state of every process (wchan, kernel stacks) and the server's log instead of wedging CI. No fixed
sleeps: every wait polls for the state it needs, with a deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from fusefix import Mount, requires_fuse, wait_for, wchan
from ufsgmem.mounts import start_background
from ufsgmem.mounts import unmount
from ufsgmem.fuse import server as fuse_server
from ufsgmem import mounts
from ufsgmem.fuse.abort import abort_mount
from ufsgmem.syscalls import pid_alive

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096
BOUND = 30.0  # seconds a client may take to finish once its server is dead: a hang fails, not stalls CI


# --- helpers ----------------------------------------------------------------------------------------------
def proc_state(pid: int) -> str:
    """State letter from /proc/PID/stat (R, S, D, T, Z...), '' if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def describe(pid: int) -> str:
    """Where a process is, for a failure message: state, wchan and the kernel stack of each thread."""
    lines = []
    with contextlib.suppress(OSError):
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            lines.append(f"  thread {tid}: state {proc_state(int(tid))} wchan {wchan(int(tid)) or '-'}")
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/stack") as f:
                    lines += [f"    {line}" for line in f.read().splitlines()]
    return f"pid {pid}:\n" + ("\n".join(lines) or "  (gone)")


@dataclass
class DyingMount(Mount):
    started: int | None = None
    clients: list[subprocess.Popen] = field(default_factory=list)

    def server_is_ours(self) -> bool:
        """The server process still exists (maybe a zombie) and is the one we started (not a reused pid)."""
        return self.started is not None and fuse_server.start_time(self.pid) == self.started

    def signal_server(self, sig: int) -> None:
        if self.server_is_ours():
            os.kill(self.pid, sig)

    def server_gone(self) -> bool:
        return not (self.server_is_ours() and pid_alive(self.pid))

    def client(self, code: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.clients.append(proc)
        return proc

    def diagnose(self) -> str:
        """What a failure report needs: every client's and the server's state, and the server's log."""
        parts = [describe(c.pid) for c in self.clients if c.poll() is None]
        parts.append("server " + (describe(self.pid) if self.server_is_ours() else f"pid {self.pid}: gone"))
        parts.append(f"server log ({fuse_server.logfile_path(self.path)}):\n{self.log}")
        return "\n".join(parts)


def watcher_of(server: int) -> int | None:
    """The pid of the watcher ``server`` started (``python -m ufsgmem.fuse.abort --watch SERVER ...``)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
                if b"ufsgmem.fuse.abort" in args and args[args.index(b"--watch") + 1] == str(server).encode():
                    return int(name)
    return None


def takes_sigterm(pid: int) -> bool:
    """Whether SIGTERM no longer kills ``pid``, the watcher: it has blocked it (/proc/PID/status SigBlk),
    or waits for it in sigwait(2) (which unblocks the signals it waits for while it waits)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return False
    return bool(mask & (1 << (signal.SIGTERM - 1))) or "sigtimedwait" in wchan(pid)


@contextlib.contextmanager
def server_to_kill(armed: bool = True):
    """A mount whose server the test kills, once the server's watcher is armed (unless ``armed`` is
    False: the test kills it the moment it is ready). Whatever
    happens, afterwards: clients killed (by pid), the server SIGKILLed if still ours (a stopped one too),
    the connection aborted so nothing in the kernel waits for it, every client reaped, the mount removed
    and the directory with it.

    Why wait for the watcher: these tests are about the clients, so they kill the server only once the
    watcher can do its job; ``test_a_server_killed_the_moment_it_is_ready`` checks that this is at once."""
    path = tempfile.mkdtemp(prefix="ufsgmem-test-")
    mount = None
    try:
        pid = start_background(path)
        mount = DyingMount(path, pid, fuse_server.start_time(pid))
        if armed:
            wait_for(lambda: (w := watcher_of(pid)) is not None and takes_sigterm(w), BOUND,
                     lambda: f"the watcher of server {pid} to take SIGTERM\n{mount.diagnose()}")
        yield mount
    finally:
        if mount is not None:
            for proc in mount.clients:
                if proc.poll() is None:
                    proc.kill()
            if mount.server_is_ours() and pid_alive(mount.pid):
                os.kill(mount.pid, signal.SIGKILL)
        if mounts.mount_type(path):
            abort_mount(path)  # before waiting for anyone: a client may wait in the kernel for the server
        if mount is not None:
            for proc in mount.clients:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.communicate(timeout=10)
        if mounts.mount_type(path):
            unmount(path, timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(fuse_server.logfile_path(path))
        os.rmdir(path)


def read_line(proc: subprocess.Popen, mount: DyingMount) -> str:
    """One line from a client that is expected to print it (before anything dies, so no hang is possible
    unless the client failed: then its stderr explains)."""
    line = proc.stdout.readline()
    if not line:
        _, err = proc.communicate(timeout=BOUND)
        raise AssertionError(f"the client exited with {proc.returncode} early:\n{err}\n{mount.diagnose()}")
    return line.strip()


def kill_server_and_wait(mount: DyingMount) -> None:
    mount.signal_server(signal.SIGKILL)
    wait_for(mount.server_gone, BOUND, lambda: f"the killed server (pid {mount.pid}) to exit\n{mount.diagnose()}")


def finish(proc: subprocess.Popen, mount: DyingMount, stdin: str | None = None) -> tuple[str, str]:
    """Let a client finish within BOUND; if it does not, say where everyone is, abort the connection so
    the client can go, and fail."""
    try:
        return proc.communicate(stdin, timeout=BOUND)
    except subprocess.TimeoutExpired:
        where = mount.diagnose()
        abort_mount(mount.path)
        raise AssertionError(f"a client still hangs {BOUND} s after its server died:\n{where}") from None


def cleaned_up_after(mount: DyingMount) -> None:
    """The watcher saw its server die and aborted the connection (the kernel also ends it when the dead
    server's /dev/fuse closes, but not while a thread of the server is stuck in the kernel); then
    ``ufsgmem umount`` removes the stale mount and says the server is gone."""
    wait_for(lambda: "died; aborted FUSE connection" in mount.log, BOUND,
             lambda: f"the watcher to abort the connection; log:\n{mount.log}")
    done = unmount(mount.path, timeout=5)
    assert not mounts.mount_type(mount.path), f"the stale mount is still there: {done}"
    assert any("the server is gone" in line for line in done), done
    assert any("removed the stale mount" in line for line in done), done


# --- 1. a mapping touched ---------------------------------------------------------------------------------
TOUCHED = r"""
import ctypes, json, mmap, os, signal, sys
PS = 4096
path, pages = sys.argv[1], int(sys.argv[2])
size = pages * PS
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, size)  # MAP_SHARED
m.madvise(mmap.MADV_RANDOM)  # a fault reads its own page only: no readahead caches a neighbour
kinds = {}
for page in range(pages):
    kind = ("dirty", "clean", "untouched", "untouched")[page % 4]
    kinds[page] = kind
    if kind == "dirty":
        m[page * PS:page * PS + 2] = bytes([0xA5, page & 0xFF])
    elif kind == "clean":
        assert m[page * PS] == 0
libc = ctypes.CDLL(None, use_errno=True)
view = (ctypes.c_char * size).from_buffer(m)
vec = (ctypes.c_ubyte * pages)()
if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec) != 0:
    raise OSError(ctypes.get_errno(), "mincore")
del view
print(json.dumps({"kinds": kinds, "resident": [v & 1 for v in vec]}), flush=True)
sys.stdin.readline()  # the server is dead now

def probe(page):
    # In a child, so that a SIGBUS ends the child, not this process. A dirty page must still hold what we
    # wrote and a clean one zeros; then each takes a write.
    expect = bytes([0xA5, page & 0xFF]) if kinds[page] == "dirty" else bytes(2)
    pid = os.fork()
    if pid == 0:
        ok = m[page * PS:page * PS + 2] == expect
        m[page * PS + 2] = 0x5A
        os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return {0: "ok", 3: "wrong bytes"}.get(os.WEXITSTATUS(status), f"exit {os.WEXITSTATUS(status)}")

seen = {page: probe(page) for page in range(pages)}
m.close()  # munmap
os.close(fd)
print(json.dumps(seen), flush=True)
"""


@pytest.mark.timeout(120)  # a regression hangs in the kernel: fail (and abort in cleanup), never stall CI
def test_a_mapping_touched_when_the_server_dies():
    pages = 32
    with server_to_kill() as mount:
        mount.ctl(f"create touched size={pages * PS} flags=mmap|init_shared")
        client = mount.client(TOUCHED, os.path.join(mount.path, "touched", "mem"), str(pages))
        before = json.loads(read_line(client, mount))
        kinds = {int(page): kind for page, kind in before["kinds"].items()}
        resident = before["resident"]
        # the states are what the test means them to be: touched pages cached, the others not
        assert [bool(r) for r in resident] == [kinds[p] != "untouched" for p in range(pages)], before

        kill_server_and_wait(mount)
        out, err = finish(client, mount, "go\n")
        assert client.returncode == 0, f"the client exited with {client.returncode}:\n{err}\n{mount.diagnose()}"
        seen = {int(page): what for page, what in json.loads(out.splitlines()[-1]).items()}
        expected = {page: ("SIGBUS" if kind == "untouched" else "ok") for page, kind in kinds.items()}
        assert seen == expected, f"what each page did after the server died (expected: {expected})"
        cleaned_up_after(mount)


# --- 2. a fault blocked -----------------------------------------------------------------------------------
BLOCKED = r"""
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 2 * 4096)
m.madvise(mmap.MADV_RANDOM)
m[0] = 1  # the mapping works while the server runs
print("mapped", flush=True)
sys.stdin.readline()
print("faulting", flush=True)
value = m[4096]  # not cached: a READ the stopped server cannot answer
print("read", value, flush=True)
"""

# Where a fault waits for the server's answer: the synchronous READ of an MADV_RANDOM fault
# (filemap_fault > fuse_read_folio > request_wait_answer), or the folio lock of a readahead fill, should
# a kernel read ahead after all
WAITING_FOR_FUSE = ("request_wait_answer", "folio_wait_bit", "__folio_lock")


@pytest.mark.timeout(120)
def test_a_fault_blocked_when_the_server_dies():
    with server_to_kill() as mount:
        mount.ctl(f"create blocked size={2 * PS} flags=mmap|init_shared")
        client = mount.client(BLOCKED, os.path.join(mount.path, "blocked", "mem"))
        assert read_line(client, mount) == "mapped"

        mount.signal_server(signal.SIGSTOP)
        wait_for(lambda: proc_state(mount.pid) == "T", BOUND, "the server to stop")
        client.stdin.write("go\n")
        client.stdin.flush()
        assert read_line(client, mount) == "faulting"
        wait_for(lambda: any(w in wchan(client.pid) for w in WAITING_FOR_FUSE) or client.poll() is not None,
                 BOUND, lambda: f"the fault to wait for the stopped server\n{mount.diagnose()}")
        assert client.poll() is None, f"the fault did not wait for the stopped server: {client.communicate()}"
        assert proc_state(client.pid) in ("S", "D"), describe(client.pid)

        kill_server_and_wait(mount)  # a stopped process dies of SIGKILL too
        out, err = finish(client, mount)
        assert client.returncode == -signal.SIGBUS, \
            f"the blocked fault ended with {client.returncode}, not SIGBUS:\n{out}{err}\n{mount.diagnose()}"
        assert "read" not in out, out
        cleaned_up_after(mount)


# --- 3. open descriptors, no mapping ----------------------------------------------------------------------
IDLE = r"""
import errno, json, os, sys, time
mount, name = sys.argv[1], sys.argv[2]
fds = {
    "mem": os.open(os.path.join(mount, name, "mem"), os.O_RDWR),
    "ctl": os.open(os.path.join(mount, name, "ctl"), os.O_RDWR),
    "status": os.open(os.path.join(mount, name, "status"), os.O_RDONLY),
    "guest": os.open(os.path.join(mount, name, "guest"), os.O_RDWR),
    "mount ctl": os.open(os.path.join(mount, "ctl"), os.O_WRONLY),
}
os.write(fds["ctl"], b"get_attributes")
assert os.read(fds["ctl"], 4096), "no result"
print("open", flush=True)
sys.stdin.readline()  # the server is dead now

def attempt(fn):
    started = time.monotonic()
    try:
        fn()
        result = "ok"
    except OSError as exc:
        result = errno.errorcode.get(exc.errno, str(exc.errno))
    return [result, round(time.monotonic() - started, 3)]

seen = {"request": attempt(lambda: os.write(fds["ctl"], b"get_attributes"))}
for what in ("mem", "ctl", "status"):  # the others stay open for exit to close
    seen[f"close {what}"] = attempt(lambda: os.close(fds[what]))
print(json.dumps(seen), flush=True)
"""


@pytest.mark.timeout(120)
def test_open_descriptors_when_an_idle_server_dies():
    with server_to_kill() as mount:
        mount.ctl(f"create idle size={4 * PS} flags=mmap|init_shared")
        client = mount.client(IDLE, mount.path, "idle")
        assert read_line(client, mount) == "open"

        kill_server_and_wait(mount)
        started = time.monotonic()
        out, err = finish(client, mount, "go\n")
        assert client.returncode == 0, f"the client exited with {client.returncode}:\n{err}\n{mount.diagnose()}"
        seen = json.loads(out.splitlines()[-1])
        assert seen["request"][0] in ("ENOTCONN", "ECONNABORTED"), seen  # closed, or aborted by the watcher first
        for what in ("close mem", "close ctl", "close status"):
            assert seen[what][0] in ("ok", "ENOTCONN", "ECONNABORTED") and seen[what][1] < 5, seen
        assert time.monotonic() - started < 10, f"the client took {time.monotonic() - started:.1f} s to exit"
        cleaned_up_after(mount)


# --- 4. the moment the server is ready ------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_a_server_killed_the_moment_it_is_ready():
    """The watcher blocks its death signal before it execs, so a server killed while the watcher's Python
    is still starting is still seen: the signal waits for its sigwait. (It used to arrive first, kill the
    watcher with SIGTERM's default action, and leave nobody to abort the connection.)"""
    with server_to_kill(armed=False) as mount:
        kill_server_and_wait(mount)
        cleaned_up_after(mount)
