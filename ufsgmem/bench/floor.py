"""The FUSE floor: P3's round trip against the smallest server that does the same steps (``fuse_floor.c``).

P3's target (150 µs) is absolute, and this VM's wake-ups and page faults are slow; a figure that misses
it says nothing about *what* is slow. So the bench builds ``fuse_floor.c`` (libfuse's low-level API, the
same INIT, open flags and revocation as ufsgmem's server, and none of its rules or bookkeeping), mounts
it, and times the same round trip against it and against a ufsgmem mount in alternating blocks. The ratio
is what ufsgmem's server adds; the floor is what FUSE costs on this machine, and about the lowest P3 a
FUSE server that writes dirty pages back and invalidates them (as a content-preserving conversion must)
could show here. Caveat: it is measured through the bench's own Python caller and dirtier, which add to
both sides alike (docs/performance.md has the floor from a C caller).

Building needs a C compiler and libfuse3's headers (``pkg-config fuse3``), which setup installs; without
them :func:`build` says why and the bench leaves the figure out. The binary goes to a temporary
directory per run: nothing is installed. :class:`FloorMount` starts the server, waits (bounded) for it
to report the mount, and on exit ends it by its pid; if it does not end in time, or dies and leaves its
mount, the connection is aborted (``fuse/abort.py``) so that nothing waits on it, and lazily unmounted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import shutil
import signal
import subprocess
import tempfile

from ..fuse import abort
from ..protocol import attributes2
from ..uapi import KVM_SET_MEMORY_ATTRIBUTES2

SOURCE = os.path.join(os.path.dirname(__file__), "fuse_floor.c")


class Unavailable(Exception):
    """The floor server cannot be built or mounted here (the message says why)."""


def build(directory: str) -> str:
    """Compile ``fuse_floor.c`` into ``directory``; the executable's path. Unavailable if it cannot."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc/gcc) to build the floor server")
    try:
        flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise Unavailable(f"pkg-config cannot find libfuse3's headers ({e})") from None
    exe = os.path.join(directory, "fuse_floor")
    proc = subprocess.run([cc, "-O2", "-Wall", "-o", exe, SOURCE, *flags, "-lpthread"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise Unavailable(f"building {SOURCE} failed: {proc.stderr.strip()[:400]}")
    return exe


class FloorFile:
    """``MNT/mem`` of a floor mount, with the one call P3 makes, made as ``GmemFile.set_memory_attributes``
    makes it (one descriptor kept open, the 128-byte struct through ``fcntl.ioctl``)."""

    def __init__(self, directory: str):
        self._fd = os.open(os.path.join(directory, "mem"), os.O_RDWR | os.O_CLOEXEC)

    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0) -> None:
        fcntl.ioctl(self._fd, KVM_SET_MEMORY_ATTRIBUTES2, attributes2(offset, size, attributes, flags), True)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FloorMount:
    """A floor server mounted on a fresh temporary directory, serving a ``size``-byte ``mem``."""

    START_TIMEOUT = 10.0   # seconds to wait for "ready"
    STOP_TIMEOUT = 10.0

    def __init__(self, exe: str, size: int):
        self.mountpoint = tempfile.mkdtemp(prefix="ufsgmem-floor-")
        self._proc = subprocess.Popen([exe, self.mountpoint, str(size)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        self.file: FloorFile | None = None
        try:
            self._wait_ready()
            self.file = FloorFile(self.mountpoint)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        ready, _, _ = select.select([self._proc.stdout], [], [], self.START_TIMEOUT)
        line = self._proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            self._proc.kill()
            err = self._proc.communicate(timeout=self.STOP_TIMEOUT)[1].strip()
            raise Unavailable(f"the floor server did not mount {self.mountpoint}: {err or 'no answer'}")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()  # opened noflush: the close never waits on the server
            self.file = None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:  # stuck: end its connection, then the process
                self._abort()
                self._proc.kill()
                self._proc.wait(timeout=self.STOP_TIMEOUT)
        if self._abort():  # it died and left its mount
            subprocess.run(["umount", "-l", self.mountpoint], check=False, capture_output=True)
        for stream in (self._proc.stdout, self._proc.stderr):
            stream.close()
        with contextlib.suppress(OSError):
            os.rmdir(self.mountpoint)

    def _abort(self) -> bool:
        """Abort the connection of the mount still at our mount point (read from the mount table: a stat
        of a mount whose server died fails or waits). Whether there was one."""
        connection = abort.connection_of(abort.mount_path(self.mountpoint), "fuse")
        if connection is None:
            return False
        abort.abort_connection(connection)
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

