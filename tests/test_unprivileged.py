"""An ordinary user mounts, creates, maps, converts and unmounts; a dead or hung server of theirs hangs nothing.

Each test runs its steps as a dedicated unprivileged user, ``ufsgmem-test``, which the module creates
when the suite runs as root (``useradd --system``, no home, no login shell) and removes at the end if it
created it; not root, the module skips with the reason. The user's processes run:

* through ``setpriv --reuid/--regid --clear-groups`` with an empty environment, except ``HOME`` and
  ``XDG_RUNTIME_DIR``, both directories of the user's in a scratch directory, so the runtime files land
  where a user's do (``ufsgmem/runtime.py``);
* in a private mount namespace (``unshare --mount``), where two things can be set up without changing
  the machine: ``/dev/fuse`` open to every user, as udev makes it on every distribution (where the
  machine has it 0600, as a machine without udev does, a 0666 node of the same device is bound over it
  in that namespace only: fusermount3 opens the device as the user), and, for the tests that say so,
  no ``fusectl`` (a tmpfs over ``/sys/fs/fuse/connections``), as in a container, so that the watcher's
  own way of ending a dead server's connection is what is tested;
* with an interpreter they can reach: this environment's if every directory on its path is open to
  others, else the system's Python of the same version in a throwaway virtual environment whose one
  ``.pth`` line adds this environment's site-packages (read only, nothing copied, no permission changed).
  Where neither works, the module skips with the reason.

Nothing may be left behind: after each test no process of the user exists (bounded wait, then they are
killed and the test fails), and the user's scripts check their namespace's mounts before they exit. A
step that could wedge has a bound; on a timeout the connection is aborted from outside (root, through the
real fusectl) before the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time

import pytest

from fusefix import requires_fuse
from ufsgmem.fuse.abort import server_gone
from test_c_uapi import SOURCE as UAPI_SOURCE
from test_c_uapi import assert_all_ok_nothing_skipped, output

pytestmark = [requires_fuse, pytest.mark.fuse]

USER = "ufsgmem-test"
FUSECTL = "/sys/fs/fuse/connections"
BOUND = 120  # seconds any one user script may take: a hang fails, never stalls CI
PS = 4096


# --- the user and where they run --------------------------------------------------------------------------
def _open_to_others(path: str) -> bool:
    """Whether another user can reach ``path``: every directory above it searchable by others, and the
    file itself readable (or, for a directory, searchable)."""
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(2, len(parts) + 1):
        st = os.stat(os.sep.join(parts[:i]) or os.sep)
        need = stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else stat.S_IROTH
        if not st.st_mode & need:
            return False
    return True


def _system_python() -> str | None:
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for directory in ("/usr/bin", "/usr/local/bin", "/bin"):
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and _open_to_others(candidate):
            return candidate
    return None


@pytest.fixture(scope="module")
def user():
    if os.geteuid() != 0:
        pytest.skip("creating the unprivileged test user needs root (run the suite as root)")
    for tool in ("useradd", "userdel", "setpriv", "unshare", "fusermount3", "mknod"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (util-linux, passwd, fuse3)")
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True, timeout=60)
        created = True
        pw = pwd.getpwnam(USER)
    try:
        yield pw
    finally:
        stop_processes_of(pw.pw_uid)
        if created:
            subprocess.run(["userdel", USER], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def sandbox(user):
    """A scratch directory others can enter: the user's home and runtime directory, the uAPI program,
    and the interpreter the user runs."""
    root = tempfile.mkdtemp(prefix="ufsgmem-user-")
    try:
        os.chmod(root, 0o755)
        box = {"root": root}
        for name in ("home", "run"):
            path = os.path.join(root, name)
            os.mkdir(path, 0o700)
            os.chown(path, user.pw_uid, user.pw_gid)
            box[name] = path
        os.mkdir(os.path.join(root, "dev"), 0o755)  # where a 0666 /dev/fuse node is made, in the namespace
        box["python"] = _user_python(root)
        box["uapi"] = _build_uapi(root)
        yield box
    finally:
        stop_processes_of(user.pw_uid)
        shutil.rmtree(root, ignore_errors=True)


def _user_python(root: str) -> str:
    site = sysconfig.get_paths()["purelib"]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # an editable install points here
    if not (_open_to_others(site) and _open_to_others(repo)):
        pytest.skip(f"the unprivileged user cannot read this environment's packages ({site}) or the code ({repo})")
    if _open_to_others(sys.executable):
        return sys.executable
    system = _system_python()
    if system is None:
        pytest.skip(f"the unprivileged user can reach neither this Python ({sys.executable}) nor a system "
                    f"python{sys.version_info.major}.{sys.version_info.minor}")
    venv = os.path.join(root, "venv")
    subprocess.run([system, "-m", "venv", "--without-pip", venv], check=True, capture_output=True, timeout=120)
    purelib = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    with open(os.path.join(purelib, "ufsgmem-under-test.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({site!r})\n")
    return os.path.join(venv, "bin", "python")


def _build_uapi(root: str) -> str | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    exe = os.path.join(root, "gmem_uapi")
    built = subprocess.run([compiler, "-Wall", "-Wextra", "-Werror", "-O2", "-o", exe, str(UAPI_SOURCE)],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"{UAPI_SOURCE.name} does not compile cleanly:\n{built.stderr}"
    os.chmod(exe, 0o755)
    return exe


def describe(pid: int) -> str:
    """A process's command line and where each of its threads waits, for a failure message."""
    lines = []
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
        lines.append(f"pid {pid}: {command[:200]}")
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                with open(f"/proc/{pid}/task/{tid}/stack") as f:
                    stack = " < ".join(line.split()[1].split("+")[0] for line in f if line.strip())
                lines.append(f"  thread {tid} {state}: {stack}")
    return "\n".join(lines)


