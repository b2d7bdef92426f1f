"""A ufsgmem mount for the client, CLI, C-example and demo tests, made through the public commands.

It uses only the v1 command contract (design §2.1, docs/design.md): ``ufsgmem mount MOUNTPOINT`` returns once
the mount is ready with the server in the background, ``ufsgmem umount MOUNTPOINT`` takes it down. So these
tests also check that contract, and they need nothing from the server's internals.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import shutil
import signal
import subprocess
import sys

import pytest


def ufsgmem(*args: str, check: bool = False, **kw) -> subprocess.CompletedProcess:
    """Run the ``ufsgmem`` command of this checkout; text output captured."""
    return subprocess.run([sys.executable, "-m", "ufsgmem", *map(str, args)], capture_output=True, text=True,
                          check=check, stdin=subprocess.DEVNULL, timeout=120, **kw)


def require_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    if not shutil.which("fusermount3") and os.geteuid() != 0:
        pytest.skip("mounting FUSE needs root or fusermount3")


@contextlib.contextmanager
def mounted(mountpoint: str):
    """Mount ufsgmem on ``mountpoint`` for the block; always unmounted after (lazily if it must be)."""
    require_fuse()
    os.makedirs(mountpoint, exist_ok=True)
    done = ufsgmem("mount", mountpoint)
    assert done.returncode == 0, f"ufsgmem mount failed: {done.stderr}"
    assert os.path.ismount(mountpoint), "ufsgmem mount returned before the mount was ready"
    try:
        yield mountpoint
    finally:
        done = ufsgmem("umount", mountpoint)
        if os.path.ismount(mountpoint):
            subprocess.run(["umount", "-l", mountpoint], check=False)
            pytest.fail(f"ufsgmem umount left {mountpoint} mounted: {done.stderr}")


def communicate_or_stop(proc: subprocess.Popen, timeout: float, stop: int = signal.SIGTERM,
                        grace: float = 30) -> tuple[str, str, bool]:
    """``proc.communicate()`` bounded by ``timeout``; past it, ``stop`` goes to the process group (started
    with ``start_new_session``) so the program can clean up, and SIGKILL after ``grace`` more seconds.
    Returns stdout, stderr and whether it had to be stopped."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return stdout, stderr, False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, stop)
        try:
            stdout, stderr = proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        return stdout, stderr, True


def child_touch(array, offset: int, write: bool = False) -> int | None:
    """Touch ``array[offset]`` in a forked child; the signal that killed it (SIGBUS) or None."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # the SIGBUS is expected: no traceback dump from the child
        try:
            if write:
                array[offset] = 1
            else:
                int(array[offset])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return signal.Signals(os.WTERMSIG(status)) if os.WIFSIGNALED(status) else None
