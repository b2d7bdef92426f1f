"""Backend ``sim``: no real memory, a simulated physical allocator, for studying layouts at TiB scale.

Allocator policies are judged by the physical layout they produce (how much coalesces into 2 MiB and
1 GiB blocks), and that needs files far bigger than this machine's memory. ``sim`` keeps only what a
layout needs: which file pages are allocated and where they physically are.

The model. Simulated physical memory of ``phys_size`` bytes at ``phys_base`` is cut into *chunks* (option
``chunk``, default 2 MiB, never smaller than the page size, so a huge folio is always one naturally
aligned physical chunk). A file chunk gets a physical chunk when its first page is allocated and gives
it back when its last page is punched. Each file chunk has a *home* chunk: the identity (file offset
``o`` lives at ``phys_base + o``), or, with ``max_contiguity=M``, the same after shuffling whole M-sized
blocks, so physical contiguity never runs beyond M (a buddy allocator's largest order, say). The
allocator takes the home chunk unless it is taken or a draw below ``fragmentation`` sends it elsewhere,
to a free chunk picked at random. So ``fragmentation=0`` gives one extent per allocated run, ``1`` gives
almost one extent per chunk, and values between mix the two. Everything is deterministic given ``seed``
and the same sequence of operations.

State, and why it is run-length. A study touches a few GiB of a file of many TiB, so nothing may cost per
chunk of the file: a 64 TiB file has 32 M chunks of 2 MiB, and per-chunk arrays made its creation take
~1 s and ~320 MiB before anything was allocated. The state is what differs from "nothing allocated":

* the allocated pages, a :class:`~ufsgmem.runmap.RunMap` as the core keeps them. A file chunk holds a
  physical chunk exactly when one of its pages is allocated, so the same runs say which chunks are placed;
* ``_away``, the placed chunks that are *not* at home (file chunk → physical chunk), and ``_taken``, the
  physical chunks they hold. Every other placed chunk is at home, and a home has one file chunk as its
  owner, so a physical chunk is in use iff it is in ``_taken`` or its owner is placed and not away.

With ``fragmentation=0`` nothing is ever away (homes never collide), so a file costs the runs of its
allocated pages: creating is O(1), allocating and punching O(runs touched), ``backend_bytes`` O(1) and
``physical_extents`` O(runs + block edges crossed). With ``fragmentation > 0`` every newly placed chunk
draws (vectorised, O(chunks placed)), an away chunk costs a dict and a set entry (~170 bytes with its
ints), and a punched chunk goes on a free list that random placement reuses first, last freed first.

Caveats. The random orders are numpy permutations of every physical chunk (the free-chunk order, made by
the first allocation of a fragmented file) and of every M-block (with ``max_contiguity``, made when a
home is first needed): 4 bytes an entry, 256 MiB of free order for a 64 TiB file's default 128 TiB. They
are kept, not replaced by something lazy, so that a seed gives the layout it always gave. A fragmented
file allocated almost whole costs more than dense arrays would (~170 bytes an away chunk against ~10 a
chunk): the state is made for a small part of a huge file in use. Simulated memory must
fit a 52-bit physical address space (``phys_base + phys_size`` ≤ 4 PiB, the widest MAXPHYADDR of x86-64
and arm64); beyond that creation is ENOMEM, the answer the other backends give for an impossible size.

Data. Written pages live in a dict (page index → 4 KiB bytearray); a page never written, punched, or
overwritten with zeros reads as zeros and costs nothing, so the content rules (zero on first use, punch
zeroes, content kept across conversions) hold and the core tests run on ``sim`` too. ``view`` returns a
copy and refuses ranges above ``VIEW_CAP`` (the FUSE read path asks for a few MiB at most).

Options (keyword arguments; strings accepted, so a CLI can pass them through): ``fragmentation``
(0.0–1.0), ``seed``, ``phys_base``, ``phys_size``, ``chunk``, ``max_contiguity``, ``preallocate``
(default: when the page size is above 4 KiB, as hugetlb does).

All chunk, page and byte ranges are half-open ``[start, end)``.
"""

from __future__ import annotations

