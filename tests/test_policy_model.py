"""A page-set model of what a trace means, and replays checked against it.

The model knows nothing about runs, backends or the core: it keeps Python sets of 4 KiB pages (shared,
allocated) and a pin count per page, and applies the kernel's rules in their plainest form. Replaying a
trace on the core must end with the same shared, allocated and pinned bytes, the same huge-folio counts
and the same errors. The generator and replay tests import :class:`PageModel` from here.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ufsgmem.policy.replay import replay
from ufsgmem.policy.trace import Record, Trace
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP

PAGE = 4096


class PageModel:
    """The meaning of a trace, page by page (folio = allocation unit, 4 KiB unless given)."""

    def __init__(self, size: int, flags: int, folio: int = PAGE):
        self.size, self.flags, self.folio = size, flags, folio
        self.npages = size // PAGE
        self.shared = set(range(self.npages)) if flags & GUEST_MEMFD_FLAG_INIT_SHARED else set()
        self.allocated: set[int] = set()
        self.pins: Counter = Counter()
        self.errors: Counter = Counter()

    @classmethod
    def of(cls, trace: Trace, folio: int = PAGE) -> "PageModel":
        model = cls(trace.size, trace.flags, folio)
        for record in trace.records:
            model.apply(record)
        return model

    def _pages(self, offset: int, size: int) -> range:
        return range(offset // PAGE, (offset + size) // PAGE)

    def _allocate(self, pages: range) -> None:
        step = self.folio // PAGE
        first, last = pages.start - pages.start % step, -(-pages.stop // step) * step
        self.allocated.update(range(first, min(last, self.npages)))

    def apply(self, r: Record) -> None:
        pages = self._pages(r.offset, r.size)
        if r.op == "convert":
            if r.arg == "shared":
                self.shared.update(pages)
            elif any(p in self.shared for p in pages):  # not a no-op
                if any(self.pins[p] for p in pages):
                    self.errors["convert:EAGAIN"] += 1
                else:
                    self.shared.difference_update(pages)
        elif r.op == "touch":
            who, _ = r.arg
            if who == "host" and (not self.flags & GUEST_MEMFD_FLAG_MMAP or
                                  any(p not in self.shared for p in pages)):
                self.errors["touch:SIGBUS"] += 1
            else:
                self._allocate(pages)
        elif r.op == "pin":
            if any(p not in self.shared for p in pages):
                self.errors["pin:EFAULT"] += 1
            else:
                self._allocate(pages)
                for p in pages:
                    self.pins[p] += 1
        elif r.op == "unpin":
            if any(not self.pins[p] for p in pages):
                self.errors["unpin:EINVAL"] += 1
            else:
                for p in pages:
                    self.pins[p] -= 1
        elif r.op == "punch":
            if r.offset % self.folio or r.size % self.folio:
                self.errors["punch:EINVAL"] += 1
            else:
                self.allocated.difference_update(pages)

    # --- what the replay reports --------------------------------------------------------------------
    @property
    def shared_bytes(self) -> int:
        return len(self.shared) * PAGE

    @property
    def allocated_bytes(self) -> int:
        return len(self.allocated) * PAGE

    @property
    def pinned_bytes(self) -> int:
        return sum(1 for c in self.pins.values() if c) * PAGE

    def folios(self) -> tuple[int, int]:
        """(whole, split) allocated huge folios; (0, 0) for 4 KiB folios, as the core reports."""
        step = self.folio // PAGE
        if step == 1:
            return 0, 0
        allocated = {p // step for p in self.allocated}
        split = {p // step for p in self.shared} & allocated
        return len(allocated) - len(split), len(split)


def random_trace(seed: int, size: int = 8 << 20, records: int = 400, flags: int = GUEST_MEMFD_FLAG_MMAP) -> Trace:
    """Random records of every op, with ranges of 1–600 pages, some folio-aligned and some not."""
    rng = random.Random(seed)
    out = []
    for _ in range(records):
        op = rng.choice(["convert", "convert", "touch", "touch", "pin", "unpin", "punch"])
        if op == "punch" and rng.random() < 0.5:
            offset, length = rng.randrange(size // (2 << 20)) * (2 << 20), 2 << 20
        else:
            npages = rng.choice([1, 1, 2, 16, 512, 600])
            length = npages * PAGE
            offset = rng.randrange((size - length) // PAGE + 1) * PAGE
        arg = rng.choice(["private", "shared"]) if op == "convert" else \
            (rng.choice(["host", "guest"]), rng.random() < 0.5) if op == "touch" else None
        out.append(Record(op, offset, length, arg))
    return Trace(name=f"random-{seed}", description="random ops", size=size, flags=flags, page_size=None,
                 records=out)


def assert_replay_matches_model(trace: Trace, backend: str, folio: int) -> None:
    result = replay(trace, backend, with_layout=False)
    assert result.failure is None, result.failure
    assert result.page_size == folio
    model = PageModel.of(trace, folio)
    final = result.final
    assert final["shared_bytes"] == model.shared_bytes, "shared bytes differ from what the trace implies"
    assert final["allocated_bytes"] == model.allocated_bytes, "allocated bytes differ from the model"
    assert final["pinned_bytes"] == model.pinned_bytes
    assert (final["huge_folios"]["whole"], final["huge_folios"]["split"]) == model.folios()
    assert result.errors == dict(sorted(model.errors.items()))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("flags", [GUEST_MEMFD_FLAG_MMAP, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED])
def test_anon_replay_of_random_traces_matches_the_page_model(seed, flags):
    assert_replay_matches_model(random_trace(seed, flags=flags), "anon", PAGE)


def test_the_random_traces_exercise_every_error():
    """Guard the test above: its traces must really hit each rule, or agreeing would prove little."""
    seen = Counter()
    for seed in range(6):
        seen.update(PageModel.of(random_trace(seed)).errors)
    assert {"convert:EAGAIN", "touch:SIGBUS", "pin:EFAULT", "unpin:EINVAL"} <= set(seen), seen
    assert not PageModel.of(random_trace(0), 2 << 20).errors.keys().isdisjoint({"punch:EINVAL"})