def logs(box: dict) -> str:
    """The user's server logs, for a failure message."""
    run = os.path.join(box["run"], "ufsgmem")
    texts = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(run)):
            with open(os.path.join(run, name), errors="replace") as f:
                texts.append(f"--- {name}\n{f.read()[-3000:]}")
    return "\n".join(texts)


def processes_of(uid: int) -> list[int]:
    """The user's processes that still have a live thread (a zombie leader may hide one stuck in the
    kernel, holding the process's descriptors)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, KeyError, IndexError, ValueError):
                with open(f"/proc/{name}/status") as f:
                    fields = {k: v.split() for k, _, v in (line.partition(":") for line in f)}
                if int(fields["Uid"][0]) == uid and not server_gone(int(name), None):
                    found.append(int(name))
    return found


def stop_processes_of(uid: int, bound: float = 10.0) -> list[int]:
    """Wait (bounded) for the user's processes to be gone; kill what is left, by pid. What was left."""
    deadline = time.monotonic() + bound
    while processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = processes_of(uid)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:  # one stuck in the kernel on a FUSE request dies only once its connection ends
        abort_connections_of(uid)
    return left


def abort_connections_of(uid: int) -> None:
    """From outside the user's namespace, as root: abort every FUSE connection the user holds (their
    control directories belong to them), so that nothing of theirs waits in the kernel."""
    with contextlib.suppress(OSError):
        for name in os.listdir(FUSECTL):
            with contextlib.suppress(OSError):
                if os.stat(os.path.join(FUSECTL, name)).st_uid == uid:
                    with open(os.path.join(FUSECTL, name, "abort"), "w") as abort:
                        abort.write("1")


def as_user(user, box: dict, code: str, *args: str, name: str, fusectl: bool = True) -> dict:
    """Run ``code`` as the user in a private mount namespace (see the module docstring), mounting at
    ``$HOME/name``; its last stdout line, parsed as JSON. Fails, after aborting the user's connections,
    if it takes longer than BOUND."""
    setup = []
    if not os.stat("/dev/fuse").st_mode & stat.S_IWOTH:
        node = os.path.join(box["root"], "dev")
        device = os.stat("/dev/fuse").st_rdev
        setup += [f"mount -t tmpfs -o mode=0755 ufsgmem-test-dev {node}",
                  f"mknod -m 0666 {node}/fuse c {os.major(device)} {os.minor(device)}",
                  f"mount --bind {node}/fuse /dev/fuse"]
    if not fusectl and os.path.isdir(FUSECTL):
        setup.append(f"mount -t tmpfs -o mode=0755 ufsgmem-test-no-fusectl {FUSECTL}")
    command = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
               "; ".join(setup + ['exec "$@"']), "sh",
               "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
               "env", "-i", "PATH=/usr/bin:/bin", f"HOME={box['home']}", f"XDG_RUNTIME_DIR={box['run']}",
               f"UFSGMEM_TEST_NAME={name}",
               box["python"], "-c", code, *args]
    proc = subprocess.Popen(command, cwd=box["home"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=BOUND)
    except subprocess.TimeoutExpired:
        where = "\n".join(describe(pid) for pid in processes_of(user.pw_uid)) + "\n" + logs(box)
        abort_connections_of(user.pw_uid)
        stop_processes_of(user.pw_uid, bound=0)
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"the user's script hung for {BOUND} s:\n{where}\n{out}\n{err}") from None
    finally:
        left = stop_processes_of(user.pw_uid)
    assert proc.returncode == 0, f"the user's script failed ({proc.returncode}):\n{out}\n{err}"
    assert not left, f"processes of {USER} were left running: {left}\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


