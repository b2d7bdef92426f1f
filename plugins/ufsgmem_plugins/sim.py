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

Cost: the placement is two numpy arrays of O(size / chunk) entries (4 MiB for 1 TiB at 2 MiB chunks, plus
a shuffled free order made on first need), allocation is a run map, assignments are vectorised: a 1 TiB
file is preallocated in well under a second. Nothing is ever kept per 4 KiB page of the file except
written data.

Data. Written pages live in a dict (page index → 4 KiB bytearray); a page never written, punched, or
overwritten with zeros reads as zeros and costs nothing, so the content rules (zero on first use, punch
zeroes, content kept across conversions) hold and the core tests run on ``sim`` too. ``view`` returns a
copy and refuses ranges above ``VIEW_CAP`` (the FUSE read path asks for a few MiB at most).

Options (keyword arguments; strings accepted, so a CLI can pass them through): ``fragmentation``
(0.0–1.0), ``seed``, ``phys_base``, ``phys_size``, ``chunk``, ``max_contiguity``, ``preallocate``
(default: when the page size is above 4 KiB, as hugetlb does).
"""

from __future__ import annotations

import errno

import numpy as np

from ufsgmem.address import format_size, parse_size
from ufsgmem.backend import Backend, PhysExtent
from ufsgmem.errors import fail
from ufsgmem.runmap import RunMap
from ufsgmem.uapi import PAGE_SHIFT, PAGE_SIZE, SZ_1G, SZ_2M, SZ_4K

VIEW_CAP = 256 << 20
OPTIONS = ("fragmentation", "seed", "phys_base", "phys_size", "chunk", "max_contiguity", "preallocate")
_ZERO_PAGE = bytes(PAGE_SIZE)


def _pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class SimBackend(Backend):
    name = "sim"
    page_sizes = (SZ_4K, SZ_2M, SZ_1G)

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
        self._pchunk = np.full(self._nfile, -1, dtype=np.int64)  # file chunk -> physical chunk
        self._used = np.zeros(self._nphys, dtype=bool)
        self._nused = 0
        self._draws = np.random.default_rng([self.seed, 0])
        self._block_home = None  # shuffled block order, made on first need
        self._free_order = None  # shuffled free-chunk order, made on first need
        self._cursor = 0
        self._freed: list[int] = []  # chunks given back, reused first (LIFO, like a free list)
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

    # --- the simulated physical allocator -----------------------------------------------------------
    def _home(self, chunks: np.ndarray) -> np.ndarray:
        if not self._block:
            return chunks
        if self._block_home is None:
            rng = np.random.default_rng([self.seed, 1])
            self._block_home = rng.permutation(self._nphys // self._block)
        return self._block_home[chunks // self._block] * self._block + chunks % self._block

    def _take_free(self, n: int) -> np.ndarray:
        """Claim ``n`` free physical chunks: recently freed ones first, then in a shuffled order."""
        taken: list[int] = []
        while self._freed and len(taken) < n:
            p = self._freed.pop()
            if not self._used[p]:  # it may have been taken again as somebody's home meanwhile
                self._used[p] = True
                taken.append(p)
        parts = [np.array(taken, dtype=np.int64)]
        need = n - len(taken)
        if need and self._free_order is None:
            self._free_order = np.random.default_rng([self.seed, 2]).permutation(self._nphys)
        # every chunk behind the cursor is in use or on the freed list, so the cursor only moves forward
        while need and self._cursor < self._nphys:
            batch = self._free_order[self._cursor:self._cursor + 2 * need + 64]
            free = np.nonzero(~self._used[batch])[0][:need]
            self._cursor += int(free[-1]) + 1 if len(free) == need else len(batch)
            got = batch[free]
            self._used[got] = True
            parts.append(got)
            need -= len(got)
        if need:  # only reachable if the bookkeeping above is wrong; fall back to a scan
            got = np.nonzero(~self._used)[0][:need]
            self._used[got] = True
            parts.append(got)
        return np.concatenate(parts)

    def _assign(self, chunks: np.ndarray) -> None:
        if len(chunks) > self._nphys - self._nused:
            raise fail(errno.ENOMEM, f"simulated memory exhausted: {len(chunks)} chunks of "
                                     f"{format_size(self.chunk)} wanted, {self._nphys - self._nused} free")
        homes = self._home(chunks)
        at_home = ~self._used[homes]
        if self.fragmentation > 0:
            at_home &= self._draws.random(len(chunks)) >= self.fragmentation
        self._pchunk[chunks[at_home]] = homes[at_home]
        self._used[homes[at_home]] = True
        rest = chunks[~at_home]
        if len(rest):
            picks = self._take_free(len(rest))
            if self.fragmentation > 0:
                picks = self._draws.permutation(picks)
            self._pchunk[rest] = picks
        self._nused += len(chunks)

    def _release(self, chunks: np.ndarray) -> None:
        chunks = chunks[self._pchunk[chunks] >= 0]
        phys = self._pchunk[chunks]
        self._used[phys] = False
        self._pchunk[chunks] = -1
        self._nused -= len(chunks)
        self._freed.extend(phys[::-1].tolist())

    # --- the Backend interface ----------------------------------------------------------------------
    def allocate(self, offset, size):
        first, last = offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT
        if self._allocated.is_uniform(first, last, 1):
            return
        c0, c1 = offset // self.chunk, -(-(offset + size) // self.chunk)
        chunks = np.arange(c0, c1, dtype=np.int64)
        self._assign(chunks[self._pchunk[c0:c1] < 0])
        self._allocated.set(first, last, 1)

    def punch_hole(self, offset, size):
        end = min(offset + size, self.size)
        first, last = offset >> PAGE_SHIFT, end >> PAGE_SHIFT
        self._allocated.set(first, last, 0)
        self._drop_pages(first, last)
        C, step = self.chunk, self.chunk >> PAGE_SHIFT
        c0, c1 = offset // C, -(-end // C)
        whole = np.arange(-(-offset // C), end // C, dtype=np.int64)
        edges = {c for c in (c0, c1 - 1) if c0 <= c < c1 and not (offset <= c * C and (c + 1) * C <= end)}
        npages = self._allocated.npages
        edges = [c for c in edges if self._allocated.is_uniform(c * step, min((c + 1) * step, npages), 0)]
        self._release(np.concatenate([whole, np.array(sorted(edges), dtype=np.int64)]))

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
        for s, e, v in self._allocated.runs():
            if not v:
                continue
            start, end = s << PAGE_SHIFT, e << PAGE_SHIFT
            c0, c1 = start // C, (end - 1) // C
            if c0 == c1:
                out.append(PhysExtent(start, base + int(self._pchunk[c0]) * C + start - c0 * C, end - start))
                continue
            phys = self._pchunk[c0:c1 + 1]
            cuts = np.concatenate(([0], np.nonzero(np.diff(phys) != 1)[0] + 1, [len(phys)])).tolist()
            for a, b in zip(cuts[:-1], cuts[1:]):
                lo, hi = max(start, (c0 + a) * C), min(end, (c0 + b) * C)
                out.append(PhysExtent(lo, base + int(phys[a]) * C + lo - (c0 + a) * C, hi - lo))
        return out

    def backend_bytes(self):
        return self._allocated.count(1) << PAGE_SHIFT

    def info(self):
        return {"phys_source": "simulated", "fragmentation": self.fragmentation, "seed": self.seed,
                "chunk": self.chunk, "phys_base": self.phys_base, "phys_size": self._nphys * self.chunk,
                "max_contiguity": self.max_contiguity, "chunks_used": self._nused,
                "stored_pages": len(self._pages), "metadata_bytes": self.metadata_bytes()}

    def metadata_bytes(self) -> int:
        order = 0 if self._free_order is None else self._free_order.nbytes
        homes = 0 if self._block_home is None else self._block_home.nbytes
        return self._pchunk.nbytes + self._used.nbytes + order + homes + self._allocated.metadata_bytes()

    def close(self):
        if not self._closed:
            self._closed = True
            self._pages.clear()
