"""Transitions and revocation: what a conversion or punch-hole does to the kernel's page caches of a file.

Transitions (shared→private, punch) follow docs/design.md §3: validate (``prepare_*``), revoke the ranges in
this thread while other loop threads serve the write-backs the revocation waits for, then ``commit()``.
The order is the core's (``GuestMemfd.run_transition``, the one runner); :meth:`Transitions.run_transition`
supplies only what this frontend adds: the revocation, ``Entry.state`` as the lock and what a commit adds
here (a punch's memory recount). Transitions of one file are serialised by ``Entry.lock``, the stand-in for
the kernel's invalidate lock. Where a revocation may run, and why that avoids the deadlocks FUSE allows:
docs/architecture.md, "The three deadlocks".

Fail closed: a revocation that fails leaves the attribute unchanged (the transition is aborted) and its
ranges marked as possibly cached, so the next conversion revokes them again.

Only pages some READ filled since their last revocation are revoked or written back (``Entry.cached`` for
``mem``, ``Entry.private_cached`` for the private view): revoking a range nobody mapped costs nothing. A
fill marks its pages *before* it answers, under the same lock as the core's check (``mem.py``,
``private.py``), so a conversion that starts meanwhile always includes them (and its invalidation then
waits for that READ's page locks). The marks are cleared *before* a revocation runs, so a page read while
it runs is marked again and included in the next one.

This module talks to the kernel (``revoke.py``'s notifications and write-back descriptors); it is not
FUSE-free, the core (``ufsgmem/gmem.py``) is.
"""

from __future__ import annotations

import contextlib

from ..address import Range
from ..gmem import Transition
from ..uapi import GUEST_MEMFD_FLAG_MMAP, PAGE_SHIFT, PAGE_SIZE
from .budget import Charges
from .inodes import Entry
from .revoke import InodeInvalidator, WriteBackFiles, write_back