import errno
import sys
from bisect import bisect_left
from collections.abc import Iterator
from itertools import pairwise

import numpy as np

from ufsgmem.address import format_size, parse_size
from ufsgmem.backend import Backend, PhysExtent
from ufsgmem.errors import fail
from ufsgmem.runmap import RunMap
from ufsgmem.uapi import PAGE_SHIFT, PAGE_SIZE, SZ_1G, SZ_2M, SZ_4K

VIEW_CAP = 256 << 20
#: Simulated memory ends below this physical address (52 bits: the widest MAXPHYADDR, x86-64 and arm64).
PHYS_LIMIT = 1 << 52
OPTIONS = ("fragmentation", "seed", "phys_base", "phys_size", "chunk", "max_contiguity", "preallocate")
_ZERO_PAGE = bytes(PAGE_SIZE)
_PENDING = -1  # an away chunk whose physical chunk is being picked

Runs = list[tuple[int, int]]  # chunk ranges [start, end)


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _count(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _arange(runs: Runs) -> np.ndarray:
    """The chunks of ``runs``, in order, as one array (only where each chunk must be looked at)."""
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs] or [np.zeros(0, np.int64)])


def _clip(runs: Runs, lo: int, hi: int) -> Runs:
    return [(max(a, lo), min(b, hi)) for a, b in runs if max(a, lo) < min(b, hi)]


def _covers(runs: Runs, c: int) -> bool:
    return any(a <= c < b for a, b in runs)


