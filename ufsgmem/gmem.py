"""The guest_memfd core: one file's semantics, in-process, with no knowledge of FUSE. A Python binding.

The rules themselves are compiled: ``ufsgmem/core/gmem.c`` (declared in ``gmem.h``) holds every check,
the attribute, pin and allocation maps, the pending transition, the counters and the whole-folio count,
and the FUSE server's C hot path calls the same functions on the same ``struct gmem``. This module is the
one Python face of it, so each rule is written once. What stays here: memory (the backend: the C code
says *what* to allocate or which range was punched, Python calls the backend around it), the revocation
runner, the message texts (``_MESSAGES``, keyed by the ``GMEM_WHY_*`` reason the C code fills in) and
the backend-offers-this-page-size check at creation (it is about plugins, not the kernel).

The rules, mirroring ``virt/kvm/guest_memfd.c`` (mainline 6.18) plus the in-place conversion series v8 and
the HugeTLB work, rule for rule and errno for errno (the facts, with sources: design §7, ``docs/design.md``):

* creation: flags MMAP and INIT_SHARED only (other bits EINVAL); size > 0 and page aligned (EINVAL);
  the HugeTLB choice is a backend page size above 4 KiB, which forbids INIT_SHARED and needs the size to
  be a multiple of the huge page (EINVAL). The size never changes.
* fallocate: the VFS checks, then KEEP_SIZE required and no other mode bit (EOPNOTSUPP), alignment to
  the folio size (EINVAL), allocation past EOF (EINVAL), punch past EOF a no-op success.
* attributes: one per page, stored as runs; KVM_SET_MEMORY_ATTRIBUTES2 validation in v8's order,
  all-or-nothing, a no-op returns at once, content preserved both ways.
* pins: emulated long-term pins; shared→private over a pinned page is EAGAIN with ``error_offset``.
* huge folios: an allocated folio is *split* while any of its pages is shared and *whole* otherwise.
  The count is kept by every change of the attribute and allocation maps (in C), recounting only the
  folios the change overlaps; split/merge events are counted as conversions change it.

Host and guest accesses: ``host_read``/``host_write`` are what a process mapping ``mem`` does (a private
page or a page past EOF is a :class:`HostFault`, which the frontend turns into SIGBUS);
``guest_read``/``guest_write`` stand in for vCPU accesses and reach every page.

Changes that must revoke host mappings first (shared→private, punch-hole) are *transitions*:
``prepare_*`` validates and returns a :class:`Transition` naming the ranges to revoke, and
:meth:`GuestMemfd.run_transition` carries it out: revoke, then commit. That runner is the only one: the
FUSE frontend calls it with its own revocation, its lock and its commit bookkeeping, and the plain
methods (``set_memory_attributes``, ``fallocate``) call it with the revocation given at construction
(in-process a no-op, because nothing maps the memory; tests pass a recording one). So the core's tests
run the very sequence the server runs. While a shared→private transition is pending, host reads of its
range fail and host writes are still accepted: revocation writes dirty pages back, and that data must not
be lost (design §3: revoke first, then flip; flipping first loses the data).

Who frees the ``struct gmem`` (``GuestMemfd.address`` hands it to the FUSE extension): it is reference
counted (``gmem_get``/``gmem_put``, atomic). ``gmem_new`` gives the one reference this binding holds; the
FUSE side takes its own with ``gmem_get`` for as long as it may touch the struct without going through
this object, and drops it with ``gmem_put``. :meth:`GuestMemfd.close` (or the finaliser, if close was
never called) drops the binding's reference; the struct is freed by whichever ``gmem_put`` is last. After
``close()`` this object no longer reaches the struct: its counters are a copy taken at close, and calls
that need the maps raise instead of touching freed memory.

Caveats: the C functions assume the file's state lock is held (the frontend's ``Entry.state``; in-process
there is one thread). Integers that fit no int64 (a Python caller may pass any) are mapped to values
that fail the same check (``_clamp``), and the messages are made from the caller's own values, so the
answer is what it was when the rules were Python.
"""

from __future__ import annotations

import contextlib
import errno
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .address import Range, format_size
from .backend import Backend, Progress
from .core._core import ffi, lib
from .errors import GuestMemfdError, fail
from .plugins import load_backend
from .runmap import RunMap
from .snapshot import Snapshot
from .uapi import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
    GUEST_MEMFD_SUPPORTED_FLAGS, KVM_MEMORY_ATTRIBUTE_PRIVATE, PAGE_SHIFT, PAGE_SIZE,
)

SHARED = lib.GMEM_SHARED
PRIVATE = lib.GMEM_PRIVATE
assert PRIVATE == KVM_MEMORY_ATTRIBUTE_PRIVATE and lib.GMEM_PAGE_SIZE == PAGE_SIZE
LOFF_MAX = (1 << 63) - 1

#: The mode words vfs_fallocate lets through to the filesystem (gmem.c, gmem_vfs_fallocate_mode, says
#: how they were measured); asked of the C rule, so the set is not written twice.
VFS_FALLOCATE_MODES = frozenset(m for m in range(0x200) if lib.gmem_vfs_fallocate_mode(m))

#: The type of a revocation: ``revoke_ranges(ranges)`` removes every host mapping of these byte ranges
#: (writing dirty pages back first). The frontend's is built from ``fuse.revoke.InodeInvalidator``.
RevokeRanges = Callable[[tuple[Range, ...]], None]

#: what a transition's commit runs under when the caller has no lock (in-process, one thread)
_NO_LOCK = contextlib.nullcontext()


_ZEROS = bytes(1 << 20)


