"""What each file of the mount does, as async functions over the core. FUSE-free apart from being async.

``mem``
    FUSE READ requests of ``mem`` are page-cache fills (a fault, or readahead); they are served from
    ``GuestMemfd.host_read`` (a zero-copy memoryview). A private page or a page past EOF anywhere in the
    request fails the *whole* request with EIO, which the kernel turns into SIGBUS for the faulting
    access; it then retries the faulting page alone, so shared neighbours still work. A short read would
    be taken as end of file and shrink the file, so there are none. FUSE WRITE requests are dirty pages
    written back from shared mappings: ``host_write``.

    A read that meets a pending punch-hole is answered with zeros (what the range holds once the punch
    commits) instead of waiting for the commit: the revocation that the punch is waiting for has to take
    the lock of the very page being read in, so waiting would deadlock. So a fault can see the zeros
    before ``punch_hole`` returns (the kernel makes it wait, then also hands out zeros), and if the punch
    then fails, the zeros stay cached over content the backend kept (docs/protocol.md).

Control files
    One write = one request (``ufsgmem.control``); the outcome is kept per open file for the next read.

Transitions (shared→private, punch-hole) follow design §3: validate (``prepare_*``), revoke the ranges in
a worker thread while this loop keeps serving write-backs, then ``commit()``. They are serialised per
file by ``Entry.lock``, the stand-in for the kernel's invalidate lock.

``guest``
    pread/pwrite reach every page. For coherence with host mappings of *shared* pages: before a guest
    read, dirty host pages of the range are written back (mappings stay); a guest write first writes
    dirty host pages back (so an older dirty page cannot overwrite the guest's bytes later), then
    applies the write, then revokes the range so every mapping faults the new bytes in. A host write to
    the same page racing the guest write may still win with its whole page (the kernel would order the
    two; FUSE gives us no page lock to do that).

Only pages some FUSE READ filled since their last revocation are revoked or written back
(``Entry.cached``): revoking a range nobody mapped costs nothing.
"""

from __future__ import annotations

import errno
import json

import trio

from .. import control
from ..address import Range, align_down, align_up
from ..errors import fail
from ..gmem import SHARED, GuestMemfd, HostFault, Transition, TransitionPending
from ..plugins import available, BACKENDS
from ..uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_MMAP, PAGE_SHIFT, PAGE_SIZE
from . import creating
from .inodes import Entry, Namespace
from .revoke import Revoker, WriteBackFiles, write_back
from .worker import Worker


