"""Findings of the reliability review (issue 9), one test each; every one failed before its fix.

* a server killed in the middle of a conversion of dirty memory leaves no client hung: its watcher aborts
  the FUSE connection, and ``ufsgmem umount`` cleans up and says what it did;
* ``ufsgmem umount`` never signals a process that merely has the pid of a stale pidfile;
* the commands refuse a directory that is not a ufsgmem mount instead of writing into its ``ctl``;
* the client reads a result whole, however long;
* mount points with non-ASCII names are found in /proc/self/mounts;
* the server runs with its descriptor limit at the hard limit, and its log and pidfile are private;
* messages: numbers are decimal or 0x hex only, attributes are case-blind names, a range past EOF says so,
  ``ufsgmem convert`` says why it failed, and another user's mount is EACCES, not ENOENT.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile

import pytest

from fusefix import mounted, requires_fuse, wait_for, wchan
from ufsgmem.client import GmemFile, Mount
from ufsgmem.mounts import unmount
from ufsgmem.fuse import server as fuse_server
from ufsgmem import mounts
from ufsgmem.fuse.abort import abort_mount
from ufsgmem.syscalls import pid_alive
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ufsgmem", *args], capture_output=True, text=True, timeout=60)


# --- a server that dies mid-conversion ------------------------------------------------------------------
CONVERTER = """
import fcntl, os, sys
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2
fd = os.open(sys.argv[1], os.O_RDWR)
arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(0, int(sys.argv[2]), 8, 0, 0, *(0,) * 11))
try:
    fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
    print("converted")
except OSError as exc:
    print("error", exc.errno)
"""

MAPPER = """
import mmap, os, sys
size = int(sys.argv[2])
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, size)
for off in range(0, size, 4096):
    m[off] = 1
print("dirty", flush=True)
sys.stdin.readline()
try:
    m[0] = 2
    print("touched")
except Exception as exc:
    print("error", exc)
