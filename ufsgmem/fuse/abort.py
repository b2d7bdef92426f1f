"""Ending a FUSE connection whose server can no longer answer, so that no client waits forever.

A server that exits closes ``/dev/fuse`` and the kernel fails every request still waiting (clients get
ENOTCONN or SIGBUS): when the last open file of a connection's device is released, the kernel aborts
the connection. But a server killed while one of its threads waits in the kernel (a revocation
writing dirty pages back) cannot finish exiting: that thread is waiting for requests only the dead
process could serve, its descriptor table and so ``/dev/fuse`` stay open, and every client blocked on
the mount, the converter and the mapping processes, hangs unkillably. Two things end that:

* **fusectl**: writing to ``/sys/fs/fuse/connections/N/abort`` aborts connection N. Root can always
  (this module mounts ``fusectl`` where it is missing); the kernel makes a connection's control files
  belong to the user who mounted it, so a user can too, where ``fusectl`` is mounted (systemd mounts it
  at boot; a container may not have it, and only root may mount it).
* **answering, then closing** (any user): a process holding a copy of the server's ``/dev/fuse``
  descriptor (the same open file) can answer for the dead server. Requests the server had already read
  when it died sit in the kernel's "being processed" list, where no reader sees them: the notification
  ``FUSE_NOTIFY_RESEND`` (Linux 6.9, meant for a server that restarts with its old descriptor) puts them
  back in the queue. The copy's holder then reads every request and answers it with ENOTCONN; the stuck
  thread's write-back completes, its syscall returns, the SIGKILL takes it and the server finishes
  exiting. Once it has, the copy is the device file's last reference, and closing it makes the kernel
  abort the connection, failing everything still waiting. (On a kernel without ``FUSE_NOTIFY_RESEND`` only
  the requests still queued are answered: a thread stuck on one the server had read stays stuck.)

:func:`abort_mount` finds the connection of a mount point in ``/proc/self/mountinfo`` (never touching
the mount itself, which may hang) and aborts it through fusectl. ``python -m ufsgmem.fuse.abort --watch
PID MOUNTPOINT --fd N`` is the watcher every server starts: it sleeps until its parent's main thread exits
(``PR_SET_PDEATHSIG``) and then, only if the mount is still there (a clean stop unmounts first, and a
connection number can be reused), aborts the connection through fusectl, or where that is not allowed,
answers and closes as above. It keeps its copy of the server's descriptor only where fusectl is not
allowed: a copy keeps the connection up after the server exits, until the watcher closes it, so where
fusectl works a dead server's exit alone still ends its connection, as it did before there was a copy.

``ufsgmem umount`` uses :func:`abort_mount` when the server is dead, a zombie or does not stop; for a
user without fusectl it relies on the watcher.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import re
import select
import signal
import struct
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
    if os.geteuid() != 0:  # only root may mount it
        return False
    try:  # the control filesystem is not mounted (containers often lack it): mount it
        subprocess.run(["mount", "-t", "fusectl", "fusectl", FUSECTL], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return os.path.isdir(FUSECTL) and bool(os.listdir(FUSECTL))


def abort_connection(connection: int) -> bool:
    """Abort connection ``connection`` through fusectl: every waiting request fails. True if it existed
    and was aborted; False also where this user may not (no fusectl, or not the connection's owner)."""
    if not _fusectl_ready():
        return False
    try:
        with open(os.path.join(FUSECTL, str(connection), "abort"), "w") as f:
            f.write("1")
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM):
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


# --- answering for a dead server, then closing -------------------------------------------------------
FUSE_IN_HEADER = struct.Struct("<IIQQIIIHH")    # len, opcode, unique, nodeid, uid, gid, pid, extlen, pad
FUSE_OUT_HEADER = struct.Struct("<IiQ")          # len, error, unique
FUSE_FORGET, FUSE_BATCH_FORGET = 2, 42           # the kernel expects no answer to these
FUSE_INT_REQ_BIT = 1 << 0                        # an INTERRUPT's unique: nothing to answer either
FUSE_NOTIFY_RESEND = 7                           # requeue every request read but not answered (Linux 6.9)
_READ_SIZE = 2 << 20                             # past max_write (1 MiB) plus headers; grown on EINVAL


def server_gone(pid: int, started: int | None) -> bool:
    """Whether every thread of process ``pid`` (started at ``started``, /proc/PID/stat field 22) has
    exited: its descriptors are closed then. A zombie leader with a live thread is not gone."""
    if started is not None and _start_time(pid) != started:
        return True  # reaped, or the pid names another process now
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True  # reaped
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return False
        except (OSError, IndexError):
            continue  # this thread was reaped while we looked: the others still count
    return True


def resend(fd: int) -> bool:
    """FUSE_NOTIFY_RESEND: requests read from the connection but not answered go back in its queue."""
    try:
        os.write(fd, FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size, FUSE_NOTIFY_RESEND, 0))
    except OSError:  # older kernel (EINVAL), or the connection is gone
        return False
    return True


