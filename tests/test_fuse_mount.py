"""``ufsgmem mount`` / ``umount``: readiness, clean unmount on signals, clear errors, dead-server cleanup."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile

import pytest

from fusefix import requires_fuse
from ufsgmem.syscalls import pid_alive
from ufsgmem.fuse import server

pytestmark = [requires_fuse, pytest.mark.fuse]


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ufsgmem", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


@pytest.fixture
def mountdir():
    path = tempfile.mkdtemp(prefix="ufsgmem-mnt-")
    yield path
    if server.mount_type(path):
        subprocess.run(["umount", "-l", path], check=False)
    pid = server.read_pid(path)
    if pid and pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    for leftover in (server.pidfile_path(path), server.logfile_path(path)):
        if os.path.exists(leftover):
            os.unlink(leftover)
    os.rmdir(path)


def test_background_mount_is_usable_when_the_command_returns(mountdir):
    result = cli("mount", mountdir)
    assert result.returncode == 0, result.stderr
    pid = server.read_pid(mountdir)
    assert pid and pid_alive(pid)
    assert server.mount_type(mountdir) == server.FSTYPE
    assert os.listdir(mountdir) == ["ctl"]
    result = cli("umount", mountdir)
    assert result.returncode == 0, result.stderr
    assert server.mount_type(mountdir) is None and not pid_alive(pid)
    assert not os.path.exists(server.pidfile_path(mountdir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_unmount_cleanly(mountdir, signum):
    proc = subprocess.Popen([sys.executable, "-m", "ufsgmem", "mount", "--foreground", mountdir],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "mounted" in line, line + proc.stderr.read()
        with open(os.path.join(mountdir, "ctl"), "w") as f:
            f.write("create vm size=1M flags=mmap|init_shared")
        assert os.listdir(mountdir) == ["ctl", "vm"]
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert server.mount_type(mountdir) is None
    assert not os.path.exists(server.pidfile_path(mountdir))


def test_missing_mountpoint_is_a_clear_error():
    result = cli("mount", "/nonexistent/ufsgmem-mnt")
    assert result.returncode == 1 and "No such file or directory" in result.stderr
    assert "/nonexistent/ufsgmem-mnt" in result.stderr


def test_busy_mountpoint_is_a_clear_error(fuse_mount):
    result = cli("mount", fuse_mount.path)
    assert result.returncode == 1 and "busy" in result.stderr
    assert os.listdir(fuse_mount.path)[:1] == ["ctl"], "the existing mount is untouched"


def test_a_dead_server_is_cleaned_up_by_umount(mountdir):
    assert cli("mount", mountdir).returncode == 0
    pid = server.read_pid(mountdir)
    os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):  # SIGKILL is delivered; the pid goes once the kernel has reaped it
        os.sched_yield()
    with pytest.raises(OSError) as info:
        os.listdir(mountdir)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    result = cli("mount", mountdir)
    assert result.returncode == 1 and "umount" in result.stderr, "mounting over a dead mount says what to do"
    result = cli("umount", mountdir)
    assert result.returncode == 0, result.stderr
    assert server.mount_type(mountdir) is None
    assert os.listdir(mountdir) == []


def test_umount_of_something_else_is_refused(mountdir):
    result = cli("umount", mountdir)
    assert result.returncode == 1 and "not a ufsgmem mount" in result.stderr


def test_sigterm_with_a_live_mapping_unmounts_and_the_mapping_fails_cleanly(mountdir):
    """The server ends while a process still maps a file: the mount goes (lazily), nothing hangs, and an
    access the server would have to serve is SIGBUS, never a hang."""
    import mmap

    from test_fuse_mem import in_child
    assert cli("mount", mountdir).returncode == 0
    pid = server.read_pid(mountdir)
    with open(os.path.join(mountdir, "ctl"), "w") as f:
        f.write("create vm size=8M flags=mmap|init_shared")
    fd = os.open(os.path.join(mountdir, "vm", "mem"), os.O_RDWR)
    m = mmap.mmap(fd, 8 << 20, mmap.MAP_SHARED)
    os.close(fd)
    m[:5] = b"hello"
    os.kill(pid, signal.SIGTERM)
    while pid_alive(pid):
        os.sched_yield()
    assert server.mount_type(mountdir) is None
    assert m[:5] == b"hello", "pages already in the page cache stay readable"
    assert in_child(lambda: m[7 << 20]) == -signal.SIGBUS, "a page the dead server would fill: SIGBUS"
    m.close()


def _cpus_of_every_thread(pid: int) -> set[str]:
    lists = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            lists |= {line.split()[1] for line in f if line.startswith("Cpus_allowed_list:")}
    return lists


@pytest.mark.parametrize("cpu", sorted(os.sched_getaffinity(0))[:2])
def test_cpus_pins_every_server_thread(mountdir, cpu):
    result = cli("mount", mountdir, "--cpus", str(cpu))
    assert result.returncode == 0, result.stderr
    pid = server.read_pid(mountdir)
    # a create runs in a worker thread, so the threads started after mounting are counted too
    assert cli("create", mountdir, "vm", "--size", "1M", "--flags", "mmap,init_shared").returncode == 0
    assert _cpus_of_every_thread(pid) == {str(cpu)}, "every thread on the one CPU asked for"
    assert cli("umount", mountdir).returncode == 0


@pytest.mark.parametrize("cpus, message", [
    ("x", "bad CPU list"), ("3-1", "is not a range"), ("0,", "bad CPU list"), ("-1", "bad CPU list"),
    (str(max(os.sched_getaffinity(0)) + 1), "is not available here"),
])
def test_bad_cpu_lists_are_refused_before_mounting(mountdir, cpus, message):
    result = cli("mount", mountdir, "--cpus", cpus)
    assert result.returncode == 1 and message in result.stderr and "Errno 22" in result.stderr, result.stderr
    assert server.mount_type(mountdir) is None and server.read_pid(mountdir) is None
