"""Ranged revocation: unmap a byte range of ``mem`` from every process, writing its dirty pages back first.

``Revoker.revoke`` sends ``FUSE_NOTIFY_INVAL_INODE`` for each range (libfuse's
``fuse_lowlevel_notify_inval_inode``): the kernel unmaps exactly that range from every process and drops
it from the page cache (``invalidate_inode_pages2_range``). The call blocks while dirty pages of the range
are written back as FUSE WRITE requests, which other loop threads serve, and while any page of it is
being read in (its lock is held until that READ is answered). Hence the rules ``files.py`` keeps:
revocations run in the thread of the request that needs them, never in a ``mem`` READ handler, never in
a write-back WRITE handler. The kernel answering ENOENT means it has no inode cached for that number:
nothing can be mapped, nothing to revoke.

Write-back first, in bulk: the invalidation writes each dirty page back on its own (``launder_folio``, one
4 KiB FUSE WRITE per page: ~13 ms for 2 MiB through Python). So when the file can be opened by path, the
range is first written back with ``sync_file_range`` on a descriptor of our own, which sends large batched
writes (``writepages``, max_write = 1 MiB each); the invalidation that follows finds the pages clean and
only unmaps. A page dirtied again in between is still laundered, so the order stays correct either way.

That descriptor is opened once per file and kept (:class:`WriteBackFiles`): opening it per conversion
cost two more FUSE requests (OPEN, RELEASE) of a round trip. It is closed when the file is destroyed.
"""

from __future__ import annotations

import ctypes
import os

from ..address import Range

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4


def write_back(fd: int | None, ranges) -> bool:
    """Write the dirty pages of ``ranges`` of the open file ``fd`` back now, in large requests. Blocking.
    False if there is no descriptor or the kernel refused."""
    if fd is None:
        return False
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    for rng in ranges:
        if _libc.sync_file_range(fd, rng.start, rng.size, flags) != 0:
            return False
    return True


class WriteBackFiles:
    """One read-only descriptor per ``mem`` file, opened by path on first use and kept until destroy.

    ``get`` blocks on FUSE requests of this very mount (LOOKUP, OPEN), which other loop threads serve.
    Callers serialise per file (the file's lock), so a descriptor is never closed while used.
    """

    def __init__(self):
        self._fds: dict[object, int] = {}

    def get(self, key, path: str | None) -> int | None:
        fd = self._fds.get(key)
        if fd is None and path is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            self._fds[key] = fd
        return fd

    def close(self, key) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:  # the connection is gone
                pass

    def close_all(self) -> None:
        for key in list(self._fds):
            self.close(key)

    def __contains__(self, key) -> bool:
        return key in self._fds


class Revoker:
    """Sends ranged invalidations on one FUSE session. Blocking: see the module docstring for where."""

    def __init__(self, session):
        self.session = session

    def revoke(self, ino: int, ranges, fd: int | None = None) -> None:
        """Unmap ``ranges`` (byte :class:`Range` s) of inode ``ino`` from every process, dirty pages written
        back first. ``fd`` (our own descriptor of the file, if it still has a name) lets that go in bulk."""
        write_back(fd, ranges)
        for rng in ranges:
            if rng.size > 0:
                self.session.inval_inode(ino, rng.start, rng.size)