class Transitions:
    """Revocation and write-back of one mount's files, and the transition runner over them.
    ``invalidator`` revokes ranges from the kernel's page cache (None: nothing is ever cached, as in tests
    without a mount); ``mountpoint`` lets revocations write back in bulk through a descriptor of our own
    (kept in ``write_back_files``)."""

    def __init__(self, invalidator: InodeInvalidator | None, charges: Charges, *, mountpoint: str | None,
                 write_back_files: WriteBackFiles):
        self.invalidator = invalidator
        self.charges = charges
        self.mountpoint = mountpoint
        self.write_back_files = write_back_files

    # --- the runner (entry.lock held) ---------------------------------------------------------------
    def run_transition(self, entry: Entry, transition: Transition | None) -> None:
        """The core's runner (``GuestMemfd.run_transition``: revoke, then commit, or abort) with what this
        frontend adds: its revocation, ``entry.state`` as the lock, the charge a punch gives back.
        entry.lock held."""
        if transition is None:
            return

        def revoke(ranges) -> None:
            self.revoke(entry, ranges)
            if transition.kind == "punch_hole":  # a punch empties the private view's pages too
                self.revoke_private(entry, transition.range)

        entry.gm.run_transition(transition, revoke, lock=entry.state, around_commit=self._recounting(entry))

    def _recounting(self, entry: Entry):
        """The commit hook: a punch gives memory back (its charge follows); a conversion keeps what it had."""
        def around_commit(transition: Transition, commit) -> None:
            if transition.kind != "punch_hole":
                return commit()
            first, last = transition.range.start >> PAGE_SHIFT, -(-transition.range.end // PAGE_SIZE)
            self.charges.recount(entry, first, last, commit)
        return around_commit

    # --- mem (entry.lock held) ----------------------------------------------------------------------
    def revoke(self, entry: Entry, ranges) -> None:
        with entry.state:
            parts = self._cached_parts(entry, ranges)
        if not parts or self.invalidator is None:
            return
        try:
            with self._fd(entry) as fd:
                self.invalidator.revoke(entry.ino("mem"), parts, fd)
        except BaseException:
            with entry.state:  # fail closed: still possibly mapped, so the next conversion revokes again
                for part in parts:
                    self._mark_cached(entry, part.start >> PAGE_SHIFT, part.end >> PAGE_SHIFT, 1)
            raise

    def write_back(self, entry: Entry, ranges) -> None:
        """Make the backend hold what host mappings wrote, without unmapping (enough before a guest read).
        Falls back to a revocation when the file has no name any more."""
        with entry.state:
            parts = [Range(s << PAGE_SHIFT, e << PAGE_SHIFT) for r in ranges
                     for s, e, v in entry.cached.runs(r.start >> PAGE_SHIFT, -(-r.end // PAGE_SIZE)) if v]
        if not parts or self.invalidator is None:
            return
        with self._fd(entry) as fd:
            written = write_back(fd, parts)
        if not written:
            self.revoke(entry, parts)

    def _fd(self, entry: Entry):
        """Context: our descriptor of ``entry``'s mem, or None (``revoke.WriteBackFiles``; entry.lock held)."""
        if entry.destroyed or not entry.gm.flags & GUEST_MEMFD_FLAG_MMAP:
            return contextlib.nullcontext(None)
        path = None if self.mountpoint is None else f"{self.mountpoint}/{entry.name}/mem"
        return self.write_back_files.use(entry.dir_ino, path)

    def _cached_parts(self, entry: Entry, ranges) -> tuple[Range, ...]:
        """The parts of ``ranges`` that may be cached, marked uncached *before* revoking them: a page read
        while the revocation runs is marked again and so included in the next one. entry.state held."""
        parts = []
        for rng in ranges:
            first, last = rng.start >> PAGE_SHIFT, -(-rng.end // PAGE_SIZE)
            if entry.cached.is_uniform(first, last, 0):  # nobody read it in: nothing to revoke
                continue
            cached = [Range(s << PAGE_SHIFT, e << PAGE_SHIFT) for s, e, v in entry.cached.runs(first, last) if v]
            if cached:
                self._mark_cached(entry, first, last, 0)
                parts += cached
        return tuple(parts)

    def _mark_cached(self, entry: Entry, first: int, last: int, value: int) -> None:
        """Set pages ``[first, last)`` possibly cached (1) or not (0), keeping the file's charge. entry.state held."""
        self.charges.recount(entry, first, last, lambda: entry.cached.set(first, last, value))

    # --- the private view (entry.lock held) ---------------------------------------------------------
    def revoke_private(self, entry: Entry, rng: Range) -> None:
        """Write back and unmap the pages of ``rng`` that ``private`` handed out (entry.lock held). The
        kernel launders dirty pages one by one here (no descriptor of ours: the file has no name under
        ``ufsgmem run``)."""
        with entry.state:
            cached = entry.private_cached
            if cached is None or self.invalidator is None:
                return
            first, last = rng.start >> PAGE_SHIFT, min(cached.npages, -(-rng.end // PAGE_SIZE))
            parts = [Range(s << PAGE_SHIFT, e << PAGE_SHIFT) for s, e, v in cached.runs(first, last) if v]
            if parts:
                cached.set(first, last, 0)
        if not parts:
            return
        try:
            self.invalidator.revoke(entry.ino("private"), parts, None)
        except BaseException:
            with entry.state:  # fail closed: still possibly mapped
                for part in parts:
                    cached.set(part.start >> PAGE_SHIFT, part.end >> PAGE_SHIFT, 1)
            raise

    # --- after the last release ---------------------------------------------------------------------
    def drop_cache(self, entry: Entry) -> None:
        """After a destroyed file's last release: its cached pages are clean (FUSE writes dirty pages back
        when the last mapping goes), so invalidating them only gives the memory back early."""
        if self.invalidator is not None and entry.cached.count(1):
            self.invalidator.revoke(entry.ino("mem"), (Range(0, entry.gm.size),), None)
        cached, entry.private_cached = entry.private_cached, None
        if cached is not None and self.invalidator is not None:
            self.invalidator.revoke(entry.ino("private"), (Range(0, entry.gm.size),), None)
