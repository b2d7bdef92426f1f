"""ufsgmem mounts seen from outside: which exist, and starting and stopping their servers.

The library's one way to mount and unmount: the ``mount`` and ``umount`` commands and the testing kit's
``mounted()`` (through :func:`mounted`, a mount for a block) all come here, so the library never needs the command line (the commands are argument
parsing and printing over this module). Nothing here imports the FUSE binding
at module level: the client asks :func:`mount_type` whether a path is a ufsgmem mount without loading the
server; :func:`start_background` runs the server in a process of its own, and only it and
:func:`unmount` reach for the server's record of its pidfile and log.

Starting (:func:`start_background`): the server runs detached (a session of its own, its output to its
log in the runtime directory, ``ufsgmem/runtime.py``) and this returns its pid once the mount answers
requests: the server writes ``ready`` to a pipe only after a request has gone through the mount.

Stopping (:func:`unmount`), each step only when needed, each one reported:

1. The pid in the pidfile is signalled only if that process really is this mount's server (the same pid
   *and* start time as recorded): a stale pidfile whose pid was reused by another process is ignored,
   never signalled.
2. SIGTERM, and the server unmounts and exits. One that does not stop within ``timeout`` (or is
   stopped: SIGSTOP holds SIGTERM back) gets SIGKILL.
3. If the mount is still there (the server died, is a zombie, or cannot finish exiting because a thread
   of it waits in the kernel), its FUSE connection is aborted, so every client still waiting on it gets
   an error instead of hanging, and the mount is removed (lazy unmount; ``fusermount3 -u -z`` for a
   user). Root aborts through fusectl; so does a user where fusectl is mounted (the kernel gives the
   connection's control files to the user who mounted). Elsewhere the server's watcher ends the
   connection for a user (``ufsgmem/fuse/abort.py``): this waits, bounded, for the killed server to
   finish exiting, which the watcher makes possible.

``ufsgmem/fuse/abort.py`` says why a killed server can hang its clients, and how every server also
arranges for that not to happen even if nobody runs ``ufsgmem umount``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator

from .fuse.abort import FSTYPE, mount_path, unescape
from .syscalls import pid_alive

__all__ = ["FSTYPE", "mount_type", "ufsgmem_mounts", "start_background", "unmount", "mounted", "is_server_of"]


# --- which mounts exist -----------------------------------------------------------------------------------
def _mounts() -> list[tuple[str, str]]:
    """``(mount point, filesystem type)`` of every mount, in /proc/self/mounts order (read as bytes: a
    mount point may have any name, escaped as ``\\040`` for a space and raw bytes otherwise)."""
    with open("/proc/self/mounts", "rb") as f:
        return [(unescape(fields[1]), os.fsdecode(fields[2])) for fields in map(bytes.split, f)]


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint`` (from /proc/self/mounts), or None."""
    target = mount_path(mountpoint)
    found = None
    for path, fstype in _mounts():
        if path == target:
            found = fstype  # the last one wins (mounts stack)
    return found


def ufsgmem_mounts() -> set[str]:
    """Every mount point with a ufsgmem filesystem on it."""
    return {path for path, fstype in _mounts() if fstype == FSTYPE}


