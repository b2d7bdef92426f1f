"""Ranged revocation: FUSE_NOTIFY_INVAL_INODE written straight to the connection's ``/dev/fuse`` fd.

pyfuse3's ``invalidate_inode`` always drops the whole file (offset 0, length 0), which would unmap every
page of a 1 GiB guest to convert one 4 KiB page. The kernel's notification takes an offset and a length,
so we write the message ourselves: a ``fuse_out_header`` with ``unique`` 0 and ``error`` set to the notify
code (2), then ``fuse_notify_inval_inode_out {ino, off, len}``. The kernel then unmaps exactly that
range from every process and drops it from the page cache (``invalidate_inode_pages2_range``).

Why a worker thread (``worker.py``): the write blocks while dirty pages of the range are written back, and the write-back
arrives as FUSE_WRITE requests that the trio loop must serve. Calling it from the loop would deadlock. It
also waits for the lock of any page that is being read in, so a FUSE read handler must never wait for a
revocation to finish (``files.py``: a read meeting a pending punch-hole is answered with zeros).

ENOENT means the kernel has no inode cached for that number: nothing can be mapped, nothing to revoke.

Write-back first, in bulk: the invalidation writes each dirty page back on its own (``launder_folio``,
one 4 KiB FUSE WRITE per page: ~13 ms for 2 MiB through Python). So when the file can be opened by path,
the range is first written back with ``sync_file_range`` on a descriptor of our own, which sends large
batched writes (``writepages``, max_write = 1 MiB each); the invalidation that follows finds the pages
clean and only unmaps. A page dirtied again in between is still laundered, so the order stays correct
either way.

That descriptor is opened once per file and kept (:class:`WriteBackFiles`): opening and closing it for
every conversion cost three more FUSE requests (OPEN, FLUSH, RELEASE) through this same loop, ~150 µs of a
4 KiB round trip that is ~400 µs in all. It is closed when the file is destroyed (from a worker thread:
the close sends FLUSH, which the loop must answer) and, at shutdown, after the connection is gone.

Caveat: the fd is found by scanning ``/proc/self/fd`` for ``/dev/fuse`` after ``pyfuse3.init``; pyfuse3
does not expose libfuse's session fd. One filesystem per process (a pyfuse3 rule) keeps this unambiguous.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from ..address import Range

FUSE_NOTIFY_INVAL_INODE = 2
_OUT_HEADER = struct.Struct("<IiQ")  # len, error (= notify code), unique (= 0)
_INVAL_INODE = struct.Struct("<Qqq")  # ino, off, len


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

    ``get`` and ``close`` block on FUSE requests of this very mount: call them from a worker thread, never
    from the loop. Callers serialise per file (the file's lock), so a descriptor is never closed while used.
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
            except OSError:  # the connection is gone: nothing to flush
                pass

    def close_all(self) -> None:
        for key in list(self._fds):
            self.close(key)

    def __contains__(self, key) -> bool:
        return key in self._fds


def find_fuse_fd() -> int:
    """The one ``/dev/fuse`` descriptor of this process (opened by libfuse when it mounted)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.append(int(name))
        except OSError:
            continue
    if len(found) != 1:
        raise RuntimeError(f"expected exactly one /dev/fuse descriptor in this process, found {found}")
    return found[0]


def inval_inode_message(ino: int, offset: int, length: int) -> bytes:
    body = _INVAL_INODE.pack(ino, offset, length)
    return _OUT_HEADER.pack(_OUT_HEADER.size + len(body), FUSE_NOTIFY_INVAL_INODE, 0) + body


class Revoker:
    """Sends ranged invalidations on one FUSE connection. Blocking: call from a worker thread."""

    def __init__(self, fd: int):
        self.fd = fd
        self.sent = 0

    def revoke(self, ino: int, ranges: tuple[Range, ...] | list[Range], fd: int | None = None) -> None:
        """Unmap ``ranges`` of inode ``ino`` from every process and write back their dirty pages.

        ``fd`` (our own descriptor of the file, if it still has a name) lets the write-back go in bulk first.
        """
        write_back(fd, ranges)
        for rng in ranges:
            if rng.size <= 0:
                continue
            try:
                os.write(self.fd, inval_inode_message(ino, rng.start, rng.size))
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: inode not cached, nothing mapped
                    raise
            self.sent += 1