def zeros(size: int) -> memoryview:
    """``size`` zero bytes, shared and read-only when they fit the common buffer (a fill is at most 1 MiB)."""
    return memoryview(_ZEROS)[:size] if size <= len(_ZEROS) else memoryview(bytes(size))


class HostFault(GuestMemfdError):
    """A host access the kernel would answer with SIGBUS (private page, or past EOF)."""

    def __init__(self, offset: int, why: str):
        super().__init__(errno.EFAULT, f"host access at {offset:#x}: {why}", error_offset=offset)
        self.offset = offset


class TransitionPending(GuestMemfdError):
    """A host read hit ``range``, whose punch-hole is in flight; retry once the transition commits.
    ``transition`` is the runner's, or None for a punch the server's compiled hot path is running (it has
    no Python object: the range is the core's)."""

    def __init__(self, rng: Range, transition: "Transition | None" = None):
        super().__init__(errno.EAGAIN, f"punch_hole of {rng} in progress")
        self.range = rng
        self.transition = transition


def flag_names(flags: int) -> list[str]:
    names = [n for bit, n in ((GUEST_MEMFD_FLAG_MMAP, "mmap"), (GUEST_MEMFD_FLAG_INIT_SHARED, "init_shared"))
             if flags & bit]
    return names


@dataclass
class Transition:
    """A validated change waiting for its host mappings to be revoked. Call ``commit()`` exactly once."""

    kind: str  # "to_private" | "punch_hole"
    range: Range
    revoke: tuple[Range, ...]
    _apply: Callable[[], None]
    _release: Callable[["Transition"], None]
    done: bool = field(default=False)

    def commit(self) -> None:
        assert not self.done, "transition committed twice"
        try:
            self._apply()
        finally:
            self.done = True
            self._release(self)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            self._release(self)


_COUNTER_FIELDS = ("to_private", "to_shared", "noop_conversions", "revocations", "revoked_bytes", "punches",
                   "allocations", "folio_splits", "folio_merges", "eagain")


class Counters:
    """The file's event counters: read from (and written to) the C ``struct gmem_counters``, so the server's
    C hot path and this binding count into the same place. After ``close()`` a copy taken then."""

    __slots__ = ("_c",)

    def __init__(self, c):
        self._c = c  # a ``struct gmem_counters *``

    def _values(self) -> tuple[int, ...]:
        return tuple(getattr(self._c, name) for name in _COUNTER_FIELDS)

    def __eq__(self, other) -> bool:
        return isinstance(other, Counters) and self._values() == other._values()

    def __repr__(self) -> str:
        return "Counters(" + ", ".join(f"{n}={v}" for n, v in zip(_COUNTER_FIELDS, self._values())) + ")"


def _counter(name: str) -> property:
    return property(lambda self: getattr(self._c, name), lambda self, value: setattr(self._c, name, value))


for _name in _COUNTER_FIELDS:
    setattr(Counters, _name, _counter(_name))
del _name


# --- messages -----------------------------------------------------------------------------------------
# A failing C call names its reason (GMEM_WHY_*) and the values the message needs (gmem_err.a and .b,
# named per reason by _VALUES, as gmem.c documents next to each check). The binding formats with the
# caller's own values (which may not fit an int64); message(gm, err) formats from a and b alone, for a
# caller that has only the C struct (the FUSE extension's errors). Each formatter gets the file (for its
# size and folio size), the values by name, and ``at``: err.offset (where the error is).

W = lib
_VALUES: dict[int, tuple[str, ...]] = {
    W.GMEM_WHY_CREATE_FLAGS: ("flags",), W.GMEM_WHY_CREATE_SIZE: ("size",),
    W.GMEM_WHY_CREATE_UNALIGNED: ("size",), W.GMEM_WHY_CREATE_HUGE_INIT_SHARED: ("page_size",),
    W.GMEM_WHY_CREATE_HUGE_SIZE: ("size", "page_size"),
    W.GMEM_WHY_FALLOC_RANGE: ("offset", "length"), W.GMEM_WHY_FALLOC_VFS_MODE: ("mode",),
    W.GMEM_WHY_FALLOC_EFBIG: ("offset", "length"), W.GMEM_WHY_FALLOC_NO_KEEP_SIZE: ("mode",),
    W.GMEM_WHY_FALLOC_MODE: ("mode",), W.GMEM_WHY_FALLOC_UNALIGNED: ("offset", "length"),
    W.GMEM_WHY_FALLOC_PAST_EOF: ("offset", "length"),
    W.GMEM_WHY_ATTR_FLAGS: ("flags",), W.GMEM_WHY_ATTR_RESERVED: (), W.GMEM_WHY_ATTR_UNKNOWN: ("attributes",),
    W.GMEM_WHY_ATTR_RANGE: ("offset", "size"), W.GMEM_WHY_ATTR_UNALIGNED: ("offset", "size"),
    W.GMEM_WHY_ATTR_PAST_EOF: ("offset", "size"), W.GMEM_WHY_ATTR_PINNED: ("page",),
    W.GMEM_WHY_QUERY_UNALIGNED: ("offset", "size"), W.GMEM_WHY_QUERY_RANGE: ("offset", "size"),
    W.GMEM_WHY_PIN_RANGE: ("offset", "size"), W.GMEM_WHY_PIN_PAST_EOF: ("offset", "size"),
    W.GMEM_WHY_PIN_NO_MMAP: ("offset", "size"), W.GMEM_WHY_PIN_PRIVATE: ("page",),
    W.GMEM_WHY_UNPIN_NOT_PINNED: ("page",),
    W.GMEM_WHY_HOST_NO_MMAP: ("offset", "size"), W.GMEM_WHY_HOST_PRIVATE: ("offset", "size"),
    W.GMEM_WHY_HOST_PAST_EOF: ("offset", "size"), W.GMEM_WHY_HOST_CONVERTING: ("offset", "size"),
    W.GMEM_WHY_HOST_PUNCH_PENDING: ("start", "end"), W.GMEM_WHY_GUEST_RANGE: ("offset", "size"),
    W.GMEM_WHY_NOMEM: ("offset", "size"), W.GMEM_WHY_BUSY: ("kind",),
}

