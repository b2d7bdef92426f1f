"""Ranged revocation: unmap a byte range of ``mem`` from every process, writing its dirty pages back first.

``InodeInvalidator.revoke`` sends ``FUSE_NOTIFY_INVAL_INODE`` for each range (libfuse's
``fuse_lowlevel_notify_inval_inode``): the kernel unmaps exactly that range from every process and drops
it from the page cache (``invalidate_inode_pages2_range``). The call blocks while dirty pages of the range
are written back as FUSE WRITE requests, which other loop threads serve, and while any page of it is
being read in (its lock is held until that READ is answered). Where a revocation may therefore run: the
three-deadlocks rule in docs/architecture.md (Threads and locks). The kernel answering ENOENT means it has
no inode cached for that number: nothing can be mapped, nothing to revoke.

Write-back first, in bulk: the invalidation writes each dirty page back on its own (``launder_folio``, one
4 KiB FUSE WRITE per page: ~13 ms for 2 MiB through Python). So when the file can be opened by path, the
range is first written back with ``sync_file_range`` on a descriptor of our own, which sends large batched
writes (``writepages``, max_write = 1 MiB each); the invalidation that follows finds the pages clean and
only unmaps. A page dirtied again in between is still laundered, so the order stays correct either way.

That descriptor is opened on a file's first revocation and kept (:class:`WriteBackFiles`): opening it per
conversion cost two more FUSE requests (OPEN, RELEASE) of a round trip. At most ``LIMIT`` are kept, the
least recently used closed first, so a file costs the server one descriptor (its backend's memfd), not
two: 10 000 small files of one user used to take 20 000 descriptors, the server's whole limit. A file's
descriptor is closed when it is destroyed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections import OrderedDict

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


#: write-back descriptors kept open at most (the least recently used is closed first)
LIMIT = 64


class WriteBackFiles:
    """A read-only descriptor per recently revoked ``mem`` file, opened by path on first use.

    ``use`` blocks on FUSE requests of this very mount (LOOKUP, OPEN), which other loop threads serve.
    Callers serialise per file (the file's lock); a descriptor in use is never closed to make room.
    ``hand_over(key, fd or None)``, if given, owns the descriptors: it is given each one opened and told of
    each one dropped (outside the lock), and closes it itself (the compiled hot path writes back through
    it too, ``fastpath.py``); it returns False for a key it has no file for any more (freed: already
    closed). Without it, descriptors are closed here.
    """

    def __init__(self, limit: int = LIMIT, hand_over=None):
        self.limit = limit
        self.hand_over = hand_over
        self._fds: OrderedDict[object, int] = OrderedDict()  # least recently used first
        self._busy: set = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def use(self, key, path: str | None):
        """The descriptor of ``key`` (opened from ``path`` if it has none; None if it cannot be)."""
        with self._lock:
            fd = self._fds.get(key)
            if fd is not None:
                self._fds.move_to_end(key)
                self._busy.add(key)
        if fd is None and path is not None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                fd = None
            if fd is not None:
                with self._lock:
                    self._fds[key] = fd
                    self._busy.add(key)
                    evicted = self._evict()
                if self.hand_over is not None and not self.hand_over(key, fd):
                    _close([fd])  # nobody to take it: freed meanwhile
                self._close(evicted)
        try:
            yield fd
        finally:
            with self._lock:
                self._busy.discard(key)

    def _evict(self) -> list[tuple[object, int]]:
        """Take the least recently used idle descriptors past the limit out (``_lock`` held)."""
        out = []
        for key in list(self._fds):
            if len(self._fds) <= self.limit:
                break
            if key not in self._busy:
                out.append((key, self._fds.pop(key)))
        return out

    def _close(self, items) -> None:
        if self.hand_over is None:
            _close(fd for _key, fd in items)
            return
        for key, _fd in items:
            self.hand_over(key, None)  # its owner closes it (or did, when the file was freed)

    def close(self, key) -> None:
        with self._lock:
            fd = self._fds.pop(key, None)
        self._close([] if fd is None else [(key, fd)])

    def close_all(self) -> None:
        with self._lock:
            items, self._fds = list(self._fds.items()), OrderedDict()
        self._close(items)

    def __contains__(self, key) -> bool:
        return key in self._fds

    def __len__(self) -> int:
        return len(self._fds)


def _close(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:  # the connection is gone
            pass


class InodeInvalidator:
    """Sends ranged invalidations of inodes on one FUSE session (the core's ``RevokeRanges`` for a file is
    built on it, by ``transitions.Transitions.revoke``). Blocking: see the module docstring for where."""

    def __init__(self, session):
        self.session = session

    def revoke(self, ino: int, ranges, fd: int | None = None) -> None:
        """Unmap ``ranges`` (byte :class:`Range` s) of inode ``ino`` from every process, dirty pages written
        back first. ``fd`` (our own descriptor of the file, if it still has a name) lets that go in bulk."""
        write_back(fd, ranges)
        for rng in ranges:
            if rng.size > 0:
                self.session.inval_inode(ino, rng.start, rng.size)
