"""The ``mem`` file's page-cache traffic: the fills and write-backs the kernel sends for a mapped ``mem``.

``mem`` is opened with direct I/O (and ``FUSE_DIRECT_IO_ALLOW_MMAP``, so it can still be mapped shared),
which lets us tell the kernel's three ways in apart: a page fault or readahead fills the page cache with a
READ that has no lock owner; read(2) arrives with one; a dirty mapped page comes back as a WRITE flagged
``writepage``, write(2) without. read(2) and write(2) are EINVAL, as guest_memfd has neither (and the
kernel writes the range's dirty pages back before it sends a direct write, so a refused write changes no
byte any mapping sees). Page-cache fills are served from ``GuestMemfd.host_fill`` (zero copy; pages never
allocated are zeros and stay unallocated, so readahead costs no backend memory): a private page or a page
past EOF anywhere in the request fails the *whole* request with EIO, which the kernel turns into SIGBUS for
the faulting access and then retries the faulting page alone, so shared neighbours still work. A short
read would be taken as end of file and shrink the file, so there are none. Write-backs go to
``host_write``, which allocates.

Every fill charges the folios it hands out to the mount's memory budget (``budget.py``) before it answers:
past ``--max-memory`` the fill is ENOMEM (SIGBUS for the fault; a failed readahead costs nothing, the
kernel retries the faulting page alone), and a write-back, which must never fail, finds its folio already
paid for. A fill marks its pages possibly cached (``Entry.cached``) before it answers, so the next
conversion revokes them (``transitions.py``).

A fill that meets a pending punch-hole is answered with zeros (what the range holds once the punch commits)
instead of waiting for the commit: the revocation that the punch is waiting for has to take the lock of the
very page being read in, so waiting would deadlock. So a fault can see the zeros before the punch returns
(the kernel makes it wait, then also hands out zeros), and if the punch then fails, the zeros stay cached
over content the backend kept (docs/protocol.md).

The compiled hot path (``fastpath.c``) serves the common fills and write-backs itself with the same steps
(a private page EIO; allocated pages as they are; unallocated ones as zeros, charged; a write-back
allocating first); what reaches this module is everything else: read(2)/write(2), a pending punch, a
part-allocated fill, a backend without ``memory_fd()``, a mount under ``--hot-path python``.

``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)`` and ``fallocate(2)`` on ``mem`` are ``conversions.py``'s.
"""

from __future__ import annotations

import errno

from ..address import Range
from ..gmem import GuestMemfd, HostFault, TransitionPending
from ..uapi import PAGE_SHIFT, PAGE_SIZE
from .budget import Charges
from .inodes import Entry


class Mem:
    """Page-cache fills and write-backs of the ``mem`` files of one mount, charged to ``charges``."""

    def __init__(self, charges: Charges):
        self.charges = charges

    def read(self, entry: Entry, offset: int, size: int, *, read_syscall: bool):
        if read_syscall:
            raise OSError(errno.EINVAL, "guest_memfd has no read(): map the file instead")
        gm = entry.gm
        with entry.state:
            size = max(0, min(size, gm.size - offset)) if offset < gm.size else size
            try:
                data = gm.host_fill(offset, size)
            except TransitionPending as exc:
                data = _read_around_punch(gm, exc.range, offset, size)  # a punch Python's or C's
            except HostFault:
                raise OSError(errno.EIO, "host access to a private page or past EOF") from None
            first, last = offset >> PAGE_SHIFT, -(-(offset + len(data)) // PAGE_SIZE)
            self.charges.reserve(entry, first, last)  # ENOMEM past --max-memory: the fault gets SIGBUS
            entry.cached.set(first, last, 1)
        return data

    def write(self, entry: Entry, offset: int, data, *, writepage: bool) -> int:
        if not writepage:
            raise OSError(errno.EINVAL, "guest_memfd has no write(): map the file instead")
        size = len(data)
        first, last = offset >> PAGE_SHIFT, -(-(offset + size) // PAGE_SIZE)
        with entry.state:
            try:
                # Allocates the pages a mapping wrote; their fill charged them (never refused here: the
                # kernel would drop a page whose write-back fails). Only a write-back racing its page's
                # revocation (cached mark already cleared) can change the count.
                if entry.cached.is_uniform(first, last, 1):
                    entry.gm.host_write(offset, data)
                else:
                    self.charges.recount(entry, first, last, lambda: entry.gm.host_write(offset, data))
            except HostFault:
                raise OSError(errno.EIO, "write-back of a private page or past EOF") from None
        return size


def _read_around_punch(gm: GuestMemfd, punched: Range, offset: int, size: int) -> bytes:
    out = bytearray(size)
    want = Range(offset, offset + size)
    for part in (Range(offset, max(offset, min(want.end, punched.start))),
                 Range(min(want.end, max(offset, punched.end)), want.end)):
        if part.size:
            try:
                out[part.start - offset:part.end - offset] = gm.host_fill(part.start, part.size)
            except (HostFault, TransitionPending):
                raise OSError(errno.EIO, "host access to a private page") from None
    return bytes(out)
