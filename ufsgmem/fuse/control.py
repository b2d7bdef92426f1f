"""The control files and the read-only reports: ``MOUNTPOINT/ctl`` (create, destroy), ``NAME/ctl`` (pin,
unpin, conversions, allocate, punch, get_attributes), ``NAME/status`` and ``NAME/snapshot``.

One write = one request (``ufsgmem.protocol``); the outcome is kept per open file for the next read
(``ops.py``). A read-back that can be large (``get_attributes``, a snapshot) is counted against the
opener's ``results`` bound before it is built (``users.hold_result``). Creating a file takes its creator's
bounds and charges what it preallocates (``budget.py``, ``users.py``); :func:`give_back` returns them
when the file's memory goes.
"""

from __future__ import annotations

import errno
import json
import os

from .. import protocol
from ..errors import fail
from ..gmem import GuestMemfd
from ..plugins import available, load_backend, BACKENDS
from ..uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE_SHIFT, PAGE_SIZE
from . import creating
from .budget import Charges
from .conversions import Conversions
from .inodes import Entry, Namespace
from .latency import LatencyHold
from .revoke import WriteBackFiles
from .users import Held, hold_result

#: what a held result costs per attribute run: an 8-byte boundary and a 1-byte flag (``pagedtext.py``)
RUN_BYTES = 9


def give_back(charges: Charges, entry: Entry) -> None:
    """The file's memory went back (entry.state held): so do its charge and its place in its owner's
    bounds (``Namespace``'s ``on_free``)."""
    charges.free(entry)
    uid = entry.owner_uid
    charges.users.give(uid, "huge", entry.huge, page_size=entry.gm.folio_size)
    charges.users.give(uid, "files")


class Control:
    """The requests and reports of one mount. ``default_backend`` and ``in_place_conversion`` are what a
    create that does not say gets; ``latency`` is the mount's ``latency.LatencyHold`` under --low-latency
    (reported in status); ``fast`` the session's compiled hot path, whose counters status reports."""

    def __init__(self, ns: Namespace, charges: Charges, conversions: Conversions, write_back_files: WriteBackFiles,
                 *, latency: LatencyHold | None, default_backend: str, in_place_conversion: bool, fast=None):
        self.ns = ns
        self.fast = fast
        self.charges = charges
        self.conversions = conversions
        self.write_back_files = write_back_files
        self.latency = latency
        self.default_backend = default_backend
        self.in_place_conversion = in_place_conversion

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
                self.charges.committing(entry, req.offset, req.size, lambda: gm.pin(req.offset, req.size))
            return ""
        if req.op == "unpin":
            with entry.state:
                gm.unpin(req.offset, req.size)
            return ""
        if req.op == "set_memory_attributes":
            self.conversions.set_memory_attributes(entry, req)
        elif req.op in ("allocate", "punch_hole"):
            punch = FALLOC_FL_PUNCH_HOLE if req.op == "punch_hole" else 0
            self.conversions.fallocate(entry, FALLOC_FL_KEEP_SIZE | punch, req.offset, req.size)
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
            self.ns.add(req.name, gm, owner=user, charged=charged, huge=huge,  # EEXIST: a create won
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
        # the mount's mem requests by who served them (the compiled path or Python), for the whole mount
        status["hot_path"] = None if self.fast is None else self.fast.status()
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