_MESSAGES: dict[int, Callable[..., str]] = {
    W.GMEM_WHY_CREATE_FLAGS: lambda g, v, at:
        f"unknown flag bits {v['flags'] & ~GUEST_MEMFD_SUPPORTED_FLAGS:#x} (supported: mmap=0x1, init_shared=0x2)",
    W.GMEM_WHY_CREATE_SIZE: lambda g, v, at: f"size {v['size']} must be positive",
    W.GMEM_WHY_CREATE_UNALIGNED: lambda g, v, at:
        f"size {v['size']:#x} is not a multiple of the page size {PAGE_SIZE:#x}",
    W.GMEM_WHY_CREATE_HUGE_INIT_SHARED: lambda g, v, at:
        f"huge-page files start private: init_shared is not allowed with page size {format_size(v['page_size'])}",
    W.GMEM_WHY_CREATE_HUGE_SIZE: lambda g, v, at:
        f"size {format_size(v['size'])} is not a multiple of the {format_size(v['page_size'])} huge page",
    W.GMEM_WHY_FALLOC_RANGE: lambda g, v, at: f"offset {v['offset']} must be >= 0 and length {v['length']} > 0",
    W.GMEM_WHY_FALLOC_VFS_MODE: lambda g, v, at: f"mode {v['mode']:#x} is not a fallocate mode the VFS accepts"
        + (" (punch_hole needs keep_size)" if v['mode'] == FALLOC_FL_PUNCH_HOLE else ""),
    W.GMEM_WHY_FALLOC_EFBIG: lambda g, v, at:
        f"offset + length {v['offset'] + v['length']:#x} exceeds the largest file offset",
    W.GMEM_WHY_FALLOC_NO_KEEP_SIZE: lambda g, v, at: f"mode {v['mode']:#x}: guest_memfd needs FALLOC_FL_KEEP_SIZE",
    W.GMEM_WHY_FALLOC_MODE: lambda g, v, at: f"mode {v['mode']:#x}: only keep_size and punch_hole are supported",
    W.GMEM_WHY_FALLOC_UNALIGNED: lambda g, v, at: f"offset {v['offset']:#x} and length {v['length']:#x} must be "
        f"multiples of the page size {format_size(g.folio_size)}",
    W.GMEM_WHY_FALLOC_PAST_EOF: lambda g, v, at: f"cannot allocate [{v['offset']:#x}, {v['offset'] + v['length']:#x}) "
        f"past the end of a {format_size(g.size)} file",
    W.GMEM_WHY_ATTR_FLAGS: lambda g, v, at: f"flags {v['flags']:#x} must be 0",
    W.GMEM_WHY_ATTR_RESERVED: lambda g, v, at: "reserved fields must be 0",
    W.GMEM_WHY_ATTR_UNKNOWN: lambda g, v, at:
        f"attributes {v['attributes']:#x}: only private (0x8) or shared (0) exist",
    W.GMEM_WHY_ATTR_RANGE: lambda g, v, at:
        f"size {v['size']:#x} at offset {v['offset']:#x}: empty or wrapping range",
    W.GMEM_WHY_ATTR_UNALIGNED: lambda g, v, at: f"offset {v['offset']:#x} and size {v['size']:#x} must be page aligned",
    W.GMEM_WHY_ATTR_PAST_EOF: lambda g, v, at: f"range [{v['offset']:#x}, {v['offset'] + v['size']:#x}) runs past "
        f"the end of a {format_size(g.size)} file",
    W.GMEM_WHY_ATTR_PINNED: lambda g, v, at: f"page {v['page']:#x} is pinned; unpin it and retry",
    W.GMEM_WHY_QUERY_UNALIGNED: lambda g, v, at:
        f"offset {v['offset']:#x} and size {v['size']:#x} must be page aligned",
    W.GMEM_WHY_QUERY_RANGE: lambda g, v, at: f"range [{v['offset']:#x}, {v['offset'] + v['size']:#x}) is empty or "
        f"runs past the end of the {format_size(g.size)} file",
    W.GMEM_WHY_PIN_RANGE: lambda g, v, at:
        f"offset {v['offset']:#x} and size {v['size']:#x} must be page aligned, size > 0",
    W.GMEM_WHY_PIN_PAST_EOF: lambda g, v, at: f"range [{v['offset']:#x}, {v['offset'] + v['size']:#x}) runs past EOF",
    W.GMEM_WHY_PIN_NO_MMAP: lambda g, v, at: "the file was created without mmap: there is no host mapping to pin",
    W.GMEM_WHY_PIN_PRIVATE: lambda g, v, at:
        f"page {v['page']:#x} is private: a pin needs shared memory the host can reach",
    W.GMEM_WHY_UNPIN_NOT_PINNED: lambda g, v, at: f"page {v['page']:#x} is not pinned",
    # host faults: the reason after "host access at <offset>: " (HostFault adds that)
    W.GMEM_WHY_HOST_NO_MMAP: lambda g, v, at: "the file was created without mmap",
    W.GMEM_WHY_HOST_PRIVATE: lambda g, v, at: "the page is private",
    W.GMEM_WHY_HOST_PAST_EOF: lambda g, v, at: f"past the end of the {format_size(g.size)} file",
    W.GMEM_WHY_HOST_CONVERTING: lambda g, v, at: "the page is being converted to private",
    W.GMEM_WHY_HOST_PUNCH_PENDING: lambda g, v, at: f"punch_hole of {Range(v['start'], v['end'])} in progress",
    W.GMEM_WHY_GUEST_RANGE: lambda g, v, at: f"guest access [{v['offset']:#x}, {v['offset'] + v['size']:#x}) "
        f"outside the {format_size(g.size)} file",
    W.GMEM_WHY_NOMEM: lambda g, v, at: "out of memory for the file's page maps",
    W.GMEM_WHY_BUSY: lambda g, v, at: "a transition started while another is pending: callers serialise "
        "transitions (the kernel's invalidate lock)",
}
_HOST_FAULTS = frozenset((W.GMEM_WHY_HOST_NO_MMAP, W.GMEM_WHY_HOST_PRIVATE, W.GMEM_WHY_HOST_PAST_EOF,
                          W.GMEM_WHY_HOST_CONVERTING))
