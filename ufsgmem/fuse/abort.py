"""Ending a FUSE connection whose server can no longer answer, so that no client waits forever.

A server that exits closes ``/dev/fuse`` and the kernel fails every request still waiting (clients get
ENOTCONN or SIGBUS). But a server killed while one of its threads waits in the kernel (a revocation
writing dirty pages back) cannot finish exiting: that thread is waiting for requests only the dead
process could serve, ``/dev/fuse`` stays open, and every client blocked on the mount, the converter and
the mapping processes, hangs unkillably. Only aborting the connection through the fuse control
filesystem (``/sys/fs/fuse/connections/N/abort``) ends that, and this module does it:

* :func:`abort_mount` finds the connection of a mount point in ``/proc/self/mountinfo`` (never touching
  the mount itself, which may hang), mounts ``fusectl`` if needed, and aborts it;
* ``python -m ufsgmem.fuse.abort --watch PID MOUNTPOINT`` is the watcher every server starts: it sleeps
  until its parent's main thread exits (``PR_SET_PDEATHSIG``) and then aborts the connection, but only if
  the mount is still there (a clean stop unmounts first, and a connection number can be reused).

``ufsgmem umount`` uses :func:`abort_mount` when the server is dead, a zombie or does not stop.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import re
import signal
import subprocess
import sys

FUSECTL = "/sys/fs/fuse/connections"
FSTYPE = "fuse.ufsgmem"
PR_SET_PDEATHSIG = 1

_ESCAPE = re.compile(rb"\\([0-7]{3})")


def unescape(field: bytes) -> str:
    r"""A path as /proc/self/mounts and mountinfo print it (``\040`` for a space, other bytes raw)."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def mount_path(path: str, _depth: int = 0) -> str:
    """The absolute, canonical path of a mount point *without touching the mount*. ``realpath`` would stat
    the root of the mounted filesystem, which waits forever when its server hangs; here the parent is
    resolved, and the last component only if it is a symlink (``readlink`` of a mount point fails with
    EINVAL without asking the filesystem)."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        return path
    full = os.path.join(os.path.realpath(parent), name)
    try:
        target = os.readlink(full)
    except OSError:  # not a symlink (or missing): that is the path
        return full
    if _depth > 40:
        raise OSError(errno.ELOOP, f"too many symlinks resolving {path}")
    return mount_path(os.path.join(os.path.dirname(full), target), _depth + 1)


def connection_of(mountpoint: str, fstype: str = FSTYPE) -> int | None:
    """The fusectl connection number of the ``fstype`` mount at ``mountpoint`` (the last one mounted
    there), or None. Read from mountinfo: the device's minor number (FUSE devices have major 0)."""
    found = None
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields, _, tail = line.partition(b" - ")
            parts = fields.split()
            if len(parts) >= 5 and unescape(parts[4]) == mountpoint and tail.split()[:1] == [fstype.encode()]:
                major, _, minor = parts[2].partition(b":")
                if major == b"0":
                    found = int(minor)
    return found


def _fusectl_ready() -> bool:
    if os.path.isdir(FUSECTL) and os.listdir(FUSECTL):
        return True
    try:  # the control filesystem is not mounted (containers often lack it): mount it
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return os.path.isdir(FUSECTL) and bool(os.listdir(FUSECTL))


def abort_connection(connection: int) -> bool:
    """Abort connection ``connection``: every waiting request fails. True if it existed and was aborted."""
    if not _fusectl_ready():
        return False
    try:
        with open(os.path.join(FUSECTL, str(connection), "abort"), "w") as f:
            f.write("1")
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def abort_mount(mountpoint: str) -> int | None:
    """Abort the connection of the ufsgmem mount at ``mountpoint``; its number, or None when there is no
    such mount or connection."""
    connection = connection_of(mount_path(mountpoint))
    if connection is None or not abort_connection(connection):
        return None
    return connection


def detach(mountpoint: str) -> bool:
    """Lazily unmount the mount at ``mountpoint`` (whose connection was aborted: libfuse's own unmount
    leaves a severed connection's mount in place). True if a command succeeded."""
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        try:
            if subprocess.run(command, capture_output=True, timeout=30).returncode == 0:
                return True
        except (OSError, subprocess.TimeoutExpired):
            continue
    return False


# --- the watcher every server starts ------------------------------------------------------------------
def start_watcher(mountpoint: str) -> subprocess.Popen:
    """Start the watcher of this process's mount. Call from the main thread before any other thread
    exists: the death signal follows the thread that started the watcher."""
    parent = os.getpid()

    def die_with_parent() -> None:
        # Blocked before exec (a blocked mask survives it): a server dying while the watcher's Python
        # still starts leaves the signal pending for its sigwait, instead of killing it unheard.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return subprocess.Popen([sys.executable, "-m", "ufsgmem.fuse.abort", "--watch", str(parent), mountpoint],
                            preexec_fn=die_with_parent, stdin=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)


def watch(parent: int, mountpoint: str) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if os.getppid() == parent:  # else the parent died before the death signal was armed
        signal.sigwait({signal.SIGTERM})
    connection = connection_of(mountpoint)
    if connection is not None:  # still mounted: the server died without unmounting
        if abort_connection(connection):
            print(f"ufsgmem: the server of {mountpoint} (pid {parent}) died; aborted FUSE connection "
                  f"{connection} so no client waits for it", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.fuse.abort",
                                     description="abort the FUSE connection of a ufsgmem mount")
    parser.add_argument("--watch", type=int, metavar="PID", help="wait for PID to die first")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    if args.watch is not None:
        return watch(args.watch, args.mountpoint)
    connection = abort_mount(mount_path(args.mountpoint))
    print(f"aborted FUSE connection {connection}" if connection is not None else "no connection to abort")
    return 0 if connection is not None else 1


if __name__ == "__main__":
    sys.exit(main())