class SimBackend(Backend):
    name = "sim"
    page_sizes = (SZ_4K, SZ_2M, SZ_1G)

    #: Free-chunk candidates are checked one by one (~3 µs each) while they number less than 1/64 of the
    #: away chunks plus allocated runs, what one numpy pass sweeps. Tests override it to run both ways.
    ONE_BY_ONE = 64

    def __init__(self, size, page_size, *, progress=None, fragmentation=0.0, seed=0, phys_base=1 << 32,
                 phys_size=None, chunk=SZ_2M, max_contiguity=None, preallocate=None, **options):
        super().__init__(size, page_size, progress=progress, **options)
        if options:
            raise fail(errno.EINVAL, f"sim has no option {', '.join(sorted(options))}; it takes "
                                     f"{', '.join(OPTIONS)}")
        try:
            self.fragmentation = float(fragmentation)
            self.seed = int(seed)
            self.chunk = parse_size(chunk)
            self.phys_base = parse_size(phys_base)
            phys_size = 2 * size if phys_size is None else parse_size(phys_size)
            self.max_contiguity = None if max_contiguity in (None, "", 0) else parse_size(max_contiguity)
        except (TypeError, ValueError) as exc:
            raise fail(errno.EINVAL, f"bad sim option: {exc}") from exc
        self._check_options(size, phys_size)
        self.preallocates = page_size > SZ_4K if preallocate is None else _bool(preallocate)

        C = self.chunk
        self._nfile = -(-size // C)
        self._nphys = max(-(-phys_size // C), self._nfile)
        self._block = self.max_contiguity // C if self.max_contiguity else 0  # chunks per block
        if self._block:  # whole physical blocks, so shuffled homes never run off the end
            self._nphys = -(-self._nphys // self._block) * self._block
        if self.phys_base + self._nphys * C > PHYS_LIMIT:
            raise fail(errno.ENOMEM, f"sim cannot simulate {format_size(self._nphys * C)} of memory at "
                                     f"{self.phys_base:#x}: physical addresses end at 52 bits "
                                     f"({format_size(PHYS_LIMIT)})")
        self._step = C >> PAGE_SHIFT  # pages per chunk
        self._nused = 0
        self._away: dict[int, int] = {}  # placed file chunk not at home -> its physical chunk
        self._taken: set[int] = set()  # the physical chunks of _away
        self._draws = np.random.default_rng([self.seed, 0])
        self._block_home = None  # shuffled block order, made on first need
        self._block_owner = None  # its inverse, made on first need
        self._free_order = None  # shuffled free-chunk order, made on first need
        self._cursor = 0
        self._freed: list[int] = []  # chunks given back, reused first, last first (kept when fragmented)
        self._allocated = RunMap(size >> PAGE_SHIFT, 0)
        self._pages: dict[int, bytearray] = {}
        self._closed = False
        if self.preallocates:
            self.allocate(0, size)
            if progress is not None:
                progress(size, size)

    def _check_options(self, size: int, phys_size: int) -> None:
        if not 0.0 <= self.fragmentation <= 1.0:
            raise fail(errno.EINVAL, f"fragmentation {self.fragmentation} must be between 0.0 and 1.0")
        if not _pow2(self.chunk) or self.chunk < PAGE_SIZE:
            raise fail(errno.EINVAL, f"chunk {self.chunk:#x} must be a power of two of at least 4K")
        self.chunk = max(self.chunk, self.page_size)  # a huge folio is always one physical chunk
        if self.phys_base < 0 or self.phys_base % self.chunk:
            raise fail(errno.EINVAL, f"phys_base {self.phys_base:#x} must be a multiple of the chunk "
                                     f"{format_size(self.chunk)}")
        if phys_size < size:
            raise fail(errno.EINVAL, f"phys_size {format_size(phys_size)} is smaller than the file "
                                     f"({format_size(size)})")
        if self.max_contiguity is not None and (not _pow2(self.max_contiguity)
                                                or self.max_contiguity < self.chunk):
            raise fail(errno.EINVAL, f"max_contiguity {self.max_contiguity:#x} must be a power of two of at "
                                     f"least the chunk {format_size(self.chunk)}")

    # --- homes and orders ----------------------------------------------------------------------------
    def _shuffled(self, n: int, stream: int) -> np.ndarray:
        """Exactly ``default_rng([seed, stream]).permutation(n)`` (a shuffle's draws depend on n only), in
        int32 while it fits: the order a seed always gave, at half the bytes."""
        try:
            order = np.arange(n, dtype=np.int32 if n < 1 << 31 else np.int64)
        except MemoryError:
            raise fail(errno.ENOMEM, f"sim cannot hold a shuffled order of {n} chunks in this server's "
                                     "memory") from None
        np.random.default_rng([self.seed, stream]).shuffle(order)
        return order

    def _home(self, chunks):
        """Home physical chunk of file chunk(s) ``chunks`` (an int or an int64 array)."""
        if not self._block:
            return chunks
        if self._block_home is None:
            self._block_home = self._shuffled(self._nphys // self._block, 1)
        return self._block_home[chunks // self._block] * self._block + chunks % self._block

    def _owner(self, p):
        """The file chunk whose home is physical chunk(s) ``p`` (an int or an array; may lie beyond the
        file)."""
        if not self._block:
            return p
        if self._block_owner is None:
            self._home(0)  # the block order exists
            self._block_owner = np.empty_like(self._block_home)
            self._block_owner[self._block_home] = np.arange(len(self._block_home), dtype=self._block_home.dtype)
        return self._block_owner[p // self._block] * self._block + p % self._block

    # --- which chunks are placed: read off the allocated pages ---------------------------------------
    def _pages_of(self, c0: int, c1: int) -> tuple[int, int]:
        """The page range of chunks ``[c0, c1)``, clipped to the file (its last chunk may be partial)."""
        return c0 * self._step, min(c1 * self._step, self._allocated.npages)

    def _placed_runs(self, c0: int, c1: int) -> Runs:
        """Maximal runs of chunks in ``[c0, c1)`` holding at least one allocated page."""
        runs: Runs = []
        for s, e, v in self._allocated.runs(*self._pages_of(c0, c1)):
            if not v:
                continue
            a, b = s // self._step, -(-e // self._step)
            if runs and a <= runs[-1][1]:  # two allocated runs share a chunk
                runs[-1] = (runs[-1][0], b)
            else:
                runs.append((a, b))
        return runs

    def _unplaced_runs(self, c0: int, c1: int) -> Runs:
        """Maximal runs of chunks in ``[c0, c1)`` with no allocated page (no physical chunk)."""
        runs: Runs = []
        npages = self._allocated.npages
        for s, e, v in self._allocated.runs(*self._pages_of(c0, c1)):
            a, b = -(-s // self._step), self._nfile if e == npages else e // self._step
            if not v and a < b:
                runs.append((a, b))
        return runs

    def _is_placed(self, c: int) -> bool:
        return not self._allocated.is_uniform(*self._pages_of(c, c + 1), 0)

    def _in_use(self, p: int) -> bool:
        """Whether physical chunk ``p`` backs a file chunk: an away one, or its owner, at home."""
        if p in self._taken:
            return True
        c = int(self._owner(p))
        return c < self._nfile and c not in self._away and self._is_placed(c)

    # --- the simulated physical allocator -----------------------------------------------------------
    def _take_free(self, n: int) -> np.ndarray:
        """Claim ``n`` free physical chunks: recently freed ones first, then in a shuffled order."""
        taken: list[int] = []
        while self._freed and len(taken) < n:  # popped last first; one may be in use again (a home)
            need = n - len(taken)
            tail = np.array(self._freed[-(2 * need + 64):][::-1], dtype=np.int64)
            free = self._first_free(tail, need, repeats=True)
            del self._freed[len(self._freed) - (free[-1] + 1 if len(free) == need else len(tail)):]
            self._claim(tail[free], taken)
        self._make_orders()
        # every chunk behind the cursor is in use or on the freed list, so the cursor only moves forward
        while len(taken) < n and self._cursor < self._nphys:
            need = n - len(taken)
            batch = self._free_order[self._cursor:self._cursor + 2 * need + 64]
            free = self._first_free(batch, need)
            self._cursor += free[-1] + 1 if len(free) == need else len(batch)
            self._claim(batch[free], taken)
        if len(taken) < n:  # only reachable if the bookkeeping above is wrong; fall back to a scan
            every = np.arange(self._nphys, dtype=np.int64)
            self._claim(every[self._first_free(every, n - len(taken))], taken)
        return np.array(taken, dtype=np.int64)

    def _claim(self, chunks: np.ndarray, taken: list[int]) -> None:
        got = chunks.tolist()
        self._taken.update(got)
        taken.extend(got)

    def _first_free(self, chunks: np.ndarray, need: int, repeats: bool = False) -> list[int]:
        """Indices of the first ``need`` chunks of ``chunks`` not in use (with ``repeats``, a chunk seen
        before in ``chunks`` counts as in use: the free list may hold one twice). One by one while that is
        cheaper (~3 µs a chunk), else in numpy over them all, which costs one pass over the away table
        and the allocated runs: a large placement must not pay Python per candidate."""
        if len(chunks) * self.ONE_BY_ONE < len(self._taken) + len(self._away) + len(self._allocated):
            out: list[int] = []
            seen: set[int] = set()
            for i, p in enumerate(chunks.tolist()):
                if p not in seen and not self._in_use(p):
                    out.append(i)
                    if len(out) == need:
                        break
                seen.add(p)
            return out
        used = self._in_use_many(chunks)
        if repeats:
            order = np.argsort(chunks, kind="stable")  # equal chunks stay in the order they came
            used[order[1:][chunks[order[1:]] == chunks[order[:-1]]]] = True
        return np.nonzero(~used)[0][:need].tolist()

    def _in_use_many(self, ps: np.ndarray) -> np.ndarray:
        """:meth:`_in_use` of every chunk of ``ps``, in numpy."""
        used = np.isin(ps, np.fromiter(self._taken, dtype=np.int64, count=len(self._taken)))
        owners = self._owner(ps)
        home = ~used & (owners < self._nfile)
        if self._away:
            home[home] = ~np.isin(owners[home], np.fromiter(self._away, dtype=np.int64, count=len(self._away)))
        home[home] = self._placed_many(owners[home])
        return used | home

    def _placed_many(self, chunks: np.ndarray) -> np.ndarray:
        """:meth:`_is_placed` of every chunk of ``chunks``: the run holding its first page is allocated,
        or the next run (allocated, as runs alternate) starts inside the chunk."""
        starts, values = (np.frombuffer(a, dtype=np.int64) for a in self._allocated.as_arrays())
        npages = self._allocated.npages
        first = chunks.astype(np.int64) * self._step
        i = np.searchsorted(starts, first, side="right") - 1
        following = np.append(starts, npages)[i + 1]
        return (values[i] != 0) | (following < np.minimum(first + self._step, npages))

    def _homes_free(self, homes: np.ndarray) -> np.ndarray:
        """Which of these homes of unplaced chunks are free: only an away chunk can hold one (its owner
        is unplaced), so it is a lookup in ``_taken``, from whichever side is smaller."""
        if not self._taken:
            return np.ones(len(homes), dtype=bool)
        if len(homes) < len(self._taken):
            return np.fromiter((h not in self._taken for h in homes.tolist()), dtype=bool, count=len(homes))
        return ~np.isin(homes, np.fromiter(self._taken, dtype=np.int64, count=len(self._taken)))

    def _make_room(self, n: int) -> None:
        """Refuse ``n`` more chunks when they do not fit, and make the orders random placement reads:
        both can fail (ENOMEM), and must do so before anything changes."""
        if n > self._nphys - self._nused:
            raise fail(errno.ENOMEM, f"simulated memory exhausted: {n} chunks of "
                                     f"{format_size(self.chunk)} wanted, {self._nphys - self._nused} free")
        if n and self.fragmentation > 0:
            self._make_orders()

    def _make_orders(self) -> None:
        """The shuffled free-chunk order and, with blocks, the block order and its inverse."""
        if self._free_order is None:
            self._free_order = self._shuffled(self._nphys, 2)
        self._owner(0)  # with blocks, makes the block order and its inverse

    def _place(self, runs: Runs) -> None:
        """Give the chunks of ``runs`` (unplaced until now; their pages already marked allocated) a
        physical chunk each: home, unless it is taken or a draw sends the chunk elsewhere."""
        n = _count(runs)
        self._nused += n
        if not self.fragmentation and not self._taken:
            return  # no draw and every home free: all at home, which is what "not away" records
        chunks = _arange(runs)
        at_home = self._homes_free(self._home(chunks))
        if self.fragmentation > 0:
            at_home &= self._draws.random(n) >= self.fragmentation
        rest = chunks[~at_home].tolist()
        if rest:
            self._away.update(dict.fromkeys(rest, _PENDING))  # not at home: their homes count as free
            picks = self._take_free(len(rest))
            if self.fragmentation > 0:
                picks = self._draws.permutation(picks)
            self._away.update(zip(rest, picks.tolist()))

    def _release(self, runs: Runs) -> None:
        """Give back the physical chunks of the placed chunks ``runs``: onto the free list in reverse, so
        that it hands them out again in the order of ``runs``."""
        self._nused -= _count(runs)
        if not self.fragmentation and not self._away:
            return  # nothing away, and the free list is only ever read by random placement
        chunks = _arange(runs).tolist()
        phys = self._home(np.array(chunks, dtype=np.int64)).tolist()
        if self._away:
            for i, c in enumerate(chunks):
                p = self._away.pop(c, None)
                if p is not None:
                    phys[i] = p
                    self._taken.discard(p)
        self._freed.extend(reversed(phys))

    # --- the Backend interface ----------------------------------------------------------------------
    def allocate(self, offset, size):
        first, last = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        if self._allocated.is_uniform(first, last, 1):
            return
        new = self._unplaced_runs(offset // self.chunk, -(-(offset + size) // self.chunk))
        self._make_room(_count(new))
        self._allocated.set(first, last, 1)
        self._place(new)

    def punch_hole(self, offset, size):
        end = min(offset + size, self.size)
        first, last = offset >> PAGE_SHIFT, end >> PAGE_SHIFT
        C = self.chunk
        c0, c1 = offset // C, -(-end // C)
        inner = (-(-offset // C), end // C)  # chunks wholly inside the hole
        held = self._placed_runs(c0, c1)
        self._allocated.set(first, last, 0)
        self._drop_pages(first, last)
        edges = [c for c in sorted({c0, c1 - 1}) if c0 <= c < c1 and not inner[0] <= c < inner[1]
                 and _covers(held, c) and not self._is_placed(c)]
        self._release(_clip(held, *inner) + [(c, c + 1) for c in edges])

    def _drop_pages(self, first: int, last: int) -> None:
        if last - first <= len(self._pages):
            for p in range(first, last):
                self._pages.pop(p, None)
        else:
            for p in [p for p in self._pages if first <= p < last]:
                del self._pages[p]

    def write(self, offset, data):
        data = memoryview(data).cast("B")
        pos, end = 0, len(data)
        while pos < end:
            page, within = divmod(offset + pos, PAGE_SIZE)
            n = min(PAGE_SIZE - within, end - pos)
            buf = self._pages.get(page)
            if buf is None:
                buf = self._pages[page] = bytearray(PAGE_SIZE)
            buf[within:within + n] = data[pos:pos + n]
            if buf == _ZERO_PAGE:
                del self._pages[page]  # all zeros again: reads the same, costs nothing
            pos += n

    def view(self, offset, size):
        if size > VIEW_CAP:
            raise fail(errno.ENOMEM, f"sim views are capped at {format_size(VIEW_CAP)}, "
                                     f"{format_size(size)} asked")
        out = bytearray(size)
        first, last = offset >> PAGE_SHIFT, -(-(offset + size) >> PAGE_SHIFT)
        pages = range(first, last) if last - first <= len(self._pages) else \
            sorted(p for p in self._pages if first <= p < last)
        for p in pages:
            buf = self._pages.get(p)
            if buf is None:
                continue
            start, stop = max(p << PAGE_SHIFT, offset), min((p + 1) << PAGE_SHIFT, offset + size)
            out[start - offset:stop - offset] = buf[start - (p << PAGE_SHIFT):stop - (p << PAGE_SHIFT)]
        return memoryview(out)

    def physical_extents(self):
        C, base, out = self.chunk, self.phys_base, []
        away = sorted(self._away)
        for s, e, v in self._allocated.runs():
            if not v:
                continue
            start, end = s << PAGE_SHIFT, e << PAGE_SHIFT
            for a, b, p in self._stretches(start // C, -(-end // C), away):
                lo, hi = max(start, a * C), min(end, b * C)
                out.append(PhysExtent(lo, base + p * C + lo - a * C, hi - lo))
        return out

    def _stretches(self, k0: int, k1: int, away: list[int]) -> Iterator[tuple[int, int, int]]:
        """Placed chunks ``[k0, k1)`` as maximal physically contiguous stretches ``(a, b, phys of a)``.
        Only an away chunk or a block edge can break contiguity, so the cost is those, not the chunks."""
        cuts = {k0, k1}
        for c in away[bisect_left(away, k0):bisect_left(away, k1)]:
            cuts.update((c, c + 1))
        if self._block:
            cuts.update(range(-(-k0 // self._block) * self._block, k1, self._block))
        a0 = p0 = None
        for a, _ in pairwise(sorted(cuts)):
            p = self._away[a] if a in self._away else int(self._home(a))
            if a0 is not None and p == p0 + a - a0:
                continue  # this piece continues the stretch
            if a0 is not None:
                yield a0, a, p0
            a0, p0 = a, p
        yield a0, k1, p0

    def backend_bytes(self):
        return self._allocated.count(1) << PAGE_SHIFT

    def info(self):
        return {"phys_source": "simulated", "fragmentation": self.fragmentation, "seed": self.seed,
                "chunk": self.chunk, "phys_base": self.phys_base, "phys_size": self._nphys * self.chunk,
                "max_contiguity": self.max_contiguity, "chunks_used": self._nused,
                "stored_pages": len(self._pages), "metadata_bytes": self.metadata_bytes()}

    def metadata_bytes(self) -> int:
        """The allocated-page runs, the away table (its hash tables, not the int objects they point at),
        the free list and whichever shuffled orders exist."""
        orders = sum(a.nbytes for a in (self._free_order, self._block_home, self._block_owner) if a is not None)
        away = sys.getsizeof(self._away) + sys.getsizeof(self._taken) + sys.getsizeof(self._freed)
        return self._allocated.metadata_bytes() + away + orders

    def close(self):
        if not self._closed:
            self._closed = True
            self._pages.clear()