"""


@contextlib.contextmanager
def server_to_kill():
    """A mount whose server the test kills: always unmounted (abort first if anything still hangs)."""
    from fusefix import Mount as FixMount
    from ufsgmem.mounts import start_background
    path = tempfile.mkdtemp(prefix="ufsgmem-test-")
    try:
        yield FixMount(path, start_background(path))
    finally:
        if mounts.mount_type(path):
            abort_mount(path)
            unmount(path, timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(fuse_server.logfile_path(path))
        os.rmdir(path)


@pytest.mark.slow
@pytest.mark.timeout(180)  # a regression hangs unkillably: fail (and abort in cleanup), never stall CI
def test_a_server_killed_during_a_conversion_hangs_no_client():
    size = 256 << 20
    with contextlib.ExitStack() as stack:
        mount = stack.enter_context(server_to_kill())
        mount.ctl(f"create dying size={size} flags=mmap|init_shared")
        mem = os.path.join(mount.path, "dying", "mem")
        mapper = subprocess.Popen([sys.executable, "-c", MAPPER, mem, str(size)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        stack.callback(lambda: mapper.poll() is None and mapper.kill())
        assert mapper.stdout.readline().strip() == "dirty"
        converter = subprocess.Popen([sys.executable, "-c", CONVERTER, mem, str(size)], stdout=subprocess.PIPE,
                                     text=True)
        stack.callback(lambda: converter.poll() is None and converter.kill())
        # the ioctl is in flight once the converter waits for its answer (the write-back takes a while)
        wait_for(lambda: "request_wait_answer" in wchan(converter.pid) or converter.poll() is not None, 30,
                 "the conversion to be in flight")
        os.kill(mount.pid, signal.SIGKILL)
        try:
            out, _ = converter.communicate(timeout=30)
            assert out.split()[0] in ("error", "converted"), out
            mapper.stdin.write("go\n")
            mapper.stdin.flush()
            mapper.wait(timeout=30)  # SIGBUS or an error: anything but a hang
        except subprocess.TimeoutExpired:
            abort_mount(mount.path)  # unwedge before failing, so CI goes on
            raise AssertionError("a client still hangs after its server was killed")
        done = unmount(mount.path, timeout=5)
        assert not mounts.mount_type(mount.path), "the stale mount is still there"
        assert any("server is gone" in line or "killed" in line for line in done), done


def test_umount_does_not_signal_a_reused_pid(tmp_path):
    victim = subprocess.Popen(["sleep", "60"])
    try:
        mountpoint = str(tmp_path)
        os.makedirs(fuse_server.RUN_DIR, exist_ok=True)
        with open(fuse_server.pidfile_path(mountpoint), "w") as f:  # a pidfile from an earlier boot
            f.write(f"{victim.pid} {fuse_server.start_time(victim.pid) + 1} {mountpoint}\n")
        done = unmount(mountpoint, timeout=1)
        assert victim.poll() is None, "umount killed a process that is not the server"
        assert any("not this mount's server" in line for line in done), done
        assert not os.path.exists(fuse_server.pidfile_path(mountpoint))
    finally:
        victim.kill()
        victim.wait()


def test_commands_refuse_a_directory_that_is_not_a_mount(tmp_path):
    ctl = tmp_path / "ctl"
    ctl.write_text("keep me\n")
    (tmp_path / "vm").mkdir()
    for args in (["create", str(tmp_path), "vm", "--size", "4K"], ["destroy", str(tmp_path), "vm"],
                 ["convert", str(tmp_path / "vm"), "--offset", "0", "--size", "4K", "--to", "private"],
                 ["status", str(tmp_path / "vm")]):
        proc = cli(*args)
        assert proc.returncode != 0 and "not a ufsgmem mount" in proc.stderr, (args, proc.stderr)
    assert ctl.read_text() == "keep me\n", "a command wrote into a plain file called ctl"


def test_long_results_are_read_whole(gmem):
    runs = 6000  # about 200 KiB of result text, far past one 64 KiB read
    g = gmem(runs * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        for page in range(0, runs, 2):
            arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(page * PS, PS, 8, 0, 0, *(0,) * 11))
            fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
    finally:
        os.close(fd)
    with GmemFile(g.path("")) as f:
        got = f.get_attributes()
    assert len(got) == runs and got[-1] == ((runs - 1) * PS, PS, 0)


def test_a_mount_point_with_a_non_ascii_name():
    parent = tempfile.mkdtemp(prefix="ufsgmem-test-")
    path = os.path.join(parent, "gäst mem ✓")
    os.mkdir(path)
    pid = None
    try:
        from ufsgmem.mounts import start_background
        pid = start_background(path)
        assert path in mounts.ufsgmem_mounts()
        assert mounts.mount_type(path) == mounts.FSTYPE
        assert unmount(path) == []
        assert mounts.mount_type(path) is None
    finally:
        if mounts.mount_type(path):
            unmount(path)
        if pid is not None and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        os.rmdir(path)
        os.rmdir(parent)


def test_server_descriptor_limit_and_private_files(fuse_mount):
    with open(f"/proc/{fuse_mount.pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, f"the server kept a soft descriptor limit below the hard one: {line.strip()}"
    for path in (fuse_server.pidfile_path(fuse_mount.path), fuse_server.logfile_path(fuse_mount.path)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path


def test_messages(gmem, fuse_mount):
    def refused(request: str) -> str:
        fd = os.open(os.path.join(fuse_mount.path, "ctl"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as exc:
                os.write(fd, request.encode())
            assert exc.value.errno == errno.EINVAL
            return os.read(fd, 4096).decode()
        finally:
            os.close(fd)

    assert "unknown flag '1_0'" in refused("create m1 size=4K flags=1_0")
    assert "unknown flag '0b1'" in refused("create m2 size=4K flags=0b1")
    assert "not a multiple of the page size" in refused("create m3 size=010")  # ten bytes, not a Python error
    g = gmem(4 * PS)
    assert g.request("set_memory_attributes offset=0 size=4K attributes=PRIVATE").startswith(b"ok")
    fd = os.open(g.path("ctl"), os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.write(fd, f"get_attributes offset={4 * PS} size={PS}".encode())
        assert "past the end" in os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    g.request(f"pin offset={PS} size={PS}")
    proc = cli("convert", os.path.dirname(g.path()), "--offset", "0", "--size", "8K", "--to", "private")
    assert proc.returncode == 1 and "pinned" in proc.stderr, proc.stderr
    g.request(f"unpin offset={PS} size={PS}")


def test_another_users_mount_is_eacces_not_enoent(gmem):
    g = gmem(PS)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # as nobody, in this already-loaded interpreter (nobody cannot exec root's Python)
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            GmemFile(os.path.dirname(g.path()))
        except OSError as exc:
            os.write(write_end, str(exc.errno).encode())
            code = 0
        os._exit(code)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end) as r:
        assert r.read() == str(errno.EACCES) and status == 0


def test_snapshot_cost_follows_what_is_allocated(gmem):
    """Finding 7: a snapshot read the backend's whole pagemap (8 bytes per page: 2 GiB of it for 1 TiB,
    MemoryError and EIO for 64 TiB). Now it reads only the allocated ranges."""
    g = gmem(64 << 40, backend="anon")
    g.request(f"allocate offset={PS} size={2 * PS}")
    with open(g.path("snapshot")) as f:
        snapshot = json.load(f)
    assert snapshot["size"] == 64 << 40
    assert sum(extent[2] for extent in snapshot["extents"]) == 2 * PS, snapshot["extents"]


def as_user(uid: int, fn) -> str:
    """``fn()`` in a forked child running as ``uid``: its result (str) or the errno name it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            out = str(fn())
        except OSError as exc:
            out = errno.errorcode.get(exc.errno, str(exc.errno))
        except BaseException as exc:  # noqa: BLE001
            out = repr(exc)
        os.write(write_end, out.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as r:
        return r.read()


def test_allow_other_files_belong_to_their_creator():
    """mount --allow-other: any user may create; the file is theirs (0700/0600, default_permissions); another
    user can neither open it nor destroy it; the owner and root can."""
    alice, bob = 65534, 65533
    with mounted(allow_other=True) as mount:
        def ctl(request: str):
            fd = os.open(os.path.join(mount.path, "ctl"), os.O_WRONLY)
            try:
                return os.write(fd, request.encode())
            finally:
                os.close(fd)

        def map_mem():
            fd = os.open(os.path.join(mount.path, "hers", "mem"), os.O_RDWR)
            try:
                m = __import__("mmap").mmap(fd, PS)
                m[0] = 7
                return m[0]
            finally:
                os.close(fd)

        assert as_user(alice, lambda: ctl(f"create hers size={PS} flags=mmap|init_shared")) != "EACCES"
        st = os.stat(os.path.join(mount.path, "hers"))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice, 0o700)
        assert os.stat(os.path.join(mount.path, "hers", "mem")).st_uid == alice
        assert as_user(alice, map_mem) == "7"
        assert as_user(bob, map_mem) == "EACCES", "another user opened her file"
        assert as_user(bob, lambda: ctl("destroy hers")) == "EPERM", "another user destroyed her file"
        assert as_user(alice, lambda: ctl("destroy hers")) == str(len("destroy hers"))


def test_mount_point_must_be_yours_and_a_symlink_is_resolved(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    proc = subprocess.run([sys.executable, "-m", "ufsgmem", "mount", str(theirs)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "belongs to uid 65534" in proc.stderr, proc.stderr
    assert mounts.mount_type(str(theirs)) is None
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    proc = subprocess.run([sys.executable, "-m", "ufsgmem", "mount", str(link)], capture_output=True, text=True,
                          timeout=60)
    try:
        assert proc.returncode == 0, proc.stderr
        assert f"mounted at {real} " in proc.stdout, proc.stdout
    finally:
        if mounts.mount_type(str(real)):
            unmount(str(real))