del W
assert len(_MESSAGES) == len(_VALUES) == lib.GMEM_WHY_COUNT - 1, "a GMEM_WHY_* without its message"


def message(gm, err) -> str:
    """The message text of ``err`` (a ``struct gmem_err``) about file ``gm`` (anything with ``size`` and
    ``folio_size``), from the values the C code recorded: what the FUSE extension's errors say."""
    names = _VALUES[err.why]
    values = dict(zip(names, (err.a, err.b)))
    return _MESSAGES[err.why](gm, values, err.offset)


_I64_MIN, _I64_MAX, _U64_END = -(1 << 63), (1 << 63) - 1, 1 << 64
_LOW = (1 << 40) - 1


def _clamp(value: int) -> int:
    """``value`` as an int64 that fails the same checks: in range it is itself; beyond, the extreme of its
    sign with its low 40 bits kept (alignment checks, which some calls make before range checks, see
    the same bits; any file ends far below 2^63 - 2^40)."""
    if _I64_MIN <= value <= _I64_MAX:
        return value
    return (_I64_MAX & ~_LOW) | (value & _LOW) if value > 0 else _I64_MIN | (value & _LOW)


def _saturate(value: int) -> int:
    """``value`` as an int64 for fallocate, whose range checks (sign, EFBIG) come before its alignment check."""
    return _I64_MAX if value > _I64_MAX else _I64_MIN if value < _I64_MIN else value


def _u64_or(value: int, other: int) -> int:
    """``value`` if it fits a uint64, else ``other`` (a value failing the same check)."""
    return value if 0 <= value < _U64_END else other


class _Closed:
    """What ``GuestMemfd._gm`` is after close(): passing it to a C function raises TypeError, reading a
    field AttributeError; neither touches freed memory."""

    def __repr__(self) -> str:
        return "<closed struct gmem>"


_CLOSED = _Closed()
_KINDS = {lib.GMEM_TO_PRIVATE: "to_private", lib.GMEM_PUNCH_HOLE: "punch_hole"}
_REVOKE_BATCH = 64
_new_err = ffi.new
_ERR = "struct gmem_err *"