# --- what the user's scripts share ------------------------------------------------------------------------
PRELUDE = r"""
import errno, json, mmap, os, signal, stat, subprocess, sys, time
HOME = os.environ["HOME"]
M = os.path.join(HOME, os.environ.get("UFSGMEM_TEST_NAME", "m"))
os.makedirs(M, exist_ok=True)
PS = 4096
out = {}

def cli(*args, timeout=60):
    done = subprocess.run([sys.executable, "-m", "ufsgmem", *args], capture_output=True, text=True, timeout=timeout)
    return [done.returncode, done.stdout + done.stderr]

def mountinfo():
    with open("/proc/self/mountinfo") as f:
        return [line.split() for line in f if line.split()[4] == M]

def in_child(fn):
    # fn() in a child process, so a SIGBUS ends the child: "SIGBUS", or what fn returned
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, repr(fn()).encode())
        os._exit(0)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        text = f.read()
    return signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else text

def pidfile():
    from ufsgmem.fuse import server
    return server.read_pidfile(M)

def wait_for(predicate, bound=30.0):
    deadline = time.monotonic() + bound
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True

reaped = {}

def exited(pid):
    # whether child pid has ended (reaped here, once: its status is kept in reaped)
    if pid not in reaped:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                return False
        except ChildProcessError:
            status = None
        reaped[pid] = status
    return True

def wchan(pid):
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""

def finish():
    out["mounted_after"] = [line[4] for line in mountinfo()]
    print(json.dumps(out))

def mount_and_create(name, size):
    # the mount and one file; on failure say why and stop (after unmounting what was mounted)
    out["mount"] = cli("mount", M)
    out["create"] = cli("create", M, name, "--size", str(size), "--flags", "mmap,init_shared")
    if out["mount"][0] or out["create"][0]:
        if not out["mount"][0]:
            cli("umount", M)
        finish()
        sys.exit(0)
"""

MOUNT_CONVERT_UNMOUNT = PRELUDE + r"""
from ufsgmem.client import GmemFile
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
uapi = sys.argv[1]
out["mount"] = cli("mount", M)
out["mountinfo"] = [(line[-3], line[-1]) for line in mountinfo()]  # fstype, super options
run = os.path.join(os.environ["XDG_RUNTIME_DIR"], "ufsgmem")
out["run_dir"] = [run, oct(stat.S_IMODE(os.stat(run).st_mode))]
out["run_files"] = sorted((name, oct(stat.S_IMODE(os.stat(os.path.join(run, name)).st_mode)))
                          for name in os.listdir(run))
out["create"] = cli("create", M, "vm0", "--size", "4M", "--flags", "mmap,init_shared")
with GmemFile(os.path.join(M, "vm0")) as g:
    fd = os.open(os.path.join(M, "vm0", "mem"), os.O_RDWR)
    m = mmap.mmap(fd, 4 * PS)
    m[PS:PS + 3] = b"abc"
    g.set_memory_attributes(PS, PS, KVM_MEMORY_ATTRIBUTE_PRIVATE)  # ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)
    out["private_read"] = in_child(lambda: m[PS])
    out["attributes"] = g.get_attributes(0, 4 * PS)
    g.convert(PS, PS, "shared")  # the text control file
    out["shared_again"] = bytes(m[PS:PS + 3]).decode()
    m.close()
    os.close(fd)
out["convert_cli"] = cli("convert", os.path.join(M, "vm0"), "--offset", "0", "--size", "4K", "--to", "private")
if uapi:
    out["uapi_create"] = cli("create", M, "uapi", "--size", str(4 << 20), "--flags", "mmap,init_shared")
    done = subprocess.run([uapi, "--path", os.path.join(M, "uapi", "mem"), "--size", str(4 << 20)],
                          capture_output=True, text=True, timeout=60)
    out["uapi"] = [done.returncode, done.stdout, done.stderr]
out["umount"] = cli("umount", M)
out["run_files_after"] = sorted(os.listdir(run))
finish()
"""


