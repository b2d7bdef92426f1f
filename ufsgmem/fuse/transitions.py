"""What each file of the mount does, over the core. FUSE-free: plain calls with byte offsets, which
``ops.py`` makes for libfuse's worker threads and the executor's (several at once; ``inodes.py`` says
which lock guards what).

``mem``
    Opened with direct I/O (and ``FUSE_DIRECT_IO_ALLOW_MMAP``, so it can still be mapped shared), which
    lets us tell the kernel's three ways in apart: a page fault or readahead fills the page cache with a
    READ that has no lock owner; read(2) arrives with one; a dirty mapped page comes back as a WRITE
    flagged ``writepage``, write(2) without. read(2) and write(2) are EINVAL, as guest_memfd has neither
    (and the kernel writes the range's dirty pages back before it sends a direct write, so a refused
    write changes no byte any mapping sees). Page-cache fills are served from ``GuestMemfd.host_fill``
    (zero copy; pages never allocated are zeros and stay unallocated, so readahead costs no backend
    memory): a private page or a page past EOF anywhere in the request fails the *whole* request with
    EIO, which the kernel turns into SIGBUS for the faulting access and then retries the faulting page
    alone, so shared neighbours still work. A short read would be taken as end of file and shrink the
    file, so there are none. Write-backs go to ``host_write``, which allocates.

    Every fill charges the folios it hands out to the mount's memory budget (``budget.py``) before it
    answers: past ``--max-memory`` the fill is ENOMEM (SIGBUS for the fault; a failed readahead costs
    nothing, the kernel retries the faulting page alone), and a write-back, which must never fail, finds
    its folio already paid for.

    A fill that meets a pending punch-hole is answered with zeros (what the range holds once the punch
    commits) instead of waiting for the commit: the revocation that the punch is waiting for has to take
    the lock of the very page being read in, so waiting would deadlock. So a fault can see the zeros
    before the punch returns (the kernel makes it wait, then also hands out zeros), and if the punch then
    fails, the zeros stay cached over content the backend kept (docs/protocol.md).

    ``ioctl(KVM_SET_MEMORY_ATTRIBUTES2)`` and ``fallocate(2)`` arrive here as requests and take the same
    path as their ``NAME/ctl`` forms.

Control files
    One write = one request (``ufsgmem.protocol``); the outcome is kept per open file for the next read.

Transitions (shared→private, punch) follow docs/design.md §3: validate (``prepare_*``), revoke the ranges in
this thread while other loop threads serve the write-backs the revocation waits for, then ``commit()``.
The order is the core's (``GuestMemfd.run_transition``, the one runner); this module supplies only the
revocation, ``Entry.state`` as the lock and what a commit adds here (a punch's memory recount). They are
serialised per file by ``Entry.lock``, the stand-in for the kernel's invalidate lock. Where a revocation
may run, and why that avoids the deadlocks FUSE allows: docs/architecture.md, "The three deadlocks".

Fail closed: a revocation that fails leaves the attribute unchanged (the transition is aborted) and its
ranges marked as possibly cached, so the next conversion revokes them again.

``guest``
    pread/pwrite reach every page. For coherence with host mappings of *shared* pages: before a guest
    read, dirty host pages of the range are written back (mappings stay); a guest write first writes
    dirty host pages back (so an older dirty page cannot overwrite the guest's bytes later), then
    applies the write, then revokes the range so every mapping faults the new bytes in. A host write to
    the same page racing the guest write may still win with its whole page (the kernel would order the
    two; FUSE gives us no page lock to do that). Pages the private view (below) handed out are written
    back before a guest read and revoked around a guest write, likewise.

``private``
    The private view, for ``ufsgmem run`` (docs/architecture.md): a mappable file whose page fills serve
    only *private* pages (from the backend, as a vCPU access would) and whose write-backs are accepted
    only for private pages; a shared page, a page past EOF or read(2)/write(2) is EIO/EINVAL. So a page
    sits in at most one of the two page caches (``mem`` for shared, ``private`` for private):
    shared→private revokes it from ``mem`` (above); private→shared first writes it back and revokes it
    from ``private`` (fills of the range are refused meanwhile), then flips; a punch revokes both. Only
    pages a private fill handed out are revoked (``Entry.private_cached``).

Only pages some READ filled since their last revocation are revoked or written back (``Entry.cached``):
revoking a range nobody mapped costs nothing. A fill marks its pages *before* it answers, under the same
lock as the core's check, so a conversion that starts meanwhile always includes them (and its
invalidation then waits for that READ's page locks).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os

from .. import protocol
from ..address import Range, align_down, align_up
from ..errors import fail
from ..gmem import SHARED, GuestMemfd, HostFault, Transition, TransitionPending
from ..plugins import available, load_backend, BACKENDS
from ..uapi import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTES2_STRUCT,
    KVM_SET_MEMORY_ATTRIBUTES2, PAGE_SHIFT, PAGE_SIZE,
)
from . import creating
from ..runmap import RunMap
from .budget import Charges, MemoryBudget
from .inodes import Entry, Namespace
from .latency import LatencyHold
from .revoke import InodeInvalidator, WriteBackFiles, write_back
from .users import Held, UserLimits, Users, hold_result

#: what a held result costs per attribute run: an 8-byte boundary and a 1-byte flag (``pagedtext.py``)
RUN_BYTES = 9


class Files:
    """The files of one mount, built complete: ``invalidator`` revokes ranges from the kernel's page cache
    (None: nothing is ever cached, as in tests without a mount), ``mountpoint`` lets revocations write back
    in bulk through a descriptor of our own, ``latency`` is the mount's ``latency.LatencyHold`` under
    --low-latency (reported in status). It makes its own :class:`Namespace`, whose users are its charges'
    and whose freed files give their charge back here."""

    def __init__(self, invalidator: InodeInvalidator | None, *, mountpoint: str | None = None,
                 latency: LatencyHold | None = None, default_backend: str = "anon", in_place_conversion: bool = True,
                 max_memory: int | None = None, per_user: UserLimits | None = None):
        #: what the mount has committed, against --max-memory (``budget.py``)
        self.charges = Charges(MemoryBudget(max_memory), Users(per_user, max_memory=max_memory))
        self.ns = Namespace(self.charges.users, on_free=self._freed)
        self.invalidator = invalidator
        self.default_backend = default_backend
        #: the mount's default for files created without saying (kvm.gmem_in_place_conversion)
        self.in_place_conversion = in_place_conversion
        self.mountpoint = mountpoint
        self.write_back_files = WriteBackFiles()  # our own descriptor of each mem, for bulk write-back
        self.latency = latency

    def _freed(self, entry: Entry) -> None:
        """The file's memory went back (entry.state held): so do its charge and its place in its owner's
        bounds."""
        self.charges.free(entry)
        uid = entry.owner_uid
        self.charges.users.give(uid, "huge", entry.huge, page_size=entry.gm.folio_size)
        self.charges.users.give(uid, "files")

    # --- revocation (entry.lock held) ---------------------------------------------------------------
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

    def drop_cache(self, entry: Entry) -> None:
        """After a destroyed file's last release: its cached pages are clean (FUSE writes dirty pages back
        when the last mapping goes), so invalidating them only gives the memory back early."""
        if self.invalidator is not None and entry.cached.count(1):
            self.invalidator.revoke(entry.ino("mem"), (Range(0, entry.gm.size),), None)
        cached, entry.private_cached = entry.private_cached, None
        if cached is not None and self.invalidator is not None:
            self.invalidator.revoke(entry.ino("private"), (Range(0, entry.gm.size),), None)

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

    # --- mem: page-cache fills and write-backs ------------------------------------------------------
    def mem_read(self, entry: Entry, offset: int, size: int, *, read_syscall: bool):
        if read_syscall:
            raise OSError(errno.EINVAL, "guest_memfd has no read(): map the file instead")
        gm = entry.gm
        with entry.state:
            size = max(0, min(size, gm.size - offset)) if offset < gm.size else size
            try:
                data = gm.host_fill(offset, size)
            except TransitionPending as exc:
                data = self._read_around_punch(gm, exc.transition.range, offset, size)
            except HostFault:
                raise OSError(errno.EIO, "host access to a private page or past EOF") from None
            first, last = offset >> PAGE_SHIFT, -(-(offset + len(data)) // PAGE_SIZE)
            self.charges.reserve(entry, first, last)  # ENOMEM past --max-memory: the fault gets SIGBUS
            entry.cached.set(first, last, 1)
        return data

    @staticmethod
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

    def mem_write(self, entry: Entry, offset: int, data, *, writepage: bool) -> int:
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

    # --- mem: the system calls ----------------------------------------------------------------------
    def ioctl(self, entry: Entry, cmd: int, arg: bytes, *, compat: bool, writable: bool) -> tuple[int, bytes]:
        """guest_memfd's ioctl (v8): ``(0, b"")`` on success (nothing is copied back), ``(-errno, struct)``
        where the kernel copies the struct back (EAGAIN, ENOMEM: ``error_offset`` set); other errors raise.
        """
        if cmd != KVM_SET_MEMORY_ATTRIBUTES2 or not entry.in_place_conversion:
            raise OSError(errno.ENOTTY, f"ioctl {cmd:#x} is not a guest_memfd ioctl here")
        if compat:  # a 32-bit caller: v8 sets no compat_ioctl, so the VFS answers it ENOTTY
            raise OSError(errno.ENOTTY, "guest_memfd has no 32-bit compat ioctl")
        if not writable:
            raise OSError(errno.EBADF, "the file is not open for writing")
        if len(arg) != KVM_MEMORY_ATTRIBUTES2_STRUCT.size:
            raise OSError(errno.EINVAL, f"kvm_memory_attributes2 is 128 bytes, got {len(arg)}")
        request = protocol.parse_attributes2(arg)
        try:
            self.set_memory_attributes(entry, request)
        except OSError as exc:
            offset = getattr(exc, "error_offset", None)
            if offset is None:
                raise
            return -exc.errno, protocol.with_error_offset(arg, offset)
        return 0, b""

    def fallocate(self, entry: Entry, mode: int, offset: int, length: int) -> None:
        """fallocate(2) after the VFS's checks: guest_memfd's own (core), then allocate or punch."""
        gm = entry.gm
        with entry.lock:
            with entry.state:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    transition = gm.prepare_fallocate(mode, offset, length)
                else:  # the kernel's checks first, then ENOMEM past --max-memory, then allocate
                    gm.check_fallocate(mode, offset, length)
                    transition = self._committing(entry, offset, length,
                                                  lambda: gm.prepare_fallocate(mode, offset, length))
            self.run_transition(entry, transition)

    def _committing(self, entry: Entry, offset: int, size: int, change):
        """Charge the folios of ``[offset, offset + size)`` that ``change`` will commit (ENOMEM past the
        cap), run it, refund if it fails. entry.state held."""
        charged = self.charges.reserve(entry, offset >> PAGE_SHIFT, -(-(offset + size) // PAGE_SIZE))
        try:
            return change()
        except BaseException:
            self.charges.refund(entry, charged)
            raise

    def set_memory_attributes(self, entry: Entry, req: protocol.FileRequest) -> None:
        if not entry.in_place_conversion:
            raise fail(errno.ENOTTY, "this file plays a kernel without in-place conversion "
                                     "(gmem_in_place_conversion=0)")
        gm = entry.gm
        with entry.lock:
            closing = req.attributes == SHARED and self._close_private(entry, req.offset, req.size)
            try:
                with entry.state:
                    transition = gm.prepare_set_memory_attributes(req.offset, req.size, req.attributes,
                                                                  req.flags, req.reserved)
            finally:
                if closing:
                    with entry.state:
                        entry.private_closing = None
            self.run_transition(entry, transition)

    # --- private: the private view (ufsgmem run) ----------------------------------------------------
    def private_read(self, entry: Entry, offset: int, size: int, *, read_syscall: bool) -> bytes:
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
            self._check_private(entry, offset, size)
            data = bytearray(self._committing(entry, offset, size, lambda: gm.guest_read(offset, size)))
            pending = gm.pending
            if pending is not None and pending.kind == "punch_hole":  # what the range holds once it commits
                cut = pending.range.intersect(Range(offset, offset + size))
                if cut is not None and cut.size:
                    data[cut.start - offset:cut.end - offset] = bytes(cut.size)
            if entry.private_cached is None:
                entry.private_cached = RunMap(gm.size >> PAGE_SHIFT, 0)
            entry.private_cached.set(first, last, 1)
        return bytes(data)

    def private_write(self, entry: Entry, offset: int, data, *, writepage: bool) -> int:
        """A write-back of ``private``: accepted for private pages only (and for pages a private→shared
        conversion is taking out of the view: the guest wrote them while they were private)."""
        if not writepage:
            raise OSError(errno.EINVAL, "the private view has no write(): map it")
        gm = entry.gm
        size = len(data)
        with entry.state:
            if offset + size > gm.size:
                raise OSError(errno.EIO, "write-back past the end of the file")
            self._check_private(entry, offset, size, closing_ok=True)
            self._committing(entry, offset, size, lambda: gm.guest_write(offset, data))
        return size

    def _check_private(self, entry: Entry, offset: int, size: int, *, closing_ok: bool = False) -> None:
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

    def _close_private(self, entry: Entry, offset: int, size: int) -> bool:
        """Before private→shared: refuse fills of the range in ``private``, then write its pages back and
        unmap them there. Nothing to do (False) if the view never served a page. entry.lock held."""
        gm = entry.gm
        if entry.private_cached is None or size <= 0 or offset < 0 or offset >= gm.size:
            return False
        rng = Range(align_down(offset, PAGE_SIZE), min(gm.size, align_up(offset + size, PAGE_SIZE)))
        with entry.state:
            entry.private_closing = rng
        try:
            self.revoke_private(entry, rng)
        except BaseException:
            with entry.state:
                entry.private_closing = None
            raise
        return True

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

    # --- NAME/ctl -----------------------------------------------------------------------------------
    def file_request(self, entry: Entry, data: bytes, uid: int = 0) -> tuple[bytes | Held, OSError | None]:
        """Run one request for ``uid``; return (read-back, error or None). A ``get_attributes`` read-back is
        rendered as it is read, and counted against ``uid``'s ``results`` bound before it is built."""
        request = None
        try:
            request = protocol.parse_file_request(bytes(data))
            if request.op == "get_attributes":
                return self._get_attributes(entry, request, uid), None
            detail = self._file_request(entry, request)
        except OSError as exc:
            return protocol.error_result(request, exc), exc
        return protocol.ok_result(request, detail), None

    def _file_request(self, entry: Entry, req: protocol.FileRequest) -> str:
        gm = entry.gm
        if req.op == "pin":  # the kernel's checks, then ENOMEM past --max-memory, then fault in
            with entry.state:
                gm.check_pin(req.offset, req.size)
                self._committing(entry, req.offset, req.size, lambda: gm.pin(req.offset, req.size))
            return ""
        if req.op == "unpin":
            with entry.state:
                gm.unpin(req.offset, req.size)
            return ""
        if req.op == "set_memory_attributes":
            self.set_memory_attributes(entry, req)
        elif req.op in ("allocate", "punch_hole"):
            punch = FALLOC_FL_PUNCH_HOLE if req.op == "punch_hole" else 0
            self.fallocate(entry, FALLOC_FL_KEEP_SIZE | punch, req.offset, req.size)
        else:  # parse_file_request only returns known verbs
            raise fail(errno.EINVAL, f"unknown request {req.op!r}")
        return ""

    def _get_attributes(self, entry: Entry, req: protocol.FileRequest, uid: int) -> Held:
        """~9 bytes a run (``GuestMemfd.attribute_arrays``), counted before they are copied."""
        with entry.state:
            runs = entry.gm.attribute_runs(req.offset, req.size)  # EINVAL for a bad range, before counting

        def build():
            with entry.state:
                bounds, private = entry.gm.attribute_arrays(req.offset, req.size)
            return protocol.attributes_result(bounds, private)

        return hold_result(self.charges.users, uid, runs * RUN_BYTES, build)

    # --- MOUNTPOINT/ctl -----------------------------------------------------------------------------
    def mount_request(self, data: bytes, user: tuple[int, int] = (0, 0)) -> tuple[bytes, OSError | None, str | None]:
        """Run one create/destroy as ``user`` (uid, gid); return (read-back, error or None, name removed)."""
        request = None
        try:
            request = protocol.parse_mount_request(bytes(data))
            if isinstance(request, protocol.CreateRequest):
                detail, removed = self._create(request, user), None
            else:
                detail, removed = self._destroy(request, user), request.name
        except OSError as exc:
            return protocol.error_result(request, exc), exc, None
        return protocol.ok_result(request, detail), None, removed

    def _create(self, req: protocol.CreateRequest, user: tuple[int, int] = (0, 0)) -> str:
        if req.name in self.ns.by_name:
            raise fail(errno.EEXIST, f"{req.name!r} exists")
        backend = req.backend or self.default_backend
        if backend not in available(BACKENDS):
            raise fail(errno.EINVAL, f"unknown backend {backend!r}; available: {', '.join(available(BACKENDS))}")
        # The kernel's checks first, then ENOMEM if preallocating would pass --max-memory (before any
        # allocation where the backend's class says it preallocates, after it where a file decides).
        # Then the creator's bounds (users.py): ENOSPC past its files or its share of the huge page pool.
        backend_cls = load_backend(backend)
        page_size = GuestMemfd.check_create(req.size, req.flags, backend_cls, req.page_size)
        uid, users = user[0], self.charges.users
        huge = req.size if backend_cls.name == "hugetlb" else 0  # taken from the machine's shared pool
        users.take(uid, "files")
        charged, taken_huge, gm = 0, 0, None
        try:
            taken_huge = users.take(uid, "huge", huge, page_size=page_size)
            self.charges.charge(uid, req.size if backend_cls.preallocates else 0)
            charged = req.size if backend_cls.preallocates else 0
            # Preallocating a large hugetlb file takes a while: it blocks only the thread running this request.
            gm = creating.make(req.name, req.size, req.flags, backend, req.page_size)
            allocated = sum(e - s for s, e in gm.allocated_runs(0, gm.size >> PAGE_SHIFT)) << PAGE_SHIFT
            if allocated > charged:
                self.charges.charge(uid, allocated - charged)
            else:
                self.charges.uncharge(uid, charged - allocated)
            charged = allocated
            in_place = self.in_place_conversion if req.in_place_conversion is None else req.in_place_conversion
            entry = self.ns.add(req.name, gm, owner=user, charged=charged, huge=huge,  # EEXIST: a create won
                                in_place_conversion=in_place)
        except BaseException:
            if gm is not None:
                gm.close()
            self.charges.uncharge(uid, charged)
            users.give(uid, "huge", taken_huge, page_size=page_size)
            users.give(uid, "files")
            raise
        return protocol.describe_create(req, gm.folio_size)

    def _destroy(self, req: protocol.DestroyRequest, user: tuple[int, int] = (0, 0)) -> str:
        entry = self.ns.by_name.get(req.name)
        if entry is not None and user[0] not in (0, os.getuid(), (entry.owner or user)[0]):
            raise fail(errno.EPERM, f"{req.name!r} belongs to uid {entry.owner[0]}: only its owner, the user who "
                                    "mounted, or root may destroy it")
        entry = self.ns.unlink(req.name)
        if entry.dir_ino in self.write_back_files:
            with entry.lock:  # no revocation is using the descriptor meanwhile
                self.write_back_files.close(entry.dir_ino)
        return req.name

    # --- guest --------------------------------------------------------------------------------------
    def _shared_pages(self, gm: GuestMemfd, offset: int, size: int) -> list[Range]:
        start, end = align_down(offset, PAGE_SIZE), align_up(min(offset + size, gm.size), PAGE_SIZE)
        if start >= end:
            return []
        return [Range(o, o + s) for o, s, a in gm.get_attributes(start, end - start) if a == SHARED]

    def guest_read(self, entry: Entry, offset: int, size: int) -> bytes:
        gm = entry.gm
        size = max(0, min(size, gm.size - offset))
        if size == 0:
            return b""
        with entry.lock:
            if gm.flags & GUEST_MEMFD_FLAG_MMAP:  # host pages may be dirty in the page cache
                with entry.state:
                    shared = self._shared_pages(gm, offset, size)
                self.write_back(entry, shared)
            self.revoke_private(entry, self._page_range(gm, offset, size))  # what a vCPU wrote there
            with entry.state:  # a vCPU's first access allocates, as a guest fault does
                return bytes(self._committing(entry, offset, size, lambda: gm.guest_read(offset, size)))

    def guest_write(self, entry: Entry, offset: int, data) -> int:
        gm = entry.gm
        if offset >= gm.size and len(data):
            raise fail(errno.ENOSPC, f"guest write at {offset:#x} is past the end of the file")
        data = bytes(data[:max(0, gm.size - offset)])
        with entry.lock:
            with entry.state:
                shared = self._shared_pages(gm, offset, len(data)) if gm.flags & GUEST_MEMFD_FLAG_MMAP else []
            self.write_back(entry, shared)
            self.revoke_private(entry, self._page_range(gm, offset, len(data)))
            with entry.state:
                self._committing(entry, offset, len(data), lambda: gm.guest_write(offset, data))
            self.revoke(entry, shared)
            self.revoke_private(entry, self._page_range(gm, offset, len(data)))  # a fill that raced the write
        return len(data)

    @staticmethod
    def _page_range(gm: GuestMemfd, offset: int, size: int) -> Range:
        return Range(align_down(offset, PAGE_SIZE), max(align_down(offset, PAGE_SIZE),
                                                        min(gm.size, align_up(offset + size, PAGE_SIZE))))

    # --- status and snapshot ------------------------------------------------------------------------
    def status(self, entry: Entry) -> bytes:
        with entry.state:
            status = entry.gm.status()
            # Pages a page-cache fill handed out since their last revocation: an upper bound on the kernel's
            # page cache of mem (the kernel may have dropped some). Mapped memory costs this *plus* backend_bytes.
            status["page_cache_bytes_max"] = entry.cached.count(1) * PAGE_SIZE
            # Folios the backend holds or a fill promised (budget.py): what counts against --max-memory.
            status["committed_bytes"] = entry.charged
        status["mount_memory"] = self.charges.budget.status()
        status["owner_bounds"] = self.charges.users.status(entry.owner_uid)  # what its owner holds (users.py)
        status["low_latency"] = None if self.latency is None else self.latency.status()
        status["in_place_conversion"] = entry.in_place_conversion
        return (json.dumps(status, indent=1, sort_keys=True) + "\n").encode()

    def snapshot(self, entry: Entry, uid: int = 0) -> Held:
        """The snapshot's JSON, rendered as it is read from the snapshot's arrays; its attribute runs are
        counted against ``uid``'s ``results`` bound before anything is copied, the rest (extents, pins) once
        they are known (``users.hold_result``)."""
        with entry.state:
            runs = entry.gm.attribute_runs()

        def build():
            with entry.state:
                snap = entry.gm.snapshot()
            return snap.json_text()

        return hold_result(self.charges.users, uid, runs * RUN_BYTES, build)
