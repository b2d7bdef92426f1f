"""The guest view (``guest``): pread/pwrite that reach every page, as a vCPU's accesses would.

For coherence with host mappings of *shared* pages: before a guest read, dirty host pages of the range are
written back (mappings stay); a guest write first writes dirty host pages back (so an older dirty page
cannot overwrite the guest's bytes later), then applies the write, then revokes the range so every mapping
faults the new bytes in. A host write to the same page racing the guest write may still win with its whole
page (the kernel would order the two; FUSE gives us no page lock to do that). Pages the private view
(``private.py``) handed out are written back before a guest read and revoked around a guest write,
likewise. The write-backs and revocations are ``transitions.py``'s, run under ``Entry.lock``; ``ops.py``
defers these requests (``lowlevel.Deferred``), as it does conversions.
"""

from __future__ import annotations

import errno

from ..address import Range, align_down, align_up
from ..errors import fail
from ..gmem import SHARED, GuestMemfd
from ..uapi import GUEST_MEMFD_FLAG_MMAP, PAGE_SIZE
from .budget import Charges
from .inodes import Entry
from .transitions import Transitions


class GuestView:
    """The ``guest`` files of one mount."""

    def __init__(self, charges: Charges, transitions: Transitions):
        self.charges = charges
        self.transitions = transitions

    def read(self, entry: Entry, offset: int, size: int) -> bytes:
        gm = entry.gm
        size = max(0, min(size, gm.size - offset))
        if size == 0:
            return b""
        with entry.lock:
            if gm.flags & GUEST_MEMFD_FLAG_MMAP:  # host pages may be dirty in the page cache
                with entry.state:
                    shared = _shared_pages(gm, offset, size)
                self.transitions.write_back(entry, shared)
            self.transitions.revoke_private(entry, _page_range(gm, offset, size))  # what a vCPU wrote there
            with entry.state:  # a vCPU's first access allocates, as a guest fault does
                return bytes(self.charges.committing(entry, offset, size, lambda: gm.guest_read(offset, size)))

    def write(self, entry: Entry, offset: int, data) -> int:
        gm = entry.gm
        if offset >= gm.size and len(data):
            raise fail(errno.ENOSPC, f"guest write at {offset:#x} is past the end of the file")
        data = bytes(data[:max(0, gm.size - offset)])
        with entry.lock:
            with entry.state:
                shared = _shared_pages(gm, offset, len(data)) if gm.flags & GUEST_MEMFD_FLAG_MMAP else []
            self.transitions.write_back(entry, shared)
            self.transitions.revoke_private(entry, _page_range(gm, offset, len(data)))
            with entry.state:
                self.charges.committing(entry, offset, len(data), lambda: gm.guest_write(offset, data))
            self.transitions.revoke(entry, shared)
            self.transitions.revoke_private(entry, _page_range(gm, offset, len(data)))  # a fill that raced the write
        return len(data)


def _shared_pages(gm: GuestMemfd, offset: int, size: int) -> list[Range]:
    start, end = align_down(offset, PAGE_SIZE), align_up(min(offset + size, gm.size), PAGE_SIZE)
    if start >= end:
        return []
    return [Range(o, o + s) for o, s, a in gm.get_attributes(start, end - start) if a == SHARED]


def _page_range(gm: GuestMemfd, offset: int, size: int) -> Range:
    return Range(align_down(offset, PAGE_SIZE), max(align_down(offset, PAGE_SIZE),
                                                    min(gm.size, align_up(offset + size, PAGE_SIZE))))
