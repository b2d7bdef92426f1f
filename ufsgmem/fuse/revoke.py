"""Ranged revocation: FUSE_NOTIFY_INVAL_INODE written straight to the connection's ``/dev/fuse`` fd.

pyfuse3's ``invalidate_inode`` always drops the whole file (offset 0, length 0), which would unmap every
page of a 1 GiB guest to convert one 4 KiB page. The kernel's notification takes an offset and a length,
so we write the message ourselves: a ``fuse_out_header`` with ``unique`` 0 and ``error`` set to the notify
code (2), then ``fuse_notify_inval_inode_out {ino, off, len}``. The kernel then unmaps exactly that
range from every process and drops it from the page cache (``invalidate_inode_pages2_range``).

Why a worker thread: the write blocks while dirty pages of the range are written back, and the write-back
arrives as FUSE_WRITE requests that the trio loop must serve. Calling it from the loop would deadlock. It
also waits for the lock of any page that is being read in, so a FUSE read handler must never wait for a
revocation to finish (see ``ops.py``).

ENOENT means the kernel has no inode cached for that number: nothing can be mapped, nothing to revoke.

Caveat: the fd is found by scanning ``/proc/self/fd`` for ``/dev/fuse`` after ``pyfuse3.init``; pyfuse3
does not expose libfuse's session fd. One filesystem per process (a pyfuse3 rule) keeps this unambiguous.
"""

from __future__ import annotations

import errno
import os
import struct

from ..address import Range

FUSE_NOTIFY_INVAL_INODE = 2
_OUT_HEADER = struct.Struct("<IiQ")  # len, error (= notify code), unique (= 0)
_INVAL_INODE = struct.Struct("<Qqq")  # ino, off, len


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

    def revoke(self, ino: int, ranges: tuple[Range, ...] | list[Range]) -> None:
        """Unmap ``ranges`` of inode ``ino`` from every process and write back their dirty pages."""
        for rng in ranges:
            if rng.size <= 0:
                continue
            try:
                os.write(self.fd, inval_inode_message(ino, rng.start, rng.size))
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: inode not cached, nothing mapped
                    raise
            self.sent += 1