class GuestMemfd:
    """One guest_memfd file. See the module docstring for the rules it mirrors and who frees what."""

    def __init__(self, size: int, flags: int = 0, *, backend: str | type[Backend] = "anon",
                 page_size: int | None = None, backend_options: dict | None = None,
                 progress: Progress | None = None, revoker: RevokeRanges | None = None, name: str = ""):
        backend_cls = load_backend(backend) if isinstance(backend, str) else backend
        page_size = self.check_create(size, flags, backend_cls, page_size)
        self.name = name
        self.size = size
        self.flags = flags
        self.folio_size = page_size
        self._npages = size >> PAGE_SHIFT
        self._revoker = revoker or (lambda ranges: None)
        self._pending: Transition | None = None
        self._gm = _CLOSED
        self.closed = False
        self.backend: Backend = backend_cls(size, page_size, progress=progress, **(backend_options or {}))
        # the instance's answer: a backend may decide per file whether it preallocates (sim does)
        gm = lib.gmem_new(size, flags, page_size, 1 if self.backend.preallocates else 0)
        if gm == ffi.NULL:
            self.backend.close()
            raise fail(errno.ENOMEM, "out of memory for the file's page maps")
        self._gm = gm
        self._put = weakref.finalize(self, lib.gmem_put, gm)  # drops the binding's reference once
        self.counters = Counters(ffi.addressof(gm[0], "counters"))
        # scratch for the C calls (the state lock, held around every call, guards them as it guards the
        # struct): an error record, a first-use span, the revocation cursor and batch
        self._err = ffi.new(_ERR)
        self._span = ffi.new("uint64_t[2]")
        self._revoke_buf = (ffi.new("uint64_t *"), ffi.new(f"uint64_t[{_REVOKE_BATCH}]"),
                            ffi.new(f"uint64_t[{_REVOKE_BATCH}]"))

    @staticmethod
    def check_create(size: int, flags: int, backend_cls, page_size: int | None) -> int:
        if page_size is None:
            page_size = backend_cls.page_sizes[0]
        e = _new_err(_ERR)
        c_size = size if 0 < size <= LOFF_MAX else -1  # past LOFF_MAX fails as a size <= 0 does
        rc = lib.gmem_check_create(c_size, _clamp(flags), _u64_or(page_size, 0), e)
        if rc < 0 and e.why not in (lib.GMEM_WHY_CREATE_HUGE_INIT_SHARED, lib.GMEM_WHY_CREATE_HUGE_SIZE):
            raise _error(None, e, size=size, flags=flags)
        # between the kernel's own checks and the huge-page ones: which page sizes the backend has
        if page_size not in backend_cls.page_sizes:
            offered = ", ".join(format_size(p) for p in backend_cls.page_sizes)
            raise fail(errno.EINVAL, f"backend {backend_cls.name!r} offers page sizes {offered}, "
                                     f"not {format_size(page_size)}")
        if rc < 0:
            raise _error(None, e, size=size, page_size=page_size)
        return page_size

    # --- lifetime -----------------------------------------------------------------------------------
    @property
    def address(self) -> int:
        """The address of this file's ``struct gmem``, for the FUSE extension (which takes its own
        reference with ``gmem_get`` if it keeps it beyond a call made under the file's state lock)."""
        return int(ffi.cast("uintptr_t", self._gm))

    def close(self) -> None:
        """Free the memory (the kernel does this when the inode is evicted) and drop this binding's
        reference to the ``struct gmem`` (freed now unless the FUSE side still holds one)."""
        if not self.closed:
            self.closed = True
            self.backend.close()
            copy = ffi.new("struct gmem_counters *")
            copy[0] = self._gm.counters
            self.counters = Counters(copy)
            self._gm = _CLOSED
            self._put()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _error(self, e, **values) -> GuestMemfdError:
        return _error(self, e, **values)

    # --- fallocate ----------------------------------------------------------------------------------
    def fallocate(self, mode: int, offset: int, length: int) -> None:
        """fallocate(2) as guest_memfd answers it: KEEP_SIZE allocates, KEEP_SIZE|PUNCH_HOLE punches."""
        transition = self.prepare_fallocate(mode, offset, length)
        self.run_transition(transition)

    def allocate(self, offset: int, length: int) -> None:
        self.fallocate(FALLOC_FL_KEEP_SIZE, offset, length)

    def punch_hole(self, offset: int, length: int) -> None:
        self.fallocate(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length)

    def prepare_fallocate(self, mode: int, offset: int, length: int) -> Transition | None:
        """Validate; allocate at once, or return the punch transition (None when there is nothing to do)."""
        self.check_fallocate(mode, offset, length)
        if not mode & FALLOC_FL_PUNCH_HOLE:
            self._allocate(offset, length)
            return None
        rc = lib.gmem_prepare_punch(self._gm, offset, length)
        if rc == 0:
            return None  # punching at or past EOF succeeds and does nothing
        if rc < 0:
            self._busy("punch_hole")
        rng = Range(offset, self._gm.pending_end)
        return self._begin("punch_hole", rng, lambda: self._punch(rng))

    def check_fallocate(self, mode: int, offset: int, length: int) -> None:
        e = self._err
        try:
            rc = lib.gmem_check_fallocate(self._gm, mode, offset, length, e)
        except OverflowError:
            rc = lib.gmem_check_fallocate(self._gm, _saturate(mode), _saturate(offset), _saturate(length), e)
        if rc:
            raise _error(self, e, mode=mode, offset=offset, length=length)

    def _allocate(self, offset: int, length: int) -> None:
        self.backend.allocate(offset, length)
        if lib.gmem_set_allocated(self._gm, offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT, 1) < 0:
            raise fail(errno.ENOMEM, "out of memory for the file's page maps")

    def _punch(self, rng: Range) -> None:
        self.backend.punch_hole(rng.start, rng.size)
        if lib.gmem_commit(self._gm) < 0:
            raise fail(errno.ENOMEM, "out of memory for the file's page maps")

    # --- attributes ---------------------------------------------------------------------------------
    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: Iterable[int] = ()) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on this file (v8): convert ``[offset, offset + size)``."""
        transition = self.prepare_set_memory_attributes(offset, size, attributes, flags, reserved)
        self.run_transition(transition)

    def prepare_set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                                      reserved: Iterable[int] = ()) -> Transition | None:
        """Validate and apply private→shared at once; return the shared→private transition, or None."""
        if isinstance(reserved, tuple) and not reserved:
            c_reserved, n = ffi.NULL, 0
        else:
            values = [_u64_or(r, 1) if r else 0 for r in reserved]
            c_reserved, n = ffi.new("uint64_t[]", values), len(values)
        e = self._err
        try:
            rc = lib.gmem_prepare_set_memory_attributes(self._gm, offset, size, attributes, flags, c_reserved, n, e)
        except OverflowError:
            # an offset or size no uint64 holds is an empty or wrapping range: (0, 0) fails that check
            c_offset, c_size = (offset, size) if 0 <= offset < _U64_END and 0 < size < _U64_END else (0, 0)
            rc = lib.gmem_prepare_set_memory_attributes(self._gm, c_offset, c_size, _u64_or(attributes, 1),
                                                        _u64_or(flags, 1), c_reserved, n, e)
        if rc == 0:
            return None
        if rc < 0:
            if e.why == lib.GMEM_WHY_BUSY:
                self._busy("to_private")
            raise _error(self, e, offset=offset, size=size, attributes=attributes, flags=flags)
        return self._begin("to_private", Range(offset, offset + size), self._commit)

    def _commit(self) -> None:
        if lib.gmem_commit(self._gm) < 0:
            raise fail(errno.ENOMEM, "out of memory for the file's page maps")

    def get_attributes(self, offset: int = 0, size: int | None = None) -> list[tuple[int, int, int]]:
        """``(offset, size, attributes)`` runs covering ``[offset, offset + size)``."""
        first, last = self._attribute_range(offset, size)
        starts, values = _arrays(self._gm.attrs, first, last)
        ends = np.append(starts[1:], last)
        return [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, v)
                for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist())]

    def attribute_runs(self, offset: int = 0, size: int | None = None) -> int:
        """How many runs :meth:`get_attributes` would return (O(chunks of the map), nothing copied)."""
        return lib.runmap_count_runs(self._gm.attrs, *self._attribute_range(offset, size))

    def attribute_arrays(self, offset: int = 0, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`get_attributes` as arrays, ~9 bytes a run instead of a Python tuple's ~150: the run
        boundaries in bytes (one more than the runs: the last is the range's end) and whether each run
        is private."""
        first, last = self._attribute_range(offset, size)
        starts, values = _arrays(self._gm.attrs, first, last)
        bounds = np.empty(len(starts) + 1, dtype=np.int64)
        bounds[:-1] = starts
        bounds[-1] = last
        return bounds << PAGE_SHIFT, (values & KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0

    def _check_range(self, check, offset: int, size: int, *more) -> None:
        """Run the core's check of ``[offset, offset + size)`` (``check(gm, offset, size, *more, err)``) and
        raise the error it reports. An offset or size no int64 holds is passed clamped (``_clamp``): it
        fails the same check, and the message still names the value given."""
        e = self._err
        try:
            rc = check(self._gm, offset, size, *more, e)
        except OverflowError:
            rc = check(self._gm, _clamp(offset), _clamp(size), *more, e)
        if rc:
            raise _error(self, e, offset=offset, size=size)

    def _attribute_range(self, offset: int, size: int | None) -> tuple[int, int]:
        size = self.size - offset if size is None else size
        self._check_range(lib.gmem_check_query, offset, size)
        return offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT

    def attribute_at(self, offset: int) -> int:
        page = offset >> PAGE_SHIFT
        if not 0 <= page < self._npages:
            raise ValueError(f"page range [{page}, {page + 1}) is outside [0, {self._npages})")
        return lib.runmap_value_at(self._gm.attrs, page)

    # --- pins ---------------------------------------------------------------------------------------
    def pin(self, offset: int, size: int) -> None:
        """An emulated long-term pin (a device's GUP pin): faults the range in (allocates, as a GUP pin
        does); shared pages only."""
        first, last = self.check_pin(offset, size)
        self._touch(first, last)
        if lib.gmem_pin(self._gm, offset, size) < 0:
            raise fail(errno.ENOMEM, "out of memory for the file's page maps")

    def check_pin(self, offset: int, size: int) -> tuple[int, int]:
        """The checks of :meth:`pin`, nothing changed: its page range, or the error it would fail with
        (so a caller can charge the memory a pin allocates after the kernel's checks and before it)."""
        self._check_range(lib.gmem_check_pin, offset, size)
        return offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT

    def unpin(self, offset: int, size: int) -> None:
        self._check_range(lib.gmem_unpin, offset, size)

    # --- host and guest accesses --------------------------------------------------------------------
    def host_read(self, offset: int, size: int) -> memoryview:
        """What a host mapping of ``mem`` reads. HostFault (→ SIGBUS) on a private page or past EOF."""
        self._check_host(offset, size, writing=False)
        self._use(offset, size)
        return self.backend.view(offset, size)

    def host_fill(self, offset: int, size: int) -> memoryview:
        """What the page cache of ``mem`` is filled with: ``host_read``'s checks and bytes, except that a
        page never allocated reads as zeros *without* being allocated.

        A fill is not a fault: readahead brings in pages around the faulting one that nobody touched, and
        the kernel's guest_memfd (which has no readahead) allocates only the folio a fault needs. Pages a
        mapping then writes are allocated when their write-back arrives (``host_write``); pages it only
        reads cost page cache and no backend memory.
        """
        self._check_host(offset, size, writing=False)
        first, last = offset >> PAGE_SHIFT, (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        allocated = self._gm.allocated
        if size == 0 or lib.runmap_is_uniform(allocated, first, last, 1):
            return self.backend.view(offset, size)
        if lib.runmap_is_uniform(allocated, first, last, 0):
            return zeros(size)
        out = bytearray(size)
        for s, e in self.allocated_runs(first, last):
            start, end = max(offset, s << PAGE_SHIFT), min(offset + size, e << PAGE_SHIFT)
            out[start - offset:end - offset] = self.backend.view(start, end - start)
        return memoryview(out)

    def any_allocated(self, first: int, last: int) -> bool:
        """Whether the backend holds memory for any page of ``[first, last)``."""
        self._check_pages(first, last)
        return not lib.runmap_is_uniform(self._gm.allocated, first, last, 0)

    def allocated_runs(self, first: int, last: int):
        """``(start, end)`` page runs of ``[first, last)`` the backend holds memory for."""
        self._check_pages(first, last)
        starts, values = _arrays(self._gm.allocated, first, last)
        ends = np.append(starts[1:], last)
        return [(s, e) for s, e, v in zip(starts.tolist(), ends.tolist(), values.tolist()) if v]

    def _check_pages(self, first: int, last: int) -> None:
        if not 0 <= first <= last <= self._npages:
            raise ValueError(f"page range [{first}, {last}) is outside [0, {self._npages})")

    def host_write(self, offset: int, data) -> None:
        """What a host mapping writes (or a dirty page written back while its range is being revoked)."""
        size = len(memoryview(data).cast("B"))
        self._check_host(offset, size, writing=True)
        self._use(offset, size)
        self.backend.write(offset, data)

    def _check_host(self, offset: int, size: int, writing: bool) -> None:
        self._check_range(lib.gmem_check_host, offset, size, writing)

    def guest_read(self, offset: int, size: int) -> memoryview:
        """A vCPU read: reaches private and shared pages alike."""
        self._check_guest(offset, size)
        self._use(offset, size)
        return self.backend.view(offset, size)

    def guest_write(self, offset: int, data) -> None:
        size = len(memoryview(data).cast("B"))
        self._check_guest(offset, size)
        self._use(offset, size)
        self.backend.write(offset, data)

    def _check_guest(self, offset: int, size: int) -> None:
        self._check_range(lib.gmem_check_guest, offset, size)

    def access(self, offset: int, size: int, *, host: bool, write: bool = False) -> None:
        """The rule check and first-use allocation of an access, without moving any bytes.

        Exactly what ``host_read``/``host_write`` (``host=True``, HostFault on a private page) or
        ``guest_read``/``guest_write`` do before they copy data. Replaying a trace at TiB scale goes
        through here so that its cost follows the number of accesses, not the bytes they cover.
        """
        if host:
            self._check_host(offset, size, writing=write)
        else:
            self._check_guest(offset, size)
        self._use(offset, size)

    def _use(self, offset: int, size: int) -> None:
        """First use of the bytes ``[offset, offset + size)`` allocates whole folios (a fresh page reads
        as zero: zeroed once, on first use); gmem.c says which, the backend allocates, then gmem.c
        records it. An empty access uses no page."""
        span = self._span
        if size > 0 and lib.gmem_touch_span(self._gm, offset, size, span, span + 1):
            first, last = span[0], span[1]
            self.backend.allocate(first << PAGE_SHIFT, (last - first) << PAGE_SHIFT)
            if lib.gmem_set_allocated(self._gm, first, last, 0) < 0:
                raise fail(errno.ENOMEM, "out of memory for the file's page maps")

    def _touch(self, first: int, last: int) -> None:
        """First use of pages ``[first, last)``."""
        if first < last:
            self._use(first << PAGE_SHIFT, (last - first) << PAGE_SHIFT)

    # --- transitions --------------------------------------------------------------------------------
    def _busy(self, kind: str):
        raise RuntimeError(f"{kind} started while {self._pending.kind if self._pending else 'another'} is "
                           "pending: callers serialise transitions (the kernel's invalidate lock)")

    def _begin(self, kind: str, rng: Range, apply) -> Transition:
        """The C side has made ``kind`` pending: wrap it, with the ranges it says to revoke."""
        transition = Transition(kind, rng, self._pending_revoke(rng), apply, self._end)
        self._pending = transition
        return transition

    def _pending_revoke(self, rng: Range) -> tuple[Range, ...]:
        """The ranges gmem.c says the pending transition (over ``rng``) must revoke."""
        cursor, starts, ends = self._revoke_buf
        cursor[0] = 0
        n = lib.gmem_pending_revoke(self._gm, cursor, starts, ends, _REVOKE_BATCH)
        if n == 1 and starts[0] == rng.start and ends[0] == rng.end:
            return (rng,)  # the whole range (all of it shared, or a punch): no second Range to build
        out = [Range(starts[i], ends[i]) for i in range(n)]
        while n == _REVOKE_BATCH:
            n = lib.gmem_pending_revoke(self._gm, cursor, starts, ends, _REVOKE_BATCH)
            out += [Range(starts[i], ends[i]) for i in range(n)]
        return tuple(out)

    def _end(self, transition: Transition) -> None:
        if self._pending is transition:
            self._pending = None
            if not self.closed:
                lib.gmem_abort(self._gm)  # a no-op after a commit, which ended it already

    def run_transition(self, transition: Transition | None, revoke: RevokeRanges | None = None, *,
                       lock: contextlib.AbstractContextManager = _NO_LOCK,
                       around_commit: Callable[[Transition, Callable[[], None]], None] | None = None) -> None:
        """Carry ``transition`` out: the one runner, for the FUSE frontend and in-process callers alike.

        1. Revoke its ranges with ``revoke`` (default: the revocation given at construction) *outside*
           ``lock``: a real revocation blocks on write-backs that need that lock to be served.
        2. If the revocation fails, abort under ``lock`` and re-raise: fail closed, nothing changed.
        3. Otherwise commit under ``lock`` and count the revocation (a commit that raises counts none).

        ``lock`` guards this file's state (the frontend's ``Entry.state``; none in-process).
        ``around_commit(transition, commit)``, if given, is called under ``lock`` instead of ``commit()``
        and must call ``commit`` once: the frontend wraps the commit in its own bookkeeping (the memory
        charge a punch gives back). The caller serialises transitions of the file (the kernel's
        invalidate lock). A ``None`` transition (nothing to do) does nothing.
        """
        if transition is None:
            return
        revoke = self._revoker if revoke is None else revoke
        try:
            if transition.revoke:
                revoke(transition.revoke)
        except BaseException:
            with lock:
                transition.abort()
            raise
        with lock:
            if around_commit is None:
                transition.commit()
            else:
                around_commit(transition, transition.commit)
            ranges = transition.revoke
            if ranges:
                lib.gmem_count_revocation(self._gm, ranges[0].size if len(ranges) == 1 else
                                          sum(r.size for r in ranges))

    @property
    def pending(self) -> Transition | None:
        return self._pending

    # --- the maps, as RunMap views (tests, figures) -------------------------------------------------
    @property
    def _attrs(self) -> RunMap:
        return RunMap.wrap(int(ffi.cast("uintptr_t", self._gm.attrs)), owner=self)

    @property
    def _pins(self) -> RunMap:
        return RunMap.wrap(int(ffi.cast("uintptr_t", self._gm.pins)), owner=self)

    @property
    def _allocated(self) -> RunMap:
        return RunMap.wrap(int(ffi.cast("uintptr_t", self._gm.allocated)), owner=self)

    # --- huge folios --------------------------------------------------------------------------------
    def folio_counts(self) -> tuple[int, int]:
        """``(whole, split)`` huge folios among the allocated ones (0, 0 for 4 KiB backends)."""
        out = ffi.new("int64_t[2]")
        lib.gmem_folio_counts(self._gm, out, out + 1)
        return out[0], out[1]

    def _split_folio_offsets(self) -> np.ndarray:
        step = self.folio_size >> PAGE_SHIFT
        if step == 1:
            return np.zeros(0, dtype=np.int64)
        starts, values = _arrays(self._gm.attrs, 0, self._npages)
        ends = np.append(starts[1:], self._npages)
        shared = values == SHARED
        blocks = [np.arange(s // step, -(-e // step), dtype=np.int64)
                  for s, e in zip(starts[shared].tolist(), ends[shared].tolist())]
        if not blocks:
            return np.zeros(0, dtype=np.int64)
        candidates = np.unique(np.concatenate(blocks))
        allocated = self._gm.allocated
        held = np.array([lib.runmap_value_at(allocated, int(b) * step) == 1 for b in candidates], dtype=bool)
        return candidates[held] * self.folio_size

    # --- statistics and snapshot --------------------------------------------------------------------
    def status(self) -> dict:
        """The content of the ``status`` file (design §2.2)."""
        page, gm, npages = PAGE_SIZE, self._gm, self._npages
        whole, split = self.folio_counts()
        private = lib.runmap_count(gm.attrs, PRIVATE, 0, npages) * page
        c = gm.counters
        return {
            "name": self.name,
            "size": self.size,
            "flags": self.flags,
            "flag_names": flag_names(self.flags),
            "backend": self.backend.name,
            "folio_size": self.folio_size,
            "page_size": self.folio_size,  # the same: the name of the create option it reports (§2.2)
            "allocated_bytes": lib.runmap_count(gm.allocated, 1, 0, npages) * page,
            "shared_bytes": self.size - private,
            "private_bytes": private,
            "pinned_bytes": (npages - lib.runmap_count(gm.pins, 0, 0, npages)) * page,
            "huge_folios": {"whole": whole, "split": split},
            "conversions": {"to_private": c.to_private, "to_shared": c.to_shared,
                            "noop": c.noop_conversions, "eagain": c.eagain},
            "revocations": c.revocations,
            "revoked_bytes": c.revoked_bytes,
            "punches": c.punches,
            "folio_splits": c.folio_splits,
            "folio_merges": c.folio_merges,
            "attribute_runs": lib.runmap_len(gm.attrs),
            "metadata_bytes": self.metadata_bytes(),
            "backend_bytes": self.backend.backend_bytes(),
            "backend_info": self.backend.info(),
        }

    def metadata_bytes(self) -> int:
        """Bytes of run storage for attributes, pins and allocation (the P5 metadata figure)."""
        gm = self._gm
        return (lib.runmap_metadata_bytes(gm.attrs) + lib.runmap_metadata_bytes(gm.pins)
                + lib.runmap_metadata_bytes(gm.allocated))

    def snapshot(self, memslot: tuple[int, int, int] | None = None) -> Snapshot:
        """A frozen copy of the state for exporters."""
        starts, values = _arrays(self._gm.attrs, 0, self._npages)
        pin_starts, pin_values = _arrays(self._gm.pins, 0, self._npages)
        pin_ends = np.append(pin_starts[1:], self._npages)
        pins = [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, v)
                for s, e, v in zip(pin_starts.tolist(), pin_ends.tolist(), pin_values.tolist()) if v > 0]
        return Snapshot.build(
            size=self.size, flags=self.flags, backend=self.backend.name, folio_size=self.folio_size,
            attr_starts=starts << PAGE_SHIFT, attr_private=values == PRIVATE,
            extents=[tuple(e) for e in self.backend.physical_extents()],
            split_folios=self._split_folio_offsets(), pins=pins, memslot=memslot,
            meta={"name": self.name},
        )


def _arrays(runmap, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """The runs of a C runmap intersecting pages ``[first, last)``: their starts (the first clipped to
    ``first``) and values, as int64 arrays, copied out in one call."""
    n = lib.runmap_count_runs(runmap, first, last)
    starts, values = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.int64)
    if n:
        cursor = ffi.new("uint64_t *", first)
        got = lib.runmap_runs(runmap, cursor, last, ffi.from_buffer("uint64_t[]", starts),
                              ffi.from_buffer("int64_t[]", values), n)
        assert got == n, (got, n)
    return starts.astype(np.int64), values


def _error(g, e, **values) -> GuestMemfdError:
    """The exception for a failed C call (``e``: its ``struct gmem_err``) about file ``g``, its message
    made from the caller's ``values`` where given, else from what the C code recorded."""
    why = e.why
    named = dict(zip(_VALUES[why], (e.a, e.b)))
    named.update((k, v) for k, v in values.items() if k in named)
    if why in _HOST_FAULTS:
        offset = values.get("offset", e.a)
        # where the access faults, from the caller's offset when it is the answer (it may fit no int64)
        at = offset if why == lib.GMEM_WHY_HOST_NO_MMAP else \
            max(offset, g.size) if why == lib.GMEM_WHY_HOST_PAST_EOF else e.offset
        return HostFault(at, _MESSAGES[why](g, named, at))
    if why == lib.GMEM_WHY_HOST_PUNCH_PENDING and g is not None:
        return TransitionPending(Range(e.a, e.b), g._pending)
    if why == lib.GMEM_WHY_PIN_NO_MMAP:
        return fail(e.err, _MESSAGES[why](g, named, e.offset), error_offset=values.get("offset", e.a))
    return fail(e.err, _MESSAGES[why](g, named, e.offset), error_offset=e.offset if e.has_offset else None)