def test_a_user_mounts_maps_converts_and_unmounts(user, sandbox):
    """The whole path as an ordinary user: mount through fusermount3, runtime files private in
    XDG_RUNTIME_DIR, the ioctl and both control forms convert, a private page is SIGBUS to the host, a C
    program that knows only the uAPI passes every check, and umount leaves nothing."""
    out = as_user(user, sandbox, MOUNT_CONVERT_UNMOUNT, sandbox["uapi"] or "", name="whole-path")
    assert out["mount"][0] == 0, out["mount"]
    assert [fstype for fstype, _ in out["mountinfo"]] == ["fuse.ufsgmem"], out
    assert f"user_id={user.pw_uid}" in out["mountinfo"][0][1].split(","), out["mountinfo"]
    assert out["run_dir"] == [os.path.join(sandbox["run"], "ufsgmem"), "0o700"], out
    assert out["run_files"] and all(mode == "0o600" for _, mode in out["run_files"]), out["run_files"]
    assert {name.rsplit(".", 1)[1] for name, _ in out["run_files"]} == {"pid", "log"}, out["run_files"]
    assert out["create"][0] == 0, out["create"]
    assert out["private_read"] == "SIGBUS", out
    assert [tuple(run) for run in out["attributes"]] == [(0, PS, 0), (PS, PS, 8), (2 * PS, 2 * PS, 0)], out
    assert out["shared_again"] == "abc", "the bytes did not survive private and back"
    assert out["convert_cli"][0] == 0, out["convert_cli"]
    if sandbox["uapi"] is None:
        pytest.skip("no C compiler for examples/gmem_uapi.c (the rest passed)")
    assert out["uapi_create"][0] == 0, out["uapi_create"]
    done = subprocess.CompletedProcess([], out["uapi"][0], out["uapi"][1], out["uapi"][2])
    found = assert_all_ok_nothing_skipped(done)
    assert any("SIGBUS reading page" in c.text for c in found), output(done)
    assert out["umount"] == [0, ""], out["umount"]
    assert out["mounted_after"] == [], out
    assert out["run_files_after"] == [], "a clean umount leaves no pidfile and no uneventful log"


KILLED_MID_CONVERSION = PRELUDE + r"""
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2
size = int(sys.argv[1])
mount_and_create("dying", size)
mem = os.path.join(M, "dying", "mem")
server, _ = pidfile()
fd = os.open(mem, os.O_RDWR)
m = mmap.mmap(fd, size)
for off in range(0, size, PS):
    m[off] = 1  # every page dirty: the conversion must write them all back first
pid = os.fork()
if pid == 0:  # the converter
    arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(0, size, 8, 0, 0, *(0,) * 11))
    import fcntl
    try:
        fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
        os._exit(0)
    except OSError as exc:
        os._exit(exc.errno)
wait_for(lambda: "request_wait_answer" in wchan(pid) or exited(pid))
out["in_flight"] = not exited(pid)  # the ioctl waits for its answer: the write-back is under way
os.kill(server, signal.SIGKILL)
ended = wait_for(lambda: exited(pid), 30)  # bounded: the converter gets its answer (an error)
out["converter_ended"] = ended
if ended and reaped[pid] is not None:
    out["converter_exit"] = os.waitstatus_to_exitcode(reaped[pid])
if not ended:
    os.kill(pid, signal.SIGKILL)
out["touch_after"] = in_child(lambda: m.__setitem__(0, 2))
try:
    m.close()
    os.close(fd)
except OSError as exc:
    out["close"] = exc.errno
from ufsgmem.fuse import server as fs
from ufsgmem.fuse.abort import server_gone
out["server_gone"] = wait_for(lambda: server_gone(server, None), 30)
def log():
    with open(fs.logfile_path(M)) as f:
        return f.read()
wait_for(lambda: "died;" in log(), 30)  # the watcher says what it did once it has done it
out["log"] = log()
out["umount"] = cli("umount", M)
finish()
"""


