"""A run-length map from page index to a small integer, the way the kernel's maple tree stores attributes.

guest_memfd keeps one attribute per page, but stores it as ranges: adjacent pages with the same value are
one entry. A 1 TiB file has 2^28 pages, so a byte per page is out of the question; 100 000 runs must cost
well under 128 bytes each. Here a run is two machine words (its first page and its value), i.e. 16 bytes.

Why chunks: in one flat ``array`` every split or merge is an ``insert``/``del``, a memmove of the whole
tail, so a 4 KiB conversion got slower as the map grew (about 20 µs at 100 000 runs against 2-5 µs at one
run). The runs are therefore kept in a list of chunks, each a pair of ``array('q')`` (starts, values) of
at most :attr:`RunMap.CHUNK_RUNS` runs, plus an index holding every chunk's first start. ``bisect`` on the
index and then inside one chunk finds a page's run in O(log runs); an update rewrites only the runs it
overlaps plus one neighbour on each side, and moves at most one chunk's tail. A chunk that grows past the
bound is split; one that shrinks below a quarter of it is merged with a neighbour, so chunks stay between
``CHUNK_RUNS // 4`` and ``CHUNK_RUNS`` runs (a map with a single chunk may hold fewer) and the index stays
~1/300 of the runs. An update therefore costs O(log runs + runs touched) Python steps and no work that
grows with the map. The update a 4 KiB conversion, fill or write-back makes (a range inside one run) is
done in place by :meth:`RunMap._rewrite` without building the replacement lists: conversions go
through a FUSE request each, so every Python step of it is on a caller's round trip.

Per-value page counts are kept up to date by every update, so ``count(value)`` over the whole map (what
``GuestMemfd.status()`` asks for) is O(1); a ranged count walks the runs in the range.

Invariants (checked by :meth:`check`):

* the first run starts at page 0, starts strictly increase across chunk edges, every start < ``npages``;
* no two adjacent runs have the same value, across chunk edges too, so the map is canonical: two maps
  describe the same page→value function iff :meth:`as_arrays` returns equal arrays;
* the chunk index, the run count and the per-value page counts agree with the chunks.

Caveat: :meth:`metadata_bytes` counts the run payload (16 bytes a run, what the ≤ 128 bytes per run
budget counts, and what the snapshot copies); :meth:`footprint_bytes` adds what Python spends around it
(array headers and spare capacity, the index, the counts) - about 17-18 bytes a run at 100 000 runs.
All ranges are half-open page-index ranges ``[start, end)``.
"""

from __future__ import annotations

import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from itertools import pairwise


