"""The mount's memory cap (``ufsgmem mount --max-memory``): what guest memory the mount has committed.

A folio of a file is *committed* when the backend holds memory for it or when some page of it was handed
to the kernel's page cache since its last revocation (``Entry.cached``): a page served as zeros without
being allocated (``GuestMemfd.host_fill``) still needs its folio the moment a mapping writes it and the
write-back arrives. Charging at the fill, not at the write-back, is what makes the cap safe: a write-back
is never refused for want of memory (the kernel would drop the page's data), and the request that meets
the cap is the one that asks for more (a fill: the faulting process gets SIGBUS; ``fallocate``, a guest
access or ``create``: ENOMEM), never an OOM kill of the server.

The count is folio-granular (a 2 MiB THP or hugetlb folio costs 2 MiB however little of it is used) and
conservative: the kernel may drop clean page-cache pages without telling FUSE, so a folio stays committed
until a conversion or punch-hole revokes it or the file is freed. The page cache itself (one more copy of
every mapped page) is not counted; ``status`` reports it separately as ``page_cache_bytes_max``.

Every change to the count is made under the file's ``Entry.state`` lock together with the change of the
maps it derives from, so concurrent fills and revocations of one file never count a folio twice.

Each charge also counts against the file owner's ``memory`` bound (``users.py``), first, so that one user
of an ``--allow-other`` mount cannot take the whole cap; a refusal by either leaves both unchanged.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..address import format_size
from ..errors import fail
from ..uapi import PAGE_SHIFT, PAGE_SIZE
from .fastpath import Counter
from .users import Users

if TYPE_CHECKING:
    from .inodes import Entry


class MemoryBudget:
    """Committed bytes of a mount against an optional cap; thread-safe. The count is a C counter
    (``fastpath.Counter``) that the compiled hot path charges too."""

    def __init__(self, cap: int | None = None):
        if cap is not None and cap <= 0:
            raise ValueError(f"a memory cap must be positive, not {cap}")
        self.cap = cap
        self.counter = Counter(cap)

    @property
    def committed(self) -> int:
        return self.counter.held

    def charge(self, nbytes: int, *, force: bool = False) -> None:
        """Commit ``nbytes`` more; ENOMEM (and nothing committed) past the cap unless ``force``d."""
        if not self.counter.take(nbytes, force):
            raise fail(errno.ENOMEM, f"{format_size(nbytes)} more would pass the mount's memory cap: "
                                     f"{format_size(self.committed)} of {format_size(self.cap)} committed "
                                     "(ufsgmem mount --max-memory)")

    def uncharge(self, nbytes: int) -> None:
        """Give back ``nbytes`` that were charged. Giving back more than is committed is a bug (memory
        committed without a charge, which would let the cap be passed), refused before anything changes."""
        if not self.counter.give(nbytes):
            raise AssertionError(f"uncharging {nbytes} bytes of {self.committed} committed: some path "
                                 "committed memory without charging it")

    def status(self) -> dict:
        return {"max": self.cap, "committed": self.committed}


class Charges:
    """Keeps each file's share of a mount's :class:`MemoryBudget`, and of its owner's memory bound, equal
    to its committed folios. A file's count and share are the ``Entry``'s own: they are read and changed
    through its methods (``committed_folios``, ``take_charge``, ``give_charge``), never its fields."""

    def __init__(self, budget: MemoryBudget, users: Users | None = None):
        self.budget = budget
        self.users = users if users is not None else Users()

    def charge(self, uid: int, nbytes: int, *, force: bool = False) -> None:
        """Commit ``nbytes`` more for a file of ``uid``: its bound first, then the mount's cap (ENOMEM with
        the reason, nothing committed, if either refuses)."""
        self.users.take(uid, "memory", nbytes, force=force)
        try:
            self.budget.charge(nbytes, force=force)
        except BaseException:
            self.users.give(uid, "memory", nbytes)
            raise

    def uncharge(self, uid: int, nbytes: int) -> None:
        self.budget.uncharge(nbytes)
        self.users.give(uid, "memory", nbytes)

    def reserve(self, entry: "Entry", first: int, last: int) -> int:
        """Before pages ``[first, last)`` become committed (a fill, an allocation): charge the folios that
        are not yet, ENOMEM past the cap. Returns the bytes charged, for :meth:`refund` if the change fails.
        entry.state held."""
        if first >= last:
            return 0
        need = (entry.overlapping_folios(first, last) - entry.committed_folios(first, last)) * entry.folio_size
        if need:
            self.charge(entry.owner_uid, need)
            entry.take_charge(need)
        return need

    def refund(self, entry: "Entry", nbytes: int) -> None:
        if nbytes:
            entry.give_charge(nbytes)
            self.uncharge(entry.owner_uid, nbytes)

    def committing(self, entry: "Entry", offset: int, size: int, change):
        """Charge the folios of ``[offset, offset + size)`` that ``change`` will commit (ENOMEM past the
        cap), run it, refund if it fails. entry.state held."""
        charged = self.reserve(entry, offset >> PAGE_SHIFT, -(-(offset + size) // PAGE_SIZE))
        try:
            return change()
        except BaseException:
            self.refund(entry, charged)
            raise

    def recount(self, entry: "Entry", first: int, last: int, change) -> None:
        """Run ``change`` (which may commit or release pages of ``[first, last)`` only) and follow it: a
        release gives the memory back, a commit it could not refuse (a write-back) is charged over the cap.
        entry.state held."""
        before = entry.committed_folios(first, last)
        try:
            change()
        finally:
            delta = (entry.committed_folios(first, last) - before) * entry.folio_size
            if delta > 0:
                self.charge(entry.owner_uid, delta, force=True)
                entry.take_charge(delta)
            elif delta < 0:
                self.refund(entry, -delta)

    def free(self, entry: "Entry") -> None:
        """The file's memory went back (its last reference is gone). entry.state held."""
        self.refund(entry, entry.charged)
