"""The private view, for ``ufsgmem run`` (docs/architecture.md): the ``private`` file's page-cache traffic.

A mappable file whose page fills serve only *private* pages (from the backend, as a vCPU access would) and
whose write-backs are accepted only for private pages; a shared page, a page past EOF or read(2)/write(2)
is EIO/EINVAL. So a page sits in at most one of the two page caches (``mem`` for shared, ``private`` for
private): shared→private revokes it from ``mem``; private→shared first writes it back and revokes it from
``private`` (:meth:`PrivateView.close`: fills of the range are refused meanwhile), then flips; a punch
revokes both (``transitions.py``). Only pages a private fill handed out are revoked
(``Entry.private_cached``, marked here before the fill answers).
"""

from __future__ import annotations

import errno

from ..address import Range, align_down, align_up
from ..gmem import SHARED
from ..runmap import RunMap
from ..uapi import PAGE_SHIFT, PAGE_SIZE
from .budget import Charges
from .inodes import Entry
from .transitions import Transitions


class PrivateView:
    """The ``private`` files of one mount: fills and write-backs of private pages, and closing a range
    before it turns shared."""

    def __init__(self, charges: Charges, transitions: Transitions):
        self.charges = charges
        self.transitions = transitions

    def read(self, entry: Entry, offset: int, size: int, *, read_syscall: bool) -> bytes:
        """A page fill of ``private``: the bytes of private pages, as a vCPU reads them (a first use
        allocates, as a guest fault does). EIO for a shared page, past EOF or during private→shared."""
        if read_syscall:
            raise OSError(errno.EINVAL, "the private view has no read(): map it")
        gm = entry.gm
        with entry.state:
            if offset >= gm.size:
                raise OSError(errno.EIO, "past the end of the file")
            size = min(size, gm.size - offset)
            first, last = offset >> PAGE_SHIFT, -(-(offset + size) // PAGE_SIZE)
            self._check(entry, offset, size)
            data = bytearray(self.charges.committing(entry, offset, size, lambda: gm.guest_read(offset, size)))
            pending = gm.pending
            if pending is not None and pending.kind == "punch_hole":  # what the range holds once it commits
                cut = pending.range.intersect(Range(offset, offset + size))
                if cut is not None and cut.size:
                    data[cut.start - offset:cut.end - offset] = bytes(cut.size)
            if entry.private_cached is None:
                entry.private_cached = RunMap(gm.size >> PAGE_SHIFT, 0)
                entry.file.set_private_active()  # conversions must close the view now: Python's
            entry.private_cached.set(first, last, 1)
        return bytes(data)

    def write(self, entry: Entry, offset: int, data, *, writepage: bool) -> int:
        """A write-back of ``private``: accepted for private pages only (and for pages a private→shared
        conversion is taking out of the view: the guest wrote them while they were private)."""
        if not writepage:
            raise OSError(errno.EINVAL, "the private view has no write(): map it")
        gm = entry.gm
        size = len(data)
        with entry.state:
            if offset + size > gm.size:
                raise OSError(errno.EIO, "write-back past the end of the file")
            self._check(entry, offset, size, closing_ok=True)
            self.charges.committing(entry, offset, size, lambda: gm.guest_write(offset, data))
        return size

    def _check(self, entry: Entry, offset: int, size: int, *, closing_ok: bool = False) -> None:
        """EIO unless every page of the range is private (entry.state held)."""
        if size <= 0:
            return
        rng = Range(align_down(offset, PAGE_SIZE), align_up(offset + size, PAGE_SIZE))
        closing = entry.private_closing
        if closing is not None and closing.intersect(rng):
            if closing_ok:
                return
            raise OSError(errno.EIO, "the page is being converted to shared")
        if any(a == SHARED for _o, _s, a in entry.gm.get_attributes(rng.start, rng.size)):
            raise OSError(errno.EIO, "the private view reaches private pages only")

    def close(self, entry: Entry, offset: int, size: int) -> bool:
        """Before private→shared: refuse fills of the range in ``private``, then write its pages back and
        unmap them there. Nothing to do (False) if the view never served a page; the caller reopens the
        range (``entry.private_closing = None``) once the conversion is prepared. entry.lock held."""
        gm = entry.gm
        if entry.private_cached is None or size <= 0 or offset < 0 or offset >= gm.size:
            return False
        rng = Range(align_down(offset, PAGE_SIZE), min(gm.size, align_up(offset + size, PAGE_SIZE)))
        with entry.state:
            entry.private_closing = rng
        try:
            self.transitions.revoke_private(entry, rng)
        except BaseException:
            with entry.state:
                entry.private_closing = None
            raise
        return True
