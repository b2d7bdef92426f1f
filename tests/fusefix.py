"""The real-mount fixture for FUSE tests: a ufsgmem server in its own process, torn down whatever happens.

``fuse_mount`` (module scope) mounts a fresh temporary directory with the background ``ufsgmem mount``
path (so that path is exercised too), yields a :class:`Mount`, and at the end checks that the server is
still alive and logged no internal error, then unmounts (SIGTERM by pid; SIGKILL and a lazy unmount if
that fails) and removes the directory: :func:`mounted`, which is ``ufsgmem.testing.mounted`` plus those
checks. ``gmem`` (function scope) is a factory for fresh guest_memfd files on that mount, destroyed after
the test. ``fuse_available`` is ``ufsgmem.testing.fuse_unavailable_reason``.

The two fixtures are defined in ``conftest.py`` (on :func:`mounted` and :class:`Gmem` from here), so a
test module names them as arguments and imports nothing for them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import pytest

from ufsgmem.syscalls import pid_alive
from ufsgmem.fuse import server as fuse_server
from ufsgmem.testing import fuse_unavailable_reason
from ufsgmem.testing import mounted as testing_mounted


def open_files(pid: int) -> list[str]:
    """What each descriptor of process ``pid`` points at (descriptors closing meanwhile are skipped)."""
    targets = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return targets


def memfds(pid: int) -> set[int]:
    """The ufsgmem backend memfds process ``pid`` holds open, by inode: one per file whose memory it
    keeps. A set, not a count, so that another test's file freed meanwhile is not mistaken for this one."""
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if "memfd:ufsgmem" in os.readlink(f"/proc/{pid}/fd/{fd}"):
                found.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
        except OSError:  # closed meanwhile
            pass
    return found


def wait_freed(pid: int, memory: set[int], poke: str) -> bool:
    """Whether the memfds ``memory`` are gone from ``pid`` within a bounded number of round trips: RELEASE
    arrives asynchronously, and each stat of ``poke`` is one more request through the server."""
    for _ in range(1000):
        if not memory & memfds(pid):
            return True
        os.stat(poke)
    return not memory & memfds(pid)


def wchan(pid: int) -> str:
    """Where in the kernel ``pid`` waits ('' if gone): e.g. ``request_wait_answer`` for a FUSE request."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def wait_for(predicate, timeout: float, what) -> None:
    """Poll ``predicate`` until true; after ``timeout`` s fail, saying ``what`` (or ``what()``, computed
    then, for a report of the state at the time of failure)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what() if callable(what) else what}")
        time.sleep(0.01)


#: Why a real mount cannot work here (no /dev/fuse, no fusermount3, no compiled binding), or None.
fuse_available = fuse_unavailable_reason


requires_fuse = pytest.mark.skipif(fuse_available() is not None, reason=f"FUSE: {fuse_available()}")


@dataclass
class Mount:
    path: str
    pid: int

    def ctl(self, request: str | bytes) -> None:
        """Write one request to MOUNTPOINT/ctl (raises OSError with the request's errno)."""
        data = request.encode() if isinstance(request, str) else request
        fd = os.open(os.path.join(self.path, "ctl"), os.O_WRONLY)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    @property
    def log(self) -> str:
        try:
            with open(fuse_server.logfile_path(self.path)) as f:
                return f.read()
        except OSError:
            return ""


@dataclass
class Gmem:
    """Paths of one guest_memfd on the mount."""

    mount: Mount
    name: str
    size: int

    def path(self, what: str = "mem") -> str:
        return os.path.join(self.mount.path, self.name, what)

    def request(self, text: str | bytes) -> bytes:
        """One request on NAME/ctl; returns the read-back. Raises OSError(errno) when the write fails."""
        fd = os.open(self.path("ctl"), os.O_RDWR)
        try:
            os.write(fd, text.encode() if isinstance(text, str) else text)
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    def convert(self, offset: int, size: int, private: bool) -> None:
        self.request(f"set_memory_attributes offset={offset:#x} size={size:#x} "
                     f"attributes={'private' if private else 'shared'}")

    def guest_read(self, offset: int, size: int) -> bytes:
        fd = os.open(self.path("guest"), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def guest_write(self, offset: int, data: bytes) -> None:
        fd = os.open(self.path("guest"), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    def status(self) -> dict:
        import json
        with open(self.path("status")) as f:
            return json.load(f)


@contextlib.contextmanager
def mounted(backend: str = "anon", **options):
    """Mount in a fresh directory; always unmount and stop the server, even when the body fails
    (``ufsgmem.testing.mounted``), after checking that the server is alive and logged no internal error.
    ``options`` go to ``start_background`` (e.g. ``in_place_conversion=False``)."""
    with testing_mounted(backend, prefix="ufsgmem-test-", **options) as mnt:
        mount = Mount(mnt.path, mnt.pid)
        yield mount
        assert pid_alive(mount.pid), f"the server died during the tests; log:\n{mount.log}"
        assert "Traceback" not in mount.log, f"the server logged an internal error:\n{mount.log}"