class Files:
    def __init__(self, namespace: Namespace, revoker: Revoker | None, *, default_backend: str = "anon"):
        self.ns = namespace
        self.revoker = revoker
        self.default_backend = default_backend
        self.mountpoint: str | None = None  # set once mounted: lets revocations write back in bulk
        self.write_back_files = WriteBackFiles()  # our own descriptor of each mem, for bulk write-back
        self.worker = Worker()  # the thread revocations and write-backs block in (started on first use)

    # --- revocation ---------------------------------------------------------------------------------
    async def revoke(self, entry: Entry, ranges) -> None:
        ranges = self._cached_parts(entry, ranges)
        if not ranges or self.revoker is None:
            return
        await self.worker.run(lambda: self.revoker.revoke(entry.ino("mem"), ranges, self._fd(entry)))

    async def write_back(self, entry: Entry, ranges) -> None:
        """Make the backend hold what host mappings wrote, without unmapping (enough before a guest read).
        Falls back to a revocation when the file has no name any more."""
        parts = [Range(s << PAGE_SHIFT, e << PAGE_SHIFT) for r in ranges
                 for s, e, v in entry.cached.runs(r.start >> PAGE_SHIFT, -(-r.end // PAGE_SIZE)) if v]
        if not parts or self.revoker is None:
            return
        if not await self.worker.run(lambda: write_back(self._fd(entry), parts)):
            await self.revoke(entry, parts)

    def _fd(self, entry: Entry) -> int | None:
        """Our descriptor of ``entry``'s mem (opened on first use). Worker thread only, entry.lock held."""
        if entry.destroyed or not entry.gm.flags & GUEST_MEMFD_FLAG_MMAP:
            return None
        path = None if self.mountpoint is None else f"{self.mountpoint}/{entry.name}/mem"
        return self.write_back_files.get(entry.dir_ino, path)

    async def close_write_back(self, entry: Entry) -> None:
        """At destroy: close our descriptor (its FLUSH must be served by this loop, hence the thread)."""
        if entry.dir_ino in self.write_back_files:
            async with entry.lock:
                await trio.to_thread.run_sync(self.write_back_files.close, entry.dir_ino)

    async def drop_cache(self, entry: Entry) -> None:
        """After a destroyed file's last release: its cached pages are clean (FUSE writes dirty pages back
        when the last mapping goes), so invalidating them only gives the memory back early."""
        if self.revoker is not None and entry.cached.count(1):
            whole = (Range(0, entry.gm.size),)
            await trio.to_thread.run_sync(self.revoker.revoke, entry.ino("mem"), whole, None)

    @staticmethod
    def _cached_parts(entry: Entry, ranges) -> tuple[Range, ...]:
        """The parts of ``ranges`` that may be cached, marked uncached *before* revoking them: a page read
        while the revocation runs is marked again and so included in the next one."""
        parts = []
        for rng in ranges:
            first, last = rng.start >> PAGE_SHIFT, -(-rng.end // PAGE_SIZE)
            parts += [Range(s << PAGE_SHIFT, e << PAGE_SHIFT) for s, e, v in entry.cached.runs(first, last) if v]
            entry.cached.set(first, last, 0)
        return tuple(parts)

    async def run_transition(self, entry: Entry, transition: Transition | None) -> None:
        if transition is None:
            return
        try:
            await self.revoke(entry, transition.revoke)
        except BaseException:
            transition.abort()
            raise
        transition.commit()
        if transition.revoke:  # the counters GuestMemfd._run keeps when it revokes in-process
            entry.gm.counters.revocations += 1
            entry.gm.counters.revoked_bytes += sum(r.size for r in transition.revoke)

    # --- mem ----------------------------------------------------------------------------------------
    @staticmethod
    def _check_mappable(gm: GuestMemfd) -> None:
        """A mem without MMAP is opened direct_io, so read(2)/write(2) reach us: EINVAL as the kernel's."""
        if not gm.flags & GUEST_MEMFD_FLAG_MMAP:
            raise OSError(errno.EINVAL, "mem has no read or write; this file was created without mmap")

    def mem_read(self, entry: Entry, offset: int, size: int):
        gm = entry.gm
        self._check_mappable(gm)
        size = max(0, min(size, gm.size - offset)) if offset < gm.size else size
        try:
            data = gm.host_read(offset, size)
        except TransitionPending as exc:
            data = self._read_around_punch(gm, exc.transition.range, offset, size)
        except HostFault:
            raise OSError(errno.EIO, "host access to a private page or past EOF") from None
        entry.cached.set(offset >> PAGE_SHIFT, -(-(offset + len(data)) // PAGE_SIZE), 1)
        return data

    @staticmethod
    def _read_around_punch(gm: GuestMemfd, punched: Range, offset: int, size: int) -> bytes:
        out = bytearray(size)
        want = Range(offset, offset + size)
        for part in (Range(offset, max(offset, min(want.end, punched.start))),
                     Range(min(want.end, max(offset, punched.end)), want.end)):
            if part.size:
                try:
                    out[part.start - offset:part.end - offset] = gm.host_read(part.start, part.size)
                except (HostFault, TransitionPending):
                    raise OSError(errno.EIO, "host access to a private page") from None
        return bytes(out)

    def mem_write(self, entry: Entry, offset: int, data) -> int:
        self._check_mappable(entry.gm)
        try:
            entry.gm.host_write(offset, data)
        except HostFault:
            raise OSError(errno.EIO, "write-back of a private page or past EOF") from None
        return len(data)

    # --- NAME/ctl -----------------------------------------------------------------------------------
    async def file_request(self, entry: Entry, data: bytes) -> tuple[bytes, OSError | None]:
        """Run one request; return (read-back, error or None)."""
        request = None
        try:
            request = control.parse_file_request(bytes(data))
            detail = await self._file_request(entry, request)
        except OSError as exc:
            return control.error_result(request, exc), exc
        return control.ok_result(request, detail), None

    async def _file_request(self, entry: Entry, req: control.FileRequest) -> str:
        gm = entry.gm
        if req.op == "get_attributes":
            return control.format_runs(gm.get_attributes(req.offset, req.size))
        if req.op in ("pin", "unpin"):
            getattr(gm, req.op)(req.offset, req.size)
            return ""
        async with entry.lock:
            if req.op == "set_memory_attributes":
                t = gm.prepare_set_memory_attributes(req.offset, req.size, req.attributes, req.flags, req.reserved)
            elif req.op == "allocate":
                t = gm.prepare_fallocate(control_keep_size(), req.offset, req.size)
            elif req.op == "punch_hole":
                t = gm.prepare_fallocate(control_keep_size(punch=True), req.offset, req.size)
            else:  # parse_file_request only returns known verbs
                raise fail(errno.EINVAL, f"unknown request {req.op!r}")
            await self.run_transition(entry, t)
        return ""

    # --- MOUNTPOINT/ctl -----------------------------------------------------------------------------
    async def mount_request(self, data: bytes) -> tuple[bytes, OSError | None, str | None]:
        """Run one create/destroy; return (read-back, error or None, name removed or None)."""
        request = None
        try:
            request = control.parse_mount_request(bytes(data))
            if isinstance(request, control.CreateRequest):
                detail, removed = await self._create(request), None
            else:
                entry = self.ns.by_name.get(request.name)
                detail, removed = self._destroy(request), request.name
                await self.close_write_back(entry)
        except OSError as exc:
            return control.error_result(request, exc), exc, None
        return control.ok_result(request, detail), None, removed

    async def _create(self, req: control.CreateRequest) -> str:
        if req.name in self.ns.by_name:
            raise fail(errno.EEXIST, f"{req.name!r} exists")
        backend = req.backend or self.default_backend
        if backend not in available(BACKENDS):
            raise fail(errno.EINVAL, f"unknown backend {backend!r}; available: {', '.join(available(BACKENDS))}")
        # Preallocating a large hugetlb file can take a while: keep the loop serving other requests.
        gm = await trio.to_thread.run_sync(creating.make, req.name, req.size, req.flags, backend, req.page_size)
        if req.name in self.ns.by_name:  # lost a race with another create of the same name
            gm.close()
            raise fail(errno.EEXIST, f"{req.name!r} exists")
        self.ns.add(req.name, gm)
        return control.describe_create(req, gm.folio_size)

    def _destroy(self, req: control.DestroyRequest) -> str:
        if req.name not in self.ns.by_name:
            raise fail(errno.ENOENT, f"no guest_memfd called {req.name!r}")
        self.ns.unlink(req.name)
        return req.name

    # --- guest --------------------------------------------------------------------------------------
    def _shared_pages(self, gm: GuestMemfd, offset: int, size: int) -> list[Range]:
        start, end = align_down(offset, PAGE_SIZE), align_up(min(offset + size, gm.size), PAGE_SIZE)
        if start >= end:
            return []
        return [Range(o, o + s) for o, s, a in gm.get_attributes(start, end - start) if a == SHARED]

    async def guest_read(self, entry: Entry, offset: int, size: int) -> bytes:
        gm = entry.gm
        size = max(0, min(size, gm.size - offset))
        if size == 0:
            return b""
        async with entry.lock:
            if gm.flags & GUEST_MEMFD_FLAG_MMAP:  # host pages may be dirty in the page cache
                await self.write_back(entry, self._shared_pages(gm, offset, size))
            return bytes(gm.guest_read(offset, size))

    async def guest_write(self, entry: Entry, offset: int, data) -> int:
        gm = entry.gm
        if offset >= gm.size and len(data):
            raise fail(errno.ENOSPC, f"guest write at {offset:#x} is past the end of the file")
        data = bytes(data[:max(0, gm.size - offset)])
        async with entry.lock:
            shared = self._shared_pages(gm, offset, len(data)) if gm.flags & GUEST_MEMFD_FLAG_MMAP else []
            await self.write_back(entry, shared)
            gm.guest_write(offset, data)
            await self.revoke(entry, shared)
        return len(data)

    # --- status and snapshot ------------------------------------------------------------------------
    @staticmethod
    def status(entry: Entry) -> bytes:
        return (json.dumps(entry.gm.status(), indent=1, sort_keys=True) + "\n").encode()

    @staticmethod
    def snapshot(entry: Entry) -> bytes:
        return entry.gm.snapshot().to_json().encode()


def control_keep_size(punch: bool = False) -> int:
    return FALLOC_FL_KEEP_SIZE | (FALLOC_FL_PUNCH_HOLE if punch else 0)
