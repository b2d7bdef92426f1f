"""A run-length map from page index to a small integer, the way the kernel's maple tree stores attributes.

guest_memfd keeps one attribute per page, but stores it as ranges: adjacent pages with the same value are
one entry. A 1 TiB file has 2^28 pages, so a byte per page is out of the question; 100 000 runs must cost
well under 128 bytes each. Here a run is two machine words in ``array('q')`` buffers (``_starts`` and
``_values``), i.e. 16 bytes, and ``bisect`` finds the run holding a page in O(log runs).

Invariants (checked by :meth:`check`):

* ``_starts[0] == 0`` and ``_starts`` is strictly increasing, every start < ``npages``;
* no two adjacent runs have the same value (runs are always merged), so the map is canonical: two maps
  describe the same page→value function iff their arrays are equal.

An update touches only the runs it overlaps plus one neighbour on each side: O(log runs + runs in range)
Python work, plus one ``memmove`` of the array tail (a C loop over 8-byte words, microseconds at 100 000
runs). All ranges are half-open page-index ranges ``[start, end)``.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Iterator


class RunMap:
    """Map every page index in ``[0, npages)`` to an integer, stored as merged runs."""

    __slots__ = ("npages", "_starts", "_values")

    def __init__(self, npages: int, value: int = 0):
        if npages <= 0:
            raise ValueError(f"a run map needs at least one page, not {npages}")
        self.npages = npages
        self._starts = array("q", [0])
        self._values = array("q", [value])

    # --- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of runs."""
        return len(self._starts)

    def _run_at(self, page: int) -> int:
        return bisect_right(self._starts, page) - 1

    def _run_end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.npages

    def value_at(self, page: int) -> int:
        self._check_range(page, page + 1)
        return self._values[self._run_at(page)]

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Yield ``(start, end, value)`` for the runs intersecting ``[start, end)``, clipped to it."""
        end = self.npages if end is None else end
        self._check_range(start, end)
        if start == end:
            return
        starts, values, i = self._starts, self._values, self._run_at(start)
        n = len(starts)
        while i < n and starts[i] < end:
            run_end = starts[i + 1] if i + 1 < n else self.npages
            yield max(starts[i], start), min(run_end, end), values[i]
            i += 1

    def is_uniform(self, start: int, end: int, value: int) -> bool:
        """True when every page in ``[start, end)`` maps to ``value`` (vacuously true when empty)."""
        self._check_range(start, end)
        if start == end:
            return True
        i = self._run_at(start)
        return self._values[i] == value and self._run_end(i) >= end

    def first(self, start: int, end: int, predicate) -> int | None:
        """The first page in ``[start, end)`` whose value satisfies ``predicate``, or None."""
        for run_start, _, value in self.runs(start, end):
            if predicate(value):
                return run_start
        return None

    def count(self, value: int, start: int = 0, end: int | None = None) -> int:
        """How many pages of ``[start, end)`` map to ``value``."""
        return sum(e - s for s, e, v in self.runs(start, end) if v == value)

    def as_arrays(self) -> tuple[array, array]:
        """Copies of the run starts and values (for snapshots)."""
        return array("q", self._starts), array("q", self._values)

    def metadata_bytes(self) -> int:
        """Bytes held by the run arrays' items (what the ≤ 128 bytes per run target counts)."""
        return len(self._starts) * (self._starts.itemsize + self._values.itemsize)

    # --- updates ----------------------------------------------------------------------------------
    def set(self, start: int, end: int, value: int) -> None:
        """Map every page in ``[start, end)`` to ``value``."""
        self._check_range(start, end)
        if start == end:
            return
        lo, hi = self._split(start), self._split(end)
        self._starts[lo:hi] = array("q", [start])
        self._values[lo:hi] = array("q", [value])
        self._merge_around(lo, lo + 1)

    def add(self, start: int, end: int, delta: int) -> None:
        """Add ``delta`` to the value of every page in ``[start, end)`` (pin counts)."""
        self._check_range(start, end)
        if start == end or delta == 0:
            return
        lo, hi = self._split(start), self._split(end)
        for i in range(lo, hi):
            self._values[i] += delta
        self._merge_around(lo, hi)

    def _split(self, page: int) -> int:
        """Make a run start at ``page`` (unless it is npages) and return the index of that run."""
        if page >= self.npages:
            return len(self._starts)
        i = self._run_at(page)
        if self._starts[i] == page:
            return i
        self._starts.insert(i + 1, page)
        self._values.insert(i + 1, self._values[i])
        return i + 1

    def _merge_around(self, lo: int, hi: int) -> None:
        """Re-merge equal neighbours among runs ``lo-1 .. hi`` (the only ones an update can touch)."""
        i = min(hi, len(self._starts) - 1)
        stop = max(lo, 1)
        while i >= stop:
            if self._values[i] == self._values[i - 1]:
                del self._starts[i]
                del self._values[i]
            i -= 1

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")

    def check(self) -> None:
        """Assert the invariants (for tests)."""
        starts, values = self._starts, self._values
        assert len(starts) == len(values) >= 1
        assert starts[0] == 0
        for i in range(1, len(starts)):
            assert starts[i - 1] < starts[i] < self.npages, (i, starts[i - 1], starts[i])
            assert values[i - 1] != values[i], (i, values[i])