def answer_until_gone(fd: int, pid: int, started: int | None) -> int:
    """Answer every request on ``fd`` (a copy of the server's /dev/fuse descriptor) with ENOTCONN until
    the server has exited, including those the server had read when it died; how many were answered.
    Stops early if the connection is aborted meanwhile."""
    os.set_blocking(fd, False)  # the server is dead: nobody else reads this file any more
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    size, answered = _READ_SIZE, 0
    can_resend = resend(fd)
    while not server_gone(pid, started):
        if not poller.poll(50):
            if can_resend:  # a server thread may have read one more request as it died
                resend(fd)
            continue
        try:
            request = os.read(fd, size)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINVAL and size < 1 << 28:  # the buffer is shorter than max_write
                size *= 2
                continue
            if exc.errno in (errno.ENODEV, errno.ECONNABORTED):  # aborted meanwhile: nothing waits any more
                break
            raise
        if len(request) < FUSE_IN_HEADER.size:
            continue
        _, opcode, unique, *_ = FUSE_IN_HEADER.unpack_from(request)
        if opcode in (FUSE_FORGET, FUSE_BATCH_FORGET) or unique & FUSE_INT_REQ_BIT:
            continue
        try:
            os.write(fd, FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size, -errno.ENOTCONN, unique))
            answered += 1
        except OSError:  # the request was interrupted and is gone: nothing to answer
            pass
    return answered


# --- the watcher every server starts ------------------------------------------------------------------
def start_watcher(mountpoint: str, fuse_fd: int | None = None) -> subprocess.Popen:
    """Start the watcher of this process's mount, holding a copy of ``fuse_fd`` (the mount's /dev/fuse
    descriptor). Call from the main thread before any other thread exists: the death signal follows the
    thread that started the watcher."""
    parent = os.getpid()

    def die_with_parent() -> None:
        # Blocked before exec (a blocked mask survives it): a server dying while the watcher's Python
        # still starts leaves the signal pending for its sigwait, instead of killing it unheard.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    command = [sys.executable, "-m", "ufsgmem.fuse.abort", "--watch", str(parent), mountpoint]
    if fuse_fd is not None:
        command += ["--fd", str(fuse_fd)]
    return subprocess.Popen(command, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL, close_fds=True,
                            pass_fds=() if fuse_fd is None else (fuse_fd,), start_new_session=True)


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def can_abort(connection: int | None) -> bool:
    """Whether this process may abort ``connection`` through fusectl (mounting fusectl if root)."""
    return connection is not None and _fusectl_ready() and \
        os.access(os.path.join(FUSECTL, str(connection), "abort"), os.W_OK)


def watch(parent: int, mountpoint: str, fuse_fd: int | None = None) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    started = _start_time(parent)
    if fuse_fd is not None and can_abort(connection_of(mountpoint)):
        # fusectl will do: keep no copy, so that a dead server's exit alone still ends its connection
        os.close(fuse_fd)
        fuse_fd = None
    if os.getppid() == parent:  # else the parent died before the death signal was armed
        signal.sigwait({signal.SIGTERM})
    connection = connection_of(mountpoint)
    if connection is None:  # unmounted: a clean stop (or someone cleaned up already)
        return 0
    if abort_connection(connection):  # still mounted: the server died without unmounting
        print(f"ufsgmem: the server of {mountpoint} (pid {parent}) died; aborted FUSE connection "
              f"{connection} so no client waits for it", file=sys.stderr)
        return 0
    if fuse_fd is None:
        print(f"ufsgmem: the server of {mountpoint} (pid {parent}) died and FUSE connection {connection} "
              "cannot be aborted here (no fusectl access); run `ufsgmem umount` as root", file=sys.stderr)
        return 1
    answered = answer_until_gone(fuse_fd, parent, started)
    os.close(fuse_fd)  # the device file's last reference: the kernel aborts the connection
    print(f"ufsgmem: the server of {mountpoint} (pid {parent}) died; answered {answered} request(s) it left "
          f"and closed the last /dev/fuse descriptor, ending FUSE connection {connection}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ufsgmem.fuse.abort",
                                     description="abort the FUSE connection of a ufsgmem mount")
    parser.add_argument("--watch", type=int, metavar="PID", help="wait for PID to die first")
    parser.add_argument("--fd", type=int, metavar="N", help="(with --watch) a copy of the server's /dev/fuse")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    if args.watch is not None:
        return watch(args.watch, args.mountpoint, args.fd)
    connection = abort_mount(mount_path(args.mountpoint))
    print(f"aborted FUSE connection {connection}" if connection is not None else "no connection to abort")
    return 0 if connection is not None else 1


if __name__ == "__main__":
    sys.exit(main())