@pytest.mark.slow
@pytest.mark.timeout(3 * BOUND)  # two attempts at most, each bounded
@pytest.mark.parametrize("fusectl", [True, False], ids=["fusectl", "no-fusectl"])
def test_a_user_server_killed_mid_conversion_hangs_no_client(user, sandbox, fusectl):
    """SIGKILL to a user's server while it writes back 256 MiB of dirty pages for a conversion: one of its
    threads is stuck in the kernel, so only ending the connection frees the converter and the mapper.
    With fusectl the watcher aborts through the user's own control files; without it, it answers what the
    server left and closes the last /dev/fuse descriptor. Either way nobody hangs and umount cleans up."""
    for size in (256 << 20, 1 << 30):  # a busy machine may let 256 MiB finish before the kill: try 1 GiB
        out = as_user(user, sandbox, KILLED_MID_CONVERSION, str(size), fusectl=fusectl,
                      name=f"killed-{fusectl}-{size >> 20}M")
        assert out["mount"][0] == 0 and out["create"][0] == 0, out
        if out["in_flight"]:
            break
    assert out["in_flight"], f"the conversion was over before the server was killed: {out}"
    assert out["converter_ended"], f"the converter still hangs after its server was killed\n{out['log']}"
    assert out["touch_after"] in ("SIGBUS", "None"), out["touch_after"]
    assert out["server_gone"], f"the killed server never finished exiting\n{out['log']}"
    how = "died; aborted FUSE connection" if fusectl else "and closed the last /dev/fuse descriptor"
    assert how in out["log"], out["log"]
    assert out["umount"][0] == 0, out["umount"]
    assert "removed the stale mount" in out["umount"][1], out["umount"]
    assert out["mounted_after"] == [], out


STOPPED_SERVER = PRELUDE + r"""
mount_and_create("stuck", 2 * PS)
server, _ = pidfile()
fd = os.open(os.path.join(M, "stuck", "mem"), os.O_RDWR)
m = mmap.mmap(fd, 2 * PS)
m.madvise(mmap.MADV_RANDOM)
m[0] = 1
os.kill(server, signal.SIGSTOP)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # the fault on an uncached page waits for the stopped server
    os.close(r)
    os.write(w, b"faulting")
    value = m[PS]
    os._exit(0)
os.close(w)
os.read(r, 16)
out["blocked"] = wait_for(lambda: "request_wait_answer" in wchan(pid) or "folio" in wchan(pid))
out["umount"] = cli("umount", "--timeout", "2", M)
ended = wait_for(lambda: exited(pid), 30)
out["fault_ended"] = ended
if not ended:
    os.kill(pid, signal.SIGKILL)
m.close()
os.close(fd)
finish()
"""


@pytest.mark.timeout(2 * BOUND)
@pytest.mark.parametrize("fusectl", [True, False], ids=["fusectl", "no-fusectl"])
def test_umount_cleans_up_a_stopped_user_server(user, sandbox, fusectl):
    """A user's server stopped (SIGSTOP holds SIGTERM back) while a fault waits for it: ``ufsgmem umount``
    as the user kills it, the connection ends (fusectl, or the watcher), the fault ends, the mount goes."""
    out = as_user(user, sandbox, STOPPED_SERVER, fusectl=fusectl, name=f"stopped-{fusectl}")
    assert out["mount"][0] == 0 and out["create"][0] == 0, out
    assert out["blocked"], out
    code, said = out["umount"]
    assert code == 0, said
    assert "did not stop within 2 s: killed" in said, said
    assert ("aborted FUSE connection" if fusectl else "ended by the server's watcher") in said, said
    assert "removed the stale mount" in said, said
    assert out["fault_ended"], f"the fault still waits after umount:\n{said}"
    assert out["mounted_after"] == [], out


WHAT_NEEDS_MORE = PRELUDE + r"""
out["allow_other"] = cli("mount", M, "--allow-other")
if out["allow_other"][0] == 0:  # this machine lets users serve others (user_allow_other)
    cli("umount", M)
out["low_latency"] = cli("mount", M, "--low-latency")
finish()
"""


def test_what_a_user_cannot_do_says_what_it_needs(user, sandbox):
    """--allow-other without user_allow_other, and --low-latency, fail at mount time with the remedy."""
    from ufsgmem.fuse.usermount import user_allow_other
    out = as_user(user, sandbox, WHAT_NEEDS_MORE, name="needs-more")
    if not user_allow_other():
        assert out["allow_other"][0] != 0, out
        assert "needs a line `user_allow_other` in /etc/fuse.conf" in out["allow_other"][1], out
    assert out["low_latency"][0] != 0, out
    assert "it needs root: mount as root, or leave --low-latency out" in out["low_latency"][1], out
    assert out["mounted_after"] == [], out
