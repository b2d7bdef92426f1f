"""A run-length map from page index to a small integer, the way the kernel's maple tree stores attributes.

guest_memfd keeps one attribute per page, but stores it as ranges: adjacent pages with the same value are
one entry. A 1 TiB file has 2^28 pages, so a byte per page is out of the question; 100 000 runs must cost
well under 128 bytes each. Here a run is two machine words (its first page and its value), i.e. 16 bytes.

This module is the Python binding of the C map of ``ufsgmem/core/runmap.c`` (``runmap.h`` documents it):
the runs are kept in chunks of at most :attr:`RunMap.CHUNK_RUNS` runs with an index of every chunk's first
page, so a lookup is two binary searches and an update moves at most one chunk's runs; a change inside one
run (what a 4 KiB conversion, fill or write-back makes) is done in place. It is in C because every
conversion goes through it (the Python version cost 1-2 µs a call and more as the map grew), and it is the
one owner of the behaviour: the FUSE server's C side compiles the same source and is handed maps made here
by :attr:`RunMap.address`, or wraps its own with :meth:`RunMap.wrap`.

Per-value page counts are kept up to date by every update, so ``count(value)`` over the whole map (what
``GuestMemfd.status()`` asks for) is O(1); a ranged count walks the runs in the range.

Invariants (checked by :meth:`check`, i.e. ``runmap_check``):

* the first run starts at page 0, starts strictly increase across chunk edges, every start < ``npages``;
* no two adjacent runs have the same value, across chunk edges too, so the map is canonical: two maps
  describe the same page→value function iff :meth:`as_arrays` returns equal arrays;
* chunks hold between ``CHUNK_RUNS // 4`` and ``CHUNK_RUNS`` runs (a map with a single chunk may hold
  fewer); the chunk index, the run count and the per-value page counts agree with the chunks.

Errors: a range outside the map is refused with ValueError before C is called (so it changes nothing); an
update that cannot get memory raises MemoryError, and one that would take a value past int64 raises
OverflowError, both leaving the map unchanged. Nothing here locks: the owner of a map does. That is now a
matter of memory safety, not only of consistent answers: cffi releases the GIL for every C call, so two
threads using one map unlocked could read a chunk while the other frees it (the server's maps are all
used under ``Entry.state``). A :meth:`RunMap.runs` walk re-finds its place by page number for every
piece it reads, so a map changed between pieces is never read out of bounds, only seen half old, half new.

Caveat: :meth:`metadata_bytes` counts the run payload (16 bytes a run, what the ≤ 128 bytes per run budget
counts, and what the snapshot copies); :meth:`footprint_bytes` is everything the C side allocated for the
map (spare chunk capacity, the index, the counts). All ranges are half-open page-index ranges
``[start, end)``.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

from .core._core import ffi, lib

_EQ, _NE, _GT = lib.RUNMAP_EQ, lib.RUNMAP_NE, lib.RUNMAP_GT
_ENOMEM, _EOVERFLOW = -12, -75
# The calls on a conversion's path, looked up once: each attribute lookup is a step on every call.
_set, _add, _value_at, _is_uniform = lib.runmap_set, lib.runmap_add, lib.runmap_value_at, lib.runmap_is_uniform
_first, _count, _runs, _len = lib.runmap_first, lib.runmap_count, lib.runmap_runs, lib.runmap_len

#: Runs read out of C per call while iterating: big enough that the call is amortised, small enough that a
#: short walk does not allocate much (the first piece is smaller still: most walks cover a few runs).
_PIECE, _FIRST_PIECE = 4096, 32


def _failed(err: int, what: str):
    """The exception for a negative errno from a runmap update."""
    if err == _ENOMEM:
        return MemoryError(f"runmap: out of memory to {what}")
    if err == _EOVERFLOW:
        return OverflowError(f"runmap: {what} would take a value past 64 bits")
    return OSError(-err, f"runmap: {what} failed")


class RunMap:
    """Map every page index in ``[0, npages)`` to an integer, stored as merged runs (in C)."""

    __slots__ = ("_map", "_owner", "npages")

    #: Most runs in one chunk. A chunk's memmove stays within 8 KiB, and the index ~1/300 of the runs.
    #: Tests override it in a subclass to exercise chunk edges with a few pages.
    CHUNK_RUNS = lib.RUNMAP_CHUNK_RUNS

    def __init__(self, npages: int, value: int = 0):
        if npages <= 0:
            raise ValueError(f"a run map needs at least one page, not {npages}")
        if self.CHUNK_RUNS < 4:
            raise ValueError(f"a chunk must hold at least 4 runs, not {self.CHUNK_RUNS}")
        raw = lib.runmap_new_chunked(npages, value, self.CHUNK_RUNS)
        if raw == ffi.NULL:
            raise MemoryError(f"runmap: out of memory for a map of {npages} pages")
        self._map = ffi.gc(raw, lib.runmap_free)  # freed with the last reference to this object
        self._owner = None
        self.npages = npages

    @classmethod
    def wrap(cls, address: int, owner: object) -> RunMap:
        """A map owned elsewhere (e.g. by the FUSE server's C side), at ``address``: this object never frees
        it, and keeps ``owner`` (whatever frees it) alive as long as it lives."""
        self = cls.__new__(cls)
        self._map = ffi.cast("struct runmap *", address)
        self._owner = owner
        self.npages = lib.runmap_npages(self._map)
        return self

    @property
    def address(self) -> int:
        """The address of the C ``struct runmap``, to hand to the other extension (same source, same layout)."""
        return int(ffi.cast("uintptr_t", self._map))

    # --- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of runs."""
        return _len(self._map)

    def value_at(self, page: int) -> int:
        if not 0 <= page < self.npages:
            raise ValueError(f"page range [{page}, {page + 1}) is outside [0, {self.npages})")
        return _value_at(self._map, page)

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Yield ``(start, end, value)`` for the runs intersecting ``[start, end)``, clipped to it.

        The runs are read out of C a piece at a time, so a long walk never holds the whole map twice; the
        map must not change while the generator is being consumed (the same holds of any iterator)."""
        end = self.npages if end is None else end
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        return self._runs(start, end)

    def _runs(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        cursor = ffi.new("uint64_t *", start)
        size = _FIRST_PIECE
        starts, values = ffi.new("uint64_t[]", size), ffi.new("int64_t[]", size)
        unpack, m = ffi.unpack, self._map
        while cursor[0] < end:
            n = _runs(m, cursor, end, starts, values, size)
            ss, vs = unpack(starts, n), unpack(values, n)
            ss.append(cursor[0])
            yield from zip(ss, ss[1:], vs)
            if size == _FIRST_PIECE and cursor[0] < end:
                size = _PIECE
                starts, values = ffi.new("uint64_t[]", size), ffi.new("int64_t[]", size)

    def is_uniform(self, start: int, end: int, value: int) -> bool:
        """True when every page in ``[start, end)`` maps to ``value`` (vacuously true when empty)."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        return bool(_is_uniform(self._map, start, end, value))

    def first(self, start: int, end: int, predicate) -> int | None:
        """The first page in ``[start, end)`` whose value satisfies ``predicate``, or None. For a plain
        comparison :meth:`first_eq`, :meth:`first_ne` and :meth:`first_gt` do the walk in C."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        if start == end:
            return None
        if predicate(_value_at(self._map, start)):  # the common case, without the generator
            return start
        for run_start, _, value in self._runs(start, end):
            if predicate(value):
                return run_start
        return None

    def first_eq(self, start: int, end: int, value: int) -> int | None:
        """The first page in ``[start, end)`` mapping to ``value``, or None."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        page = _first(self._map, start, end, _EQ, value)
        return None if page < 0 else page

    def first_ne(self, start: int, end: int, value: int) -> int | None:
        """The first page in ``[start, end)`` not mapping to ``value``, or None."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        page = _first(self._map, start, end, _NE, value)
        return None if page < 0 else page

    def first_gt(self, start: int, end: int, value: int) -> int | None:
        """The first page in ``[start, end)`` mapping to more than ``value``, or None."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        page = _first(self._map, start, end, _GT, value)
        return None if page < 0 else page

    def count(self, value: int, start: int = 0, end: int | None = None) -> int:
        """How many pages of ``[start, end)`` map to ``value`` (O(1) over the whole map)."""
        end = self.npages if end is None else end
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        return _count(self._map, value, start, end)

    def count_runs(self, start: int = 0, end: int | None = None) -> int:
        """How many runs intersect ``[start, end)`` (O(chunks in the range))."""
        end = self.npages if end is None else end
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        return lib.runmap_count_runs(self._map, start, end)

    def _copy(self, start: int, end: int, n: int) -> tuple[array, array]:
        """The ``n`` runs intersecting ``[start, end)`` copied straight into two new ``array('q')``."""
        starts, values = array("q", bytes(8 * n)), array("q", bytes(8 * n))
        if n:
            cursor = ffi.new("uint64_t *", start)
            got = _runs(self._map, cursor, end, ffi.from_buffer("uint64_t[]", starts),
                        ffi.from_buffer("int64_t[]", values), n)
            assert got == n and cursor[0] == end, (got, n)
        return starts, values

    def as_arrays(self) -> tuple[array, array]:
        """Copies of the run starts and values, all chunks concatenated (for snapshots)."""
        return self._copy(0, self.npages, _len(self._map))

    def arrays(self, start: int = 0, end: int | None = None) -> tuple[array, array]:
        """Copies of the starts and values of the runs intersecting ``[start, end)``, the first start clipped
        to ``start``: :meth:`runs` without a tuple per run (for long results)."""
        end = self.npages if end is None else end
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        return self._copy(start, end, lib.runmap_count_runs(self._map, start, end))

    def metadata_bytes(self) -> int:
        """Bytes of run payload: two 8-byte words a run (what the ≤ 128 bytes per run target counts)."""
        return lib.runmap_metadata_bytes(self._map)

    def footprint_bytes(self) -> int:
        """Everything allocated for this map: chunk arrays with spare capacity, the chunk index and the
        count table (O(chunks); for reports, not hot paths)."""
        return lib.runmap_footprint_bytes(self._map)

    # --- updates ----------------------------------------------------------------------------------
    def set(self, start: int, end: int, value: int) -> None:
        """Map every page in ``[start, end)`` to ``value``."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        err = _set(self._map, start, end, value)
        if err:
            raise _failed(err, f"set [{start}, {end}) to {value}")

    def add(self, start: int, end: int, delta: int) -> None:
        """Add ``delta`` to the value of every page in ``[start, end)`` (pin counts)."""
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")
        err = _add(self._map, start, end, delta)
        if err:
            raise _failed(err, f"add {delta} to [{start}, {end})")

    # --- invariants ------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the invariants (for tests)."""
        code = lib.runmap_check(self._map)
        if code:
            raise AssertionError(f"runmap_check {code}: {ffi.string(lib.runmap_check_message(code)).decode()}")

    def _internals(self) -> tuple[list[memoryview], list[memoryview], memoryview, memoryview]:
        """For tests that break an invariant on purpose: writable views of each chunk's starts and values,
        of the chunk index, and of the counts as flat (value, pages) pairs. Valid until the map changes."""
        starts, values = [], []
        n, first = ffi.new("uint32_t *"), ffi.new("uint64_t **")
        nchunks = lib.runmap_chunks(self._map)
        for c in range(nchunks):
            runs = lib.runmap_chunk(self._map, c, n, first)
            flat = memoryview(ffi.buffer(runs, 16 * n[0])).cast("q")
            starts.append(flat[0::2])
            values.append(flat[1::2])
        lib.runmap_chunk(self._map, 0, n, first)
        index = memoryview(ffi.buffer(first[0], 8 * nchunks)).cast("q")
        counts = lib.runmap_counts(self._map, n)
        return starts, values, index, memoryview(ffi.buffer(counts, 16 * n[0])).cast("q")