# --- starting a server ----------------------------------------------------------------------------------
def start_background(mountpoint: str, *, backend: str = "anon", debug: bool = False,
                     cpus: str | None = None, in_place_conversion: bool = True, allow_other: bool = False,
                     max_memory: int | None = None, low_latency: bool = False, per_user: str | None = None,
                     hot_path: str = "compiled") -> int:
    """Start the server detached; return its pid once the mount works, or raise OSError with its error."""
    from .fuse import server
    from .runtime import ensure_run_dir

    ensure_run_dir()
    read_end, write_end = os.pipe()
    command = [sys.executable, "-m", "ufsgmem.fuse.server", "--ready-fd", str(write_end),
               "--backend", backend, mountpoint] + (["--debug"] if debug else []) + (["--cpus", cpus] if cpus else []) \
        + ([] if in_place_conversion else ["--no-in-place-conversion"]) + (["--allow-other"] if allow_other else []) \
        + ([] if max_memory is None else ["--max-memory", str(max_memory)]) \
        + (["--low-latency"] if low_latency else []) + ([] if per_user is None else ["--per-user", per_user]) \
        + ([] if hot_path == "compiled" else ["--hot-path", hot_path])
    # The log names files and requests: readable by its owner only (it stays after a crash).
    log_fd = os.open(server.logfile_path(mountpoint), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(log_fd, "ab") as logfile:
        proc = subprocess.Popen(command, pass_fds=(write_end,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message.startswith("ready"):
        return proc.pid
    code = proc.wait()
    detail = message.removeprefix("error ").strip() or f"the server exited with status {code}"
    raise OSError(f"cannot mount {mountpoint}: {detail} (log: {server.logfile_path(mountpoint)})")


# --- a mount for a block --------------------------------------------------------------------------------
@contextlib.contextmanager
def mounted(*, prefix: str = "ufsgmem-", **options) -> Iterator[tuple[str, int]]:
    """A mount on a fresh temporary directory (named ``prefix...``) for the block; yields ``(path, server
    pid)``. Always unmounted, its server stopped and the directory removed after, even when the body fails:
    a server that :func:`unmount` could not stop is killed by its pid (it is ours). ``options`` go to
    :func:`start_background`; an OSError says why the mount failed."""
    path = tempfile.mkdtemp(prefix=prefix)
    pid = None
    try:
        pid = start_background(path, **options)
        yield path, pid
    finally:
        with contextlib.suppress(OSError):
            unmount(path, timeout=10)
        if pid is not None and pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.rmdir(path)


# --- stopping it -------------------------------------------------------------------------------------------
def is_server_of(pid: int, started: int | None) -> bool:
    """Whether process ``pid`` is the one the pidfile recorded: same pid *and* same start time, so a pid
    the kernel handed to another process since is never taken for the server."""
    from .fuse.server import start_time
    return started is not None and start_time(pid) == started


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not pid_alive(pid)


def unmount(mountpoint: str, timeout: float = 10.0) -> list[str]:
    """Stop the server of ``mountpoint`` and make sure nothing stays mounted there; what had to be done
    beyond a clean stop, one line each (empty after a clean stop)."""
    from .fuse import abort, server

    mountpoint = abort.mount_path(mountpoint)  # never stat the mount itself: it may hang
    pid, started = server.read_pidfile(mountpoint)
    mounted = mount_type(mountpoint)
    if pid is None and mounted is None:
        raise OSError(errno.EINVAL, f"{mountpoint} is not a ufsgmem mount")
    if mounted is not None and mounted != FSTYPE:
        raise OSError(errno.EINVAL, f"{mountpoint} is a {mounted} mount, not ufsgmem")
    done: list[str] = []
    if pid is not None and not is_server_of(pid, started):
        if pid_alive(pid):
            done.append(f"pid {pid} in the pidfile is not this mount's server (a reused pid): not signalled")
        pid = None
    if pid is not None and pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            done.append(f"the server (pid {pid}) did not stop within {timeout:g} s: killed")
            if not _wait_gone(pid, 2.0):
                done.append(f"the server (pid {pid}) cannot finish exiting (a thread waits in the kernel)")
    elif mounted is not None:
        done.append("the server is gone (it died without unmounting)")
    if mount_type(mountpoint) == FSTYPE:
        done.append(_end_connection(mountpoint, pid, started, timeout))
        _force_unmount(mountpoint)
        done.append("removed the stale mount (lazy unmount)")
    if pid is not None and not _wait_gone(pid, 5.0):
        done.append(f"the server (pid {pid}) is still exiting")
    try:
        os.unlink(server.pidfile_path(mountpoint))
    except FileNotFoundError:
        pass
    _drop_log_if_uneventful(server.logfile_path(mountpoint), not done)
    return done


def _end_connection(mountpoint: str, pid: int | None, started: int | None, timeout: float) -> str:
    """Abort the FUSE connection of a mount whose server is dead or killed; what happened, one line."""
    from .fuse import abort

    connection = abort.connection_of(mountpoint)
    if abort.abort_mount(mountpoint) is not None:
        return f"aborted FUSE connection {connection}: clients waiting on it get errors"
    # Not root and no fusectl of ours: the watcher answers what the server left and, once the server
    # has exited, closes the last /dev/fuse descriptor, which makes the kernel abort the connection.
    if pid is None or _wait(lambda: abort.server_gone(pid, started), timeout):
        return (f"FUSE connection {connection} is ended by the server's watcher (it closes the last /dev/fuse "
                "descriptor once the server has exited): clients waiting on it get errors")
    return (f"could not abort FUSE connection {connection} (not root, no fusectl access) and the server (pid {pid}) "
            f"has not exited: clients waiting on it may stay blocked; as root: ufsgmem umount {mountpoint}")


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _drop_log_if_uneventful(path: str, clean: bool) -> None:
    """Remove the server's log after a clean stop that logged no warning or error, so a machine that
    mounts often (tests, the demo, the bench) does not collect logs; a log worth reading stays."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except FileNotFoundError:
        return
    if clean and not any(word in text for word in (b" WARNING ", b" ERROR ", b" CRITICAL ", b"Traceback")):
        os.unlink(path)


def _force_unmount(mountpoint: str) -> None:
    """A dead server's mount: fusermount3 -u -z (a user's way, and root's), else umount -l."""
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(command[0]) and subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
            return
    hint = "" if os.geteuid() == 0 else " (a user may unmount only their own mounts: is it yours?)"
    raise OSError(errno.EBUSY, f"could not unmount {mountpoint}{hint}")
