"""Unmount a ufsgmem filesystem: stop its server (SIGTERM, by the pid in /run/ufsgmem), and remove a
mount left behind by a server that died ("Transport endpoint is not connected") with a lazy unmount.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time

from ..syscalls import pid_alive

HELP = "unmount a ufsgmem filesystem (also cleans up after a dead server)"


def configure(parser) -> None:
    parser.add_argument("mountpoint")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server to exit")


def run(args) -> int:
    unmount(args.mountpoint, timeout=args.timeout)
    return 0


def unmount(mountpoint: str, timeout: float = 10.0) -> None:
    """Stop the server of ``mountpoint`` and make sure nothing stays mounted there."""
    from ..fuse import server

    pid = server.read_pid(mountpoint)
    mounted = server.mount_type(mountpoint)
    if pid is None and mounted is None:
        raise OSError(errno.EINVAL, f"{mountpoint} is not a ufsgmem mount")
    if mounted is not None and mounted != server.FSTYPE:
        raise OSError(errno.EINVAL, f"{mountpoint} is a {mounted} mount, not ufsgmem")
    clean = True
    if pid is not None and pid_alive(pid):
        os.kill(pid, 15)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if pid_alive(pid):
            os.kill(pid, 9)
            clean = False
    if server.mount_type(mountpoint) == server.FSTYPE:
        _force_unmount(mountpoint)
        clean = False
    try:
        os.unlink(server.pidfile_path(mountpoint))
    except FileNotFoundError:
        pass
    _drop_log_if_uneventful(server.logfile_path(mountpoint), clean)


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
    """A dead server's mount: fusermount3 -u -z, else umount -l."""
    for command in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(command[0]) and subprocess.run(command, capture_output=True).returncode == 0:
            return
    raise OSError(errno.EBUSY, f"could not unmount {mountpoint}")
