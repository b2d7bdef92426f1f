"""TEMPORARY: the pure-Python guest_memfd core as it was before it was compiled (ufsgmem/core/gmem.c), kept
only while the model tests run against both cores; deleted once they agree.

The guest_memfd core: one file's semantics, in-process, with no knowledge of FUSE.

This mirrors ``virt/kvm/guest_memfd.c`` (mainline 6.18) plus the in-place conversion series v8 and the
HugeTLB work, rule for rule and errno for errno (the facts, with sources: design §7, ``docs/design.md``):

* creation: flags MMAP and INIT_SHARED only (other bits EINVAL); size > 0 and page aligned (EINVAL);
  the HugeTLB choice is a backend page size above 4 KiB, which forbids INIT_SHARED and needs the size to
  be a multiple of the huge page (EINVAL). The size never changes.
* fallocate: the VFS checks, then KEEP_SIZE required and no other mode bit (EOPNOTSUPP), alignment to
  the folio size (EINVAL), allocation past EOF (EINVAL), punch past EOF a no-op success.
* attributes: one per page, stored as runs (:class:`~ufsgmem.runmap.RunMap`); KVM_SET_MEMORY_ATTRIBUTES2
  validation in v8's order, all-or-nothing, a no-op returns at once, content preserved both ways.
* pins: emulated long-term pins; shared→private over a pinned page is EAGAIN with ``error_offset``.
* huge folios: an allocated folio is *split* while any of its pages is shared and *whole* otherwise.
  This is derived from the attribute and allocation maps rather than stored, so it can never disagree
  with them; split/merge events are counted as conversions change it.

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
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ufsgmem.address import Range, U64_MAX, format_size, is_aligned
from ufsgmem.backend import Backend, Progress
from ufsgmem.errors import GuestMemfdError, fail
from ufsgmem.plugins import load_backend
from ufsgmem.runmap import RunMap
from ufsgmem.snapshot import Snapshot
from ufsgmem.uapi import (
    FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_WRITE_ZEROES, FALLOC_FL_ZERO_RANGE, GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_SUPPORTED_FLAGS, KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_MEMORY_ATTRIBUTES_SUPPORTED, PAGE_SHIFT, PAGE_SIZE,
)

SHARED = 0
PRIVATE = KVM_MEMORY_ATTRIBUTE_PRIVATE
LOFF_MAX = (1 << 63) - 1

#: The mode words vfs_fallocate lets through to the filesystem (measured on Linux 6.18 by sweeping every
#: mode below 0x200 with an offset + length past LOFF_MAX: exactly these give EFBIG, every other mode
#: EOPNOTSUPP). Modes are exclusive; only allocate, zero-range and unshare may add KEEP_SIZE, and
#: punch-hole must. guest_memfd then refuses all but KEEP_SIZE and KEEP_SIZE|PUNCH_HOLE itself.
VFS_FALLOCATE_MODES = frozenset({
    0, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_COLLAPSE_RANGE,
    FALLOC_FL_ZERO_RANGE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_INSERT_RANGE,
    FALLOC_FL_UNSHARE_RANGE, FALLOC_FL_UNSHARE_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_WRITE_ZEROES,
})

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
    """A host read hit a range whose punch-hole is in flight; retry once the transition commits."""

    def __init__(self, transition: "Transition"):
        super().__init__(errno.EAGAIN, f"{transition.kind} of {transition.range} in progress")
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


@dataclass
class Counters:
    to_private: int = 0
    to_shared: int = 0
    noop_conversions: int = 0
    revocations: int = 0
    revoked_bytes: int = 0
    punches: int = 0
    allocations: int = 0
    folio_splits: int = 0
    folio_merges: int = 0
    eagain: int = 0


class GuestMemfd:
    """One guest_memfd file. See the module docstring for the rules it mirrors."""

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
        self._attrs = RunMap(self._npages, SHARED if flags & GUEST_MEMFD_FLAG_INIT_SHARED else PRIVATE)
        self._pins = RunMap(self._npages, 0)
        self._allocated = RunMap(self._npages, 0)
        self._revoker = revoker or (lambda ranges: None)
        self._pending: Transition | None = None
        self.counters = Counters()
        self.backend: Backend = backend_cls(size, page_size, progress=progress, **(backend_options or {}))
        if self.backend.preallocates:  # the instance's answer: a backend may decide per file (sim does)
            self._allocated.set(0, self._npages, 1)
        self._whole = self._whole_folios()  # kept up to date by _tracked: status() stays O(1)
        self.closed = False

    @staticmethod
    def check_create(size: int, flags: int, backend_cls, page_size: int | None) -> int:
        if flags < 0 or flags & ~GUEST_MEMFD_SUPPORTED_FLAGS:
            raise fail(errno.EINVAL, f"unknown flag bits {flags & ~GUEST_MEMFD_SUPPORTED_FLAGS:#x} "
                                     f"(supported: mmap=0x1, init_shared=0x2)")
        if size <= 0 or size > LOFF_MAX:
            raise fail(errno.EINVAL, f"size {size} must be positive")
        if not is_aligned(size):
            raise fail(errno.EINVAL, f"size {size:#x} is not a multiple of the page size {PAGE_SIZE:#x}")
        if page_size is None:
            page_size = backend_cls.page_sizes[0]
        if page_size not in backend_cls.page_sizes:
            offered = ", ".join(format_size(p) for p in backend_cls.page_sizes)
            raise fail(errno.EINVAL, f"backend {backend_cls.name!r} offers page sizes {offered}, "
                                     f"not {format_size(page_size)}")
        if page_size > PAGE_SIZE:
            if flags & GUEST_MEMFD_FLAG_INIT_SHARED:
                raise fail(errno.EINVAL, "huge-page files start private: init_shared is not allowed "
                                         f"with page size {format_size(page_size)}")
            if size % page_size:
                raise fail(errno.EINVAL, f"size {format_size(size)} is not a multiple of the "
                                         f"{format_size(page_size)} huge page")
        return page_size

    # --- lifetime -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the memory (the kernel does this when the inode is evicted)."""
        if not self.closed:
            self.closed = True
            self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        end = min(offset + length, self.size)
        if offset >= end:
            return None  # punching at or past EOF succeeds and does nothing
        rng = Range(offset, end)
        return self._begin("punch_hole", rng, (rng,), lambda: self._punch(rng))

    def check_fallocate(self, mode: int, offset: int, length: int) -> None:
        # The VFS's own checks come first (vfs_fallocate), then guest_memfd's (kvm_gmem_fallocate).
        if offset < 0 or length <= 0:
            raise fail(errno.EINVAL, f"offset {offset} must be >= 0 and length {length} > 0")
        if mode not in VFS_FALLOCATE_MODES:
            raise fail(errno.EOPNOTSUPP, f"mode {mode:#x} is not a fallocate mode the VFS accepts"
                       + (" (punch_hole needs keep_size)" if mode == FALLOC_FL_PUNCH_HOLE else ""))
        if offset + length > LOFF_MAX:
            raise fail(errno.EFBIG, f"offset + length {offset + length:#x} exceeds the largest file offset")
        if not mode & FALLOC_FL_KEEP_SIZE:
            raise fail(errno.EOPNOTSUPP, f"mode {mode:#x}: guest_memfd needs FALLOC_FL_KEEP_SIZE")
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
            raise fail(errno.EOPNOTSUPP, f"mode {mode:#x}: only keep_size and punch_hole are supported")
        if not (is_aligned(offset, self.folio_size) and is_aligned(length, self.folio_size)):
            raise fail(errno.EINVAL, f"offset {offset:#x} and length {length:#x} must be multiples of "
                                     f"the page size {format_size(self.folio_size)}")
        if not mode & FALLOC_FL_PUNCH_HOLE and offset + length > self.size:
            raise fail(errno.EINVAL, f"cannot allocate [{offset:#x}, {offset + length:#x}) past the end "
                                     f"of a {format_size(self.size)} file")

    def _allocate(self, offset: int, length: int) -> None:
        self.backend.allocate(offset, length)
        first, last = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        self._tracked(first, last, lambda: self._allocated.set(first, last, 1))
        self.counters.allocations += 1

    def _punch(self, rng: Range) -> None:
        self.backend.punch_hole(rng.start, rng.size)
        first, last = rng.start >> PAGE_SHIFT, rng.end >> PAGE_SHIFT
        self._tracked(first, last, lambda: self._allocated.set(first, last, 0))
        self.counters.punches += 1

    # --- attributes ---------------------------------------------------------------------------------
    def set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                              reserved: Iterable[int] = ()) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES2 on this file (v8): convert ``[offset, offset + size)``."""
        transition = self.prepare_set_memory_attributes(offset, size, attributes, flags, reserved)
        self.run_transition(transition)

    def prepare_set_memory_attributes(self, offset: int, size: int, attributes: int, flags: int = 0,
                                      reserved: Iterable[int] = ()) -> Transition | None:
        """Validate and apply private→shared at once; return the shared→private transition, or None."""
        self._check_attributes(offset, size, attributes, flags, reserved)
        first, last = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        if self._attrs.is_uniform(first, last, attributes):
            self.counters.noop_conversions += 1
            return None  # already so: no unmap, no reference check (a pinned no-op succeeds)
        if attributes == SHARED:
            self._flip(first, last, SHARED)
            return None
        pinned = None if self._pins.count(0) == self._npages else self._pins.first(first, last, lambda n: n > 0)
        if pinned is not None:
            self.counters.eagain += 1
            raise fail(errno.EAGAIN, f"page {pinned << PAGE_SHIFT:#x} is pinned; unpin it and retry",
                       error_offset=pinned << PAGE_SHIFT)
        if self._attrs.is_uniform(first, last, SHARED):
            revoke = (Range(offset, offset + size),)
        else:
            revoke = tuple(Range(s << PAGE_SHIFT, e << PAGE_SHIFT)
                           for s, e, v in self._attrs.runs(first, last) if v == SHARED)
        return self._begin("to_private", Range(offset, offset + size), revoke,
                           lambda: self._flip(first, last, PRIVATE))

    def _check_attributes(self, offset, size, attributes, flags, reserved) -> None:
        # v8 order; the first failure wins. (EFAULT, copying the struct in, belongs to the frontend.)
        if flags != 0:
            raise fail(errno.EINVAL, f"flags {flags:#x} must be 0", error_offset=None)
        if any(reserved):
            raise fail(errno.EINVAL, "reserved fields must be 0")
        if attributes < 0 or attributes & ~KVM_MEMORY_ATTRIBUTES_SUPPORTED:
            raise fail(errno.EINVAL, f"attributes {attributes:#x}: only private (0x8) or shared (0) exist")
        if size <= 0 or offset < 0 or offset + size > U64_MAX:
            raise fail(errno.EINVAL, f"size {size:#x} at offset {offset:#x}: empty or wrapping range")
        if not (is_aligned(offset) and is_aligned(size)):
            raise fail(errno.EINVAL, f"offset {offset:#x} and size {size:#x} must be page aligned")
        if offset >= self.size or offset + size > self.size:
            raise fail(errno.EINVAL, f"range [{offset:#x}, {offset + size:#x}) runs past the end of a "
                                     f"{format_size(self.size)} file")

    def _flip(self, first: int, last: int, attributes: int) -> None:
        merged = self._tracked(first, last, lambda: self._attrs.set(first, last, attributes))
        if attributes == SHARED:
            self.counters.to_shared += 1
            self.counters.folio_splits -= merged
        else:
            self.counters.to_private += 1
            self.counters.folio_merges += merged

    def get_attributes(self, offset: int = 0, size: int | None = None) -> list[tuple[int, int, int]]:
        """``(offset, size, attributes)`` runs covering ``[offset, offset + size)``."""
        first, last = self._attribute_range(offset, size)
        return [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, v) for s, e, v in self._attrs.runs(first, last)]

    def attribute_runs(self, offset: int = 0, size: int | None = None) -> int:
        """How many runs :meth:`get_attributes` would return (O(chunks of the map), nothing copied)."""
        return self._attrs.count_runs(*self._attribute_range(offset, size))

    def attribute_arrays(self, offset: int = 0, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`get_attributes` as arrays, ~9 bytes a run instead of a Python tuple's ~150: the run
        boundaries in bytes (one more than the runs: the last is the range's end) and whether each run
        is private."""
        first, last = self._attribute_range(offset, size)
        starts, values = self._attrs.arrays(first, last)
        bounds = np.empty(len(starts) + 1, dtype=np.int64)
        bounds[:-1] = np.frombuffer(starts, dtype=np.int64)
        bounds[-1] = last
        return bounds << PAGE_SHIFT, (np.frombuffer(values, dtype=np.int64) & KVM_MEMORY_ATTRIBUTE_PRIVATE) != 0

    def _attribute_range(self, offset: int, size: int | None) -> tuple[int, int]:
        size = self.size - offset if size is None else size
        if not (is_aligned(offset) and is_aligned(size)):
            raise fail(errno.EINVAL, f"offset {offset:#x} and size {size:#x} must be page aligned")
        if offset < 0 or size <= 0 or offset + size > self.size:
            raise fail(errno.EINVAL, f"range [{offset:#x}, {offset + size:#x}) is empty or runs past the end "
                                     f"of the {format_size(self.size)} file")
        return offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT

    def attribute_at(self, offset: int) -> int:
        return self._attrs.value_at(offset >> PAGE_SHIFT)

    # --- pins ---------------------------------------------------------------------------------------
    def pin(self, offset: int, size: int) -> None:
        """An emulated long-term pin (a device's GUP pin): faults the range in (allocates, as a GUP pin
        does); shared pages only."""
        first, last = self.check_pin(offset, size)
        self._touch(first, last)
        self._pins.add(first, last, 1)

    def check_pin(self, offset: int, size: int) -> tuple[int, int]:
        """The checks of :meth:`pin`, nothing changed: its page range, or the error it would fail with
        (so a caller can charge the memory a pin allocates after the kernel's checks and before it)."""
        first, last = self._check_pin_range(offset, size)
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:  # GUP needs a host mapping, and this file has none
            raise fail(errno.EFAULT, "the file was created without mmap: there is no host mapping to pin",
                       error_offset=offset)
        private = self._attrs.first(first, last, lambda v: v == PRIVATE)
        if private is not None:
            raise fail(errno.EFAULT, f"page {private << PAGE_SHIFT:#x} is private: a pin needs shared "
                                     "memory the host can reach", error_offset=private << PAGE_SHIFT)
        return first, last

    def unpin(self, offset: int, size: int) -> None:
        first, last = self._check_pin_range(offset, size)
        unpinned = self._pins.first(first, last, lambda count: count == 0)
        if unpinned is not None:
            raise fail(errno.EINVAL, f"page {unpinned << PAGE_SHIFT:#x} is not pinned")
        self._pins.add(first, last, -1)

    def _check_pin_range(self, offset: int, size: int) -> tuple[int, int]:
        if offset < 0 or size <= 0 or not (is_aligned(offset) and is_aligned(size)):
            raise fail(errno.EINVAL, f"offset {offset:#x} and size {size:#x} must be page aligned, size > 0")
        if offset + size > self.size:
            raise fail(errno.EINVAL, f"range [{offset:#x}, {offset + size:#x}) runs past EOF")
        return offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT

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
        if size == 0 or self._allocated.is_uniform(first, last, 1):
            return self.backend.view(offset, size)
        if self._allocated.is_uniform(first, last, 0):
            return zeros(size)
        out = bytearray(size)
        for s, e, v in self._allocated.runs(first, last):
            if v:
                start, end = max(offset, s << PAGE_SHIFT), min(offset + size, e << PAGE_SHIFT)
                out[start - offset:end - offset] = self.backend.view(start, end - start)
        return memoryview(out)

    def any_allocated(self, first: int, last: int) -> bool:
        """Whether the backend holds memory for any page of ``[first, last)``."""
        return not self._allocated.is_uniform(first, last, 0)

    def allocated_runs(self, first: int, last: int):
        """``(start, end)`` page runs of ``[first, last)`` the backend holds memory for."""
        return [(s, e) for s, e, v in self._allocated.runs(first, last) if v]

    def host_write(self, offset: int, data) -> None:
        """What a host mapping writes (or a dirty page written back while its range is being revoked)."""
        size = len(memoryview(data).cast("B"))
        self._check_host(offset, size, writing=True)
        self._use(offset, size)
        self.backend.write(offset, data)

    def _check_host(self, offset: int, size: int, writing: bool) -> None:
        if not self.flags & GUEST_MEMFD_FLAG_MMAP:
            raise HostFault(offset, "the file was created without mmap")
        if offset < 0 or size < 0 or offset + size > self.size:
            # the access faults at its first bad byte: a private page inside the file comes before EOF
            private = (self._attrs.first(offset >> PAGE_SHIFT, self._npages, lambda v: v == PRIVATE)
                       if 0 <= offset < self.size else None)
            if private is not None:
                raise HostFault(max(offset, private << PAGE_SHIFT), "the page is private")
            raise HostFault(max(offset, self.size), f"past the end of the {format_size(self.size)} file")
        if size == 0:
            return
        first, last = offset >> PAGE_SHIFT, (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
        pending = self._pending
        if pending is not None and pending.range.intersect(Range(first << PAGE_SHIFT, last << PAGE_SHIFT)):
            if pending.kind == "to_private":
                if writing:
                    return  # dirty write-back during revocation: must be kept (design §3)
                raise HostFault(max(offset, pending.range.start), "the page is being converted to private")
            if not writing:
                raise TransitionPending(pending)
        private = self._attrs.first(first, last, lambda v: v == PRIVATE)
        if private is not None:
            raise HostFault(max(offset, private << PAGE_SHIFT), "the page is private")

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
        if offset < 0 or size < 0 or offset + size > self.size:
            raise fail(errno.EINVAL, f"guest access [{offset:#x}, {offset + size:#x}) outside the "
                                     f"{format_size(self.size)} file")

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
        """First use of the bytes ``[offset, offset + size)``; an empty access uses no page."""
        if size > 0:
            self._touch(offset >> PAGE_SHIFT, (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT)

    def _touch(self, first: int, last: int) -> None:
        """First use allocates (a fresh page reads as zero: zeroed once, on first use)."""
        if first >= last or self._allocated.is_uniform(first, last, 1):
            return
        step = self.folio_size >> PAGE_SHIFT
        first, last = first - first % step, min(-(-last // step) * step, self._npages)
        self.backend.allocate(first << PAGE_SHIFT, (last - first) << PAGE_SHIFT)
        self._tracked(first, last, lambda: self._allocated.set(first, last, 1))

    # --- transitions --------------------------------------------------------------------------------
    def _begin(self, kind: str, rng: Range, revoke: tuple[Range, ...], apply) -> Transition:
        if self._pending is not None:
            raise RuntimeError(f"{kind} started while {self._pending.kind} is pending: callers serialise "
                               "transitions (the kernel's invalidate lock)")
        transition = Transition(kind, rng, revoke, apply, self._end)
        self._pending = transition
        return transition

    def _end(self, transition: Transition) -> None:
        if self._pending is transition:
            self._pending = None

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
            if transition.revoke:
                self.counters.revocations += 1
                self.counters.revoked_bytes += sum(r.size for r in transition.revoke)

    @property
    def pending(self) -> Transition | None:
        return self._pending

    # --- huge folios --------------------------------------------------------------------------------
    def _whole_folios(self, first: int = 0, last: int | None = None) -> int:
        """Allocated folios inside the folio-aligned span of page range ``[first, last)`` with no shared page."""
        step = self.folio_size >> PAGE_SHIFT
        if step == 1:
            return 0
        last = self._npages if last is None else last
        first, last = first - first % step, min(-(-last // step) * step, self._npages)
        whole = 0
        for s, e, v in self._attrs.runs(first, last):
            if v != PRIVATE:
                continue
            b0, b1 = -(-s // step) * step, e - e % step
            if b0 < b1:  # allocation is folio-granular, so allocated pages / step counts folios
                whole += self._allocated.count(1, b0, b1) // step
        return whole

    def _tracked(self, first: int, last: int, change: Callable[[], None]) -> int:
        """Run ``change`` (an attribute or allocation update of pages ``[first, last)``) and keep the
        whole-folio count right; return how many folios became whole (negative: were split or freed).

        Only folios overlapping the range can change, so this costs what the range costs, not the file.
        """
        before = self._whole_folios(first, last)
        change()
        delta = self._whole_folios(first, last) - before
        self._whole += delta
        return delta

    def folio_counts(self) -> tuple[int, int]:
        """``(whole, split)`` huge folios among the allocated ones (0, 0 for 4 KiB backends)."""
        step = self.folio_size >> PAGE_SHIFT
        if step == 1:
            return 0, 0
        allocated = self._allocated.count(1) // step
        return self._whole, allocated - self._whole

    def _split_folio_offsets(self) -> np.ndarray:
        step = self.folio_size >> PAGE_SHIFT
        if step == 1:
            return np.zeros(0, dtype=np.int64)
        blocks: list[np.ndarray] = []
        for s, e, v in self._attrs.runs():
            if v == SHARED:
                blocks.append(np.arange(s // step, -(-e // step), dtype=np.int64))
        if not blocks:
            return np.zeros(0, dtype=np.int64)
        candidates = np.unique(np.concatenate(blocks))
        allocated = np.array([self._allocated.value_at(int(b) * step) for b in candidates], dtype=bool) \
            if len(self._allocated) > 1 else np.full(len(candidates), self._allocated.value_at(0) == 1)
        return candidates[allocated] * self.folio_size

    # --- statistics and snapshot --------------------------------------------------------------------
    def status(self) -> dict:
        """The content of the ``status`` file (design §2.2)."""
        page = PAGE_SIZE
        whole, split = self.folio_counts()
        private = self._attrs.count(PRIVATE) * page
        return {
            "name": self.name,
            "size": self.size,
            "flags": self.flags,
            "flag_names": flag_names(self.flags),
            "backend": self.backend.name,
            "folio_size": self.folio_size,
            "page_size": self.folio_size,  # the same: the name of the create option it reports (§2.2)
            "allocated_bytes": self._allocated.count(1) * page,
            "shared_bytes": self.size - private,
            "private_bytes": private,
            "pinned_bytes": (self._npages - self._pins.count(0)) * page,
            "huge_folios": {"whole": whole, "split": split},
            "conversions": {"to_private": self.counters.to_private, "to_shared": self.counters.to_shared,
                            "noop": self.counters.noop_conversions, "eagain": self.counters.eagain},
            "revocations": self.counters.revocations,
            "revoked_bytes": self.counters.revoked_bytes,
            "punches": self.counters.punches,
            "folio_splits": self.counters.folio_splits,
            "folio_merges": self.counters.folio_merges,
            "attribute_runs": len(self._attrs),
            "metadata_bytes": self.metadata_bytes(),
            "backend_bytes": self.backend.backend_bytes(),
            "backend_info": self.backend.info(),
        }

    def metadata_bytes(self) -> int:
        """Bytes of run storage for attributes, pins and allocation (the P5 metadata figure)."""
        return self._attrs.metadata_bytes() + self._pins.metadata_bytes() + self._allocated.metadata_bytes()

    def snapshot(self, memslot: tuple[int, int, int] | None = None) -> Snapshot:
        """A frozen copy of the state for exporters."""
        starts, values = self._attrs.as_arrays()
        pins = [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT, v) for s, e, v in self._pins.runs() if v > 0]
        return Snapshot.build(
            size=self.size, flags=self.flags, backend=self.backend.name, folio_size=self.folio_size,
            attr_starts=np.frombuffer(starts, dtype=np.int64) << PAGE_SHIFT,
            attr_private=np.frombuffer(values, dtype=np.int64) == PRIVATE,
            extents=[tuple(e) for e in self.backend.physical_extents()],
            split_folios=self._split_folio_offsets(), pins=pins, memslot=memslot,
            meta={"name": self.name},
        )