class RunMap:
    """Map every page index in ``[0, npages)`` to an integer, stored as merged runs."""

    __slots__ = ("_counts", "_cs", "_cv", "_firsts", "_n", "npages")

    #: Most runs in one chunk. A chunk's memmove stays within 8 KiB, and the index ~1/300 of the runs.
    #: Tests override it in a subclass to exercise chunk edges with a few pages.
    CHUNK_RUNS = 512

    def __init__(self, npages: int, value: int = 0):
        if npages <= 0:
            raise ValueError(f"a run map needs at least one page, not {npages}")
        self.npages = npages
        self._cs = [array("q", [0])]       # per chunk: run starts
        self._cv = [array("q", [value])]   # per chunk: run values
        self._firsts = [0]                 # per chunk: its first start (what bisect searches)
        self._n = 1                        # runs in all chunks
        self._counts = {value: npages}     # value -> pages mapping to it (no zero entries)

    # --- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of runs."""
        return self._n

    def _locate(self, page: int) -> tuple[int, int]:
        """``(chunk, index in chunk)`` of the run holding ``page``."""
        c = bisect_right(self._firsts, page) - 1
        return c, bisect_right(self._cs[c], page) - 1

    def _end_of(self, c: int, j: int) -> int:
        """Where run ``j`` of chunk ``c`` ends: the next run's start, or npages."""
        starts = self._cs[c]
        if j + 1 < len(starts):
            return starts[j + 1]
        return self._firsts[c + 1] if c + 1 < len(self._cs) else self.npages

    def value_at(self, page: int) -> int:
        self._check_range(page, page + 1)
        c, j = self._locate(page)
        return self._cv[c][j]

    def runs(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
        """Yield ``(start, end, value)`` for the runs intersecting ``[start, end)``, clipped to it."""
        end = self.npages if end is None else end
        self._check_range(start, end)
        if start == end:
            return
        cs, cv, firsts, nchunks = self._cs, self._cv, self._firsts, len(self._cs)
        c, j = self._locate(start)
        while True:
            starts, values = cs[c], cv[c]
            n = len(starts)
            chunk_end = firsts[c + 1] if c + 1 < nchunks else self.npages
            for k in range(j, n):
                s = starts[k]
                if s >= end:
                    return
                e = starts[k + 1] if k + 1 < n else chunk_end
                # conditional expressions, not max()/min(): this loop is what snapshots and status walk
                yield (s if s > start else start), (e if e < end else end), values[k]
            c, j = c + 1, 0
            if c == nchunks or chunk_end >= end:
                return

    def is_uniform(self, start: int, end: int, value: int) -> bool:
        """True when every page in ``[start, end)`` maps to ``value`` (vacuously true when empty)."""
        self._check_range(start, end)
        if start == end:
            return True
        c, j = self._locate(start)
        return self._cv[c][j] == value and self._end_of(c, j) >= end

    def first(self, start: int, end: int, predicate) -> int | None:
        """The first page in ``[start, end)`` whose value satisfies ``predicate``, or None."""
        self._check_range(start, end)
        if start == end:
            return None
        c, j = self._locate(start)  # the common case, a range inside one run, without the generator
        if predicate(self._cv[c][j]):
            return start
        if self._end_of(c, j) >= end:
            return None
        for run_start, _, value in self.runs(start, end):
            if predicate(value):
                return run_start
        return None

    def count(self, value: int, start: int = 0, end: int | None = None) -> int:
        """How many pages of ``[start, end)`` map to ``value`` (O(1) over the whole map)."""
        if start == 0 and (end is None or end == self.npages):
            return self._counts.get(value, 0)
        return sum(e - s for s, e, v in self.runs(start, end) if v == value)

    def as_arrays(self) -> tuple[array, array]:
        """Copies of the run starts and values, all chunks concatenated (for snapshots)."""
        starts, values = array("q"), array("q")
        for chunk_starts, chunk_values in zip(self._cs, self._cv):
            starts.extend(chunk_starts)
            values.extend(chunk_values)
        return starts, values

    def _chunk_spans(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(chunk, first, last + 1)`` index spans of the runs intersecting ``[start, end)`` (non-empty)."""
        c0, j0 = self._locate(start)
        c1, j1 = self._locate(end - 1)
        for c in range(c0, c1 + 1):
            yield c, (j0 if c == c0 else 0), (j1 + 1 if c == c1 else len(self._cs[c]))

    def count_runs(self, start: int = 0, end: int | None = None) -> int:
        """How many runs intersect ``[start, end)`` (O(chunks in the range))."""
        end = self.npages if end is None else end
        self._check_range(start, end)
        if start == end:
            return 0
        return sum(hi - lo for _, lo, hi in self._chunk_spans(start, end))

    def arrays(self, start: int = 0, end: int | None = None) -> tuple[array, array]:
        """Copies of the starts and values of the runs intersecting ``[start, end)``, the first start clipped
        to ``start``: :meth:`runs` without a tuple per run (for long results)."""
        end = self.npages if end is None else end
        self._check_range(start, end)
        starts, values = array("q"), array("q")
        if start == end:
            return starts, values
        for c, lo, hi in self._chunk_spans(start, end):
            starts.extend(self._cs[c][lo:hi])
            values.extend(self._cv[c][lo:hi])
        starts[0] = start
        return starts, values

    def metadata_bytes(self) -> int:
        """Bytes of run payload: two 8-byte words a run (what the ≤ 128 bytes per run target counts)."""
        return self._n * 16

    def footprint_bytes(self) -> int:
        """Everything Python holds for this map: chunk arrays with headers and spare capacity, the
        chunk lists, the index and the count table (O(chunks); for reports, not hot paths)."""
        arrays = sum(sys.getsizeof(a) for a in self._cs) + sum(sys.getsizeof(a) for a in self._cv)
        index = sys.getsizeof(self._firsts) + sum(sys.getsizeof(f) for f in self._firsts)
        counts = sys.getsizeof(self._counts) + sum(sys.getsizeof(k) + sys.getsizeof(v)
                                                   for k, v in self._counts.items())
        return arrays + sys.getsizeof(self._cs) + sys.getsizeof(self._cv) + index + counts

    # --- updates ----------------------------------------------------------------------------------
    def set(self, start: int, end: int, value: int) -> None:
        """Map every page in ``[start, end)`` to ``value``."""
        self._check_range(start, end)
        if start == end:
            return
        self._rewrite(start, end, value, False)

    def add(self, start: int, end: int, delta: int) -> None:
        """Add ``delta`` to the value of every page in ``[start, end)`` (pin counts)."""
        self._check_range(start, end)
        if start == end or delta == 0:
            return
        self._rewrite(start, end, delta, True)

    def _rewrite(self, start: int, end: int, operand: int, adding: bool) -> None:
        """Set (or add ``operand`` to) ``[start, end)``.

        A range inside one run (what a 4 KiB conversion, fill or write-back touches) is changed in place:
        the run is split, shrunk, or merged into a neighbour, with at most two runs inserted or deleted in
        its chunk. Each of the three cases (the range keeps the run's head; it takes the head but not the
        tail; it takes the whole run) returns how many runs the chunk gained, or None, having changed
        nothing, when a merge would reach into another chunk. That, and a range over several runs, take
        the general rewrite. The dispatch is written out here rather than in a function of its own: it is
        one Python call less on every conversion's round trip."""
        c, j = self._locate(start)
        starts = self._cs[c]
        n = len(starts)
        run_end = starts[j + 1] if j + 1 < n else self._end_of(c, j)
        if end <= run_end:
            v = self._cv[c][j]
            w = v + operand if adding else operand
            if w == v:
                return
            if starts[j] < start:
                grown = self._change_after_head(c, j, start, end, run_end, v, w)
            elif end < run_end:
                grown = self._change_head(c, j, end, v, w)
            else:
                grown = self._change_whole_run(c, j, start, w)
            if grown is not None:
                self._n += grown
                self._move_count(v, w, end - start)
                n += grown
                if n > self.CHUNK_RUNS or (n < self.CHUNK_RUNS // 4 and len(self._cs) > 1):
                    self._fix_chunk(c)
                return
        self._rewrite_runs(c, j, start, end, operand, adding)

    def _rewrite_runs(self, c: int, j: int, start: int, end: int, operand: int, adding: bool) -> None:
        """The general rewrite of ``[start, end)``, whose first page is in run ``j`` of chunk ``c``: read
        the runs it overlaps plus one neighbour on each side, build their canonical replacement and splice
        it in."""
        lc, lj = self._left_neighbour(c, j)
        rc, rj, old_starts, old_values = self._collect(lc, lj, end)
        new_starts, new_values = self._replacement(old_starts, old_values, start, end, operand, adding)
        self._splice(lc, lj, rc, rj, new_starts, new_values)

    def _left_neighbour(self, c: int, j: int) -> tuple[int, int]:
        """The position of the run before run ``j`` of chunk ``c`` (itself when it is the first run), so
        that a merge with it happens in the rewrite."""
        if j > 0:
            return c, j - 1
        if c > 0:
            return c - 1, len(self._cs[c - 1]) - 1
        return c, j

    def _collect(self, c: int, j: int, end: int) -> tuple[int, int, list[int], list[int]]:
        """The runs from position ``(c, j)`` up to and including the first one starting at or after
        ``end`` (or the last run): ``(chunk, index)`` just past them, their starts followed by where the
        last one ends, and their values."""
        cs, cv = self._cs, self._cv
        last = len(cs) - 1
        starts, values = cs[c], cv[c]
        old_starts, old_values = [], []
        while True:
            s = starts[j]
            old_starts.append(s)
            old_values.append(values[j])
            j += 1
            if j == len(starts):
                if c == last:
                    tail = self.npages
                    break
                c, j = c + 1, 0
                starts, values = cs[c], cv[c]
            if s >= end:
                tail = starts[j]
                break
        old_starts.append(tail)
        return c, j, old_starts, old_values

    def _replacement(self, old_starts: list[int], old_values: list[int], start: int, end: int,
                     operand: int, adding: bool) -> tuple[list[int], list[int]]:
        """The canonical runs replacing the old ones once ``[start, end)`` is set (or ``operand`` added),
        moving the page counts on the way. Each old run is cut into the pieces before, inside and after
        the range, the inside one is changed, and the pieces are appended merging equal neighbours
        (``prev`` is the last value appended)."""
        new_starts: list[int] = []
        new_values: list[int] = []
        prev = None
        for k, v in enumerate(old_values):
            s, e = old_starts[k], old_starts[k + 1]
            if s < start and v != prev:
                new_starts.append(s)
                new_values.append(v)
                prev = v
            a, b = (s if s > start else start), (e if e < end else end)
            if a < b:
                w = v + operand if adding else operand
                if w != prev:
                    new_starts.append(a)
                    new_values.append(w)
                    prev = w
                if w != v:
                    self._move_count(v, w, b - a)
            if e > end and v != prev:
                new_starts.append(s if s > end else end)
                new_values.append(v)
                prev = v
        return new_starts, new_values

    def _change_after_head(self, c: int, j: int, start: int, end: int, e: int, v: int, w: int) -> int | None:
        """Run ``j`` (value ``v``, ending at ``e``) keeps ``[its start, start)``; ``[start, end)`` becomes
        ``w``: a split in three, or a new tail that may join the next run."""
        starts, values = self._cs[c], self._cv[c]
        n = len(starts)
        if end < e:                                  # split in three
            starts[j + 1:j + 1] = array("q", (start, end))
            values[j + 1:j + 1] = array("q", (w, v))
            return 2
        if j + 1 < n and values[j + 1] == w:         # the tail joins the next run
            starts[j + 1] = start
            return 0
        if j + 1 == n and c + 1 < len(self._cs) and self._cv[c + 1][0] == w:
            return None                              # ... which starts the next chunk
        starts.insert(j + 1, start)                  # the tail becomes a run
        values.insert(j + 1, w)
        return 1

    def _change_head(self, c: int, j: int, end: int, v: int, w: int) -> int | None:
        """Run ``j`` (value ``v``) keeps ``[end, its end)``; its head becomes ``w`` and may join the
        previous run."""
        starts, values = self._cs[c], self._cv[c]
        if j > 0 and values[j - 1] == w:             # the head joins the previous run
            starts[j] = end
            return 0
        if j == 0 and c > 0 and self._cv[c - 1][-1] == w:
            return None                              # ... which ends the previous chunk
        values[j] = w                                # the head becomes a run
        starts.insert(j + 1, end)
        values.insert(j + 1, v)
        return 1

    def _change_whole_run(self, c: int, j: int, start: int, w: int) -> int | None:
        """Run ``j`` (starting at ``start``) becomes ``w`` entirely, merging with the neighbours that
        already hold ``w``."""
        cs, cv = self._cs, self._cv
        starts, values = cs[c], cv[c]
        n = len(starts)
        left = values[j - 1] if j > 0 else (cv[c - 1][-1] if c > 0 else None)
        right = values[j + 1] if j + 1 < n else (cv[c + 1][0] if c + 1 < len(cs) else None)
        if left == w and right == w:                 # the run joins both neighbours
            if j == 0 or j + 1 == n:
                return None
            del starts[j:j + 2], values[j:j + 2]
            return -2
        if left == w:                                # the run joins the previous one
            if j == 0:
                return None
            del starts[j], values[j]
            return -1
        if right == w:                               # the run joins the next one
            if j + 1 == n:
                return None
            del starts[j], values[j]
            starts[j] = start
            return -1
        values[j] = w
        return 0

    def _move_count(self, old: int, new: int, pages: int) -> None:
        counts = self._counts
        left = counts[old] - pages
        if left:
            counts[old] = left
        else:
            del counts[old]
        counts[new] = counts.get(new, 0) + pages

    def _splice(self, lc: int, lj: int, rc: int, rj: int, new_starts: list[int],
                new_values: list[int]) -> None:
        """Replace the runs from position ``(lc, lj)`` up to (not including) ``(rc, rj)`` (chunk,
        index in chunk) with the new ones, then bring the chunks touched back within bounds."""
        cs, cv, firsts = self._cs, self._cv, self._firsts
        if lc == rc:
            self._n += len(new_starts) - (rj - lj)
            cs[lc][lj:rj] = array("q", new_starts)
            cv[lc][lj:rj] = array("q", new_values)
            n = len(cs[lc])
            if n > self.CHUNK_RUNS or (n < self.CHUNK_RUNS // 4 and len(cs) > 1):
                self._fix_chunk(lc)
            return
        self._n += len(new_starts) - (len(cs[lc]) - lj + sum(len(cs[k]) for k in range(lc + 1, rc)) + rj)
        cs[lc][lj:] = array("q", new_starts)
        cv[lc][lj:] = array("q", new_values)
        del cs[rc][:rj], cv[rc][:rj]
        del cs[lc + 1:rc], cv[lc + 1:rc], firsts[lc + 1:rc]
        if cs[lc + 1]:
            firsts[lc + 1] = cs[lc + 1][0]
        self._fix_chunk(lc + 1)
        self._fix_chunk(lc)

    def _fix_chunk(self, c: int) -> None:
        """Drop chunk ``c`` if empty, split it if above CHUNK_RUNS, merge it into a neighbour if below a
        quarter of that (unless it is the only chunk). Neighbours are assumed within bounds."""
        cs, cv, firsts = self._cs, self._cv, self._firsts
        n, most = len(cs[c]), self.CHUNK_RUNS
        if n == 0:
            del cs[c], cv[c], firsts[c]
            return
        if n < most // 4 and len(cs) > 1:
            if c + 1 == len(cs):  # the last chunk merges into the one before it
                c -= 1
            cs[c].extend(cs[c + 1])
            cv[c].extend(cv[c + 1])
            del cs[c + 1], cv[c + 1], firsts[c + 1]
            n = len(cs[c])
        if n > most:
            self._split_chunk(c)

    def _split_chunk(self, c: int) -> None:
        """Cut chunk ``c`` (more than CHUNK_RUNS runs) into pieces of CHUNK_RUNS/2 to 3/4 CHUNK_RUNS."""
        cs, cv = self._cs, self._cv
        starts, values, n = cs[c], cv[c], len(cs[c])
        pieces = n // (self.CHUNK_RUNS // 2)
        cuts = [n * i // pieces for i in range(pieces + 1)]
        cs[c:c + 1] = [starts[a:b] for a, b in pairwise(cuts)]
        cv[c:c + 1] = [values[a:b] for a, b in pairwise(cuts)]
        self._firsts[c:c + 1] = [starts[a] for a in cuts[:-1]]

    def _check_range(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.npages:
            raise ValueError(f"page range [{start}, {end}) is outside [0, {self.npages})")

    # --- invariants ------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert the invariants (for tests)."""
        cs, cv, firsts = self._cs, self._cv, self._firsts
        assert len(cs) == len(cv) == len(firsts) >= 1, "chunk lists and index differ in length"
        counts: dict[int, int] = {}
        runs, prev_start, prev_value = 0, None, None
        for c, (starts, values) in enumerate(zip(cs, cv)):
            assert 1 <= len(starts) == len(values) <= self.CHUNK_RUNS, (c, len(starts), len(values))
            assert len(cs) == 1 or len(starts) >= self.CHUNK_RUNS // 4, ("chunk too small", c, len(starts))
            assert firsts[c] == starts[0], ("index out of date", c, firsts[c], starts[0])
            for s, v in zip(starts, values):
                if prev_start is None:
                    assert s == 0, ("the first run must start at page 0", s)
                else:
                    assert prev_start < s < self.npages, (runs, prev_start, s)
                    assert prev_value != v, (runs, v)
                    counts[prev_value] = counts.get(prev_value, 0) + s - prev_start
                prev_start, prev_value = s, v
                runs += 1
        counts[prev_value] = counts.get(prev_value, 0) + self.npages - prev_start
        assert runs == self._n, ("run count", runs, self._n)
        assert counts == self._counts, ("page counts", counts, self._counts)

