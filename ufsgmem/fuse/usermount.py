"""Mounting as an ordinary user: through ``fusermount3``, as sshfs and rclone do.

Only root may call mount(2) for a FUSE filesystem. A user asks the setuid helper ``fusermount3`` (libfuse's
package): it opens ``/dev/fuse`` *with the user's own permissions*, mounts it at a directory the user may
write to (adding ``nosuid,nodev`` and ``user_id``/``group_id`` = the user), and hands the open descriptor
back over a Unix socket named by ``_FUSE_COMMFD``. libfuse's ``fuse_session_mount`` then takes that
descriptor as the mount point ``/dev/fd/N``.

libfuse would fall back to ``fusermount3`` by itself, but only when it could open ``/dev/fuse`` and
mount(2) said EPERM; where ``/dev/fuse`` is not open to users (mode 0600: a machine without udev, whose
rule makes it 0666 on every distribution) it gives up with a bare message. Calling the helper here gives
one route for every user and an error that says what is missing. The same helper unmounts
(``fusermount3 -u -z``): lazily, like libfuse does as root, so files still open elsewhere do not keep
the mount busy.

Caveats: ``allow_other`` needs ``user_allow_other`` in ``/etc/fuse.conf`` (root's choice), and the mount
point must be a directory the user can write to; fusermount3 checks both and the errors say so.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess

FUSERMOUNT = "fusermount3"
FUSE_CONF = "/etc/fuse.conf"
FUSE_DEVICE = "/dev/fuse"


def helper() -> str:
    path = shutil.which(FUSERMOUNT) or next((p for p in ("/usr/bin/fusermount3", "/bin/fusermount3")
                                             if os.path.exists(p)), None)
    if path is None:
        raise OSError(errno.ENOENT, f"mounting as a user needs {FUSERMOUNT} (Debian package fuse3), which is "
                                    "not installed; install it, or mount as root")
    return path


def user_allow_other(conf: str = FUSE_CONF) -> bool:
    """Whether ``conf`` has the ``user_allow_other`` line that lets users mount with ``allow_other``."""
    try:
        with open(conf) as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def check_options(options: list[str]) -> None:
    """Refuse, with the remedy, what fusermount3 would refuse less clearly (call before mounting)."""
    if "allow_other" in options and not user_allow_other():
        raise OSError(errno.EPERM, f"--allow-other as a user needs a line `user_allow_other` in {FUSE_CONF} "
                                   "(root's setting: it lets every user serve other users), or mount as root")
    if not os.access(FUSE_DEVICE, os.R_OK | os.W_OK):
        mode = _mode(FUSE_DEVICE)
        raise OSError(errno.EACCES, f"{FUSE_DEVICE} is not open to you ({mode}), and fusermount3 opens it as you: "
                                    f"distributions make it 0666 (udev); as root, `chmod 0666 {FUSE_DEVICE}`, "
                                    "or mount as root")


def _mode(path: str) -> str:
    try:
        return f"mode {os.stat(path).st_mode & 0o777:04o}"
    except OSError as exc:
        return exc.strerror or "missing"


def mount(mountpoint: str, options: list[str]) -> int:
    """Mount ``mountpoint`` through fusermount3 with the comma-joined ``options``; the /dev/fuse
    descriptor (close-on-exec), or OSError with fusermount3's reason."""
    check_options(options)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        done = subprocess.run([helper(), "-o", ",".join(options), "--", mountpoint], env=env,
                              pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)
        theirs.close()
        fds: list[int] = []
        if done.returncode == 0:
            _, fds, _, _ = socket.recv_fds(ours, 1, 1)
    if done.returncode != 0 or not fds:
        reason = done.stderr.strip().replace(f"{helper()}: ", "") or f"exit status {done.returncode}"
        raise OSError(errno.EPERM if done.returncode else errno.EIO, f"{FUSERMOUNT} could not mount {mountpoint}: "
                                                                     f"{reason}")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(mountpoint: str) -> bool:
    """``fusermount3 -u -z``: detach the mount now, free it once nothing holds it. True if it was done."""
    try:
        return subprocess.run([helper(), "-u", "-z", "-q", "--", mountpoint], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
