"""Long results rendered as they are read (``ufsgmem/pagedtext.py``): every byte at every offset is the byte
the whole text has there (``json.dumps`` for snapshots, ``protocol.format_runs`` for ``get_attributes``),
and what a result holds is its arrays, not its text."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from ufsgmem import protocol
from ufsgmem.gmem import GuestMemfd
from ufsgmem.pagedtext import BLOCK, decimal_lengths, hex_lengths
from ufsgmem.snapshot import Snapshot
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE

PS = 4096
int64s = st.integers(-(1 << 63), (1 << 63) - 1)


def same_bytes(text, whole: bytes, data) -> None:
    """``text`` is ``whole``: read whole, and at offsets and sizes drawn around block edges and the end."""
    assert len(text) == len(whole)
    assert text[0:len(text)] == whole
    for _ in range(20):
        offset = data.draw(st.integers(0, len(whole) + 3))
        size = data.draw(st.one_of(st.integers(0, 64), st.integers(0, 3 * len(whole) // 2 + 1)))
        assert text.read(offset, size) == whole[offset:offset + size], (offset, size)
    assert text[len(whole):] == b""


@given(st.lists(int64s, max_size=50))
def test_lengths_are_those_of_the_text(values):
    a = np.array(values, dtype=np.int64)
    assert decimal_lengths(a).tolist() == [len(str(v)) for v in values]
    positive = np.abs(a[a >= 0])
    assert hex_lengths(positive).tolist() == [len(f"{v:#x}") for v in positive.tolist()]


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(0, 3 * BLOCK + 5), st.integers(0, 2 * BLOCK + 3), st.integers(0, 4),
       st.integers(0, 3), st.one_of(st.none(), st.tuples(int64s, int64s, int64s)), st.text(max_size=8))
def test_a_snapshot_reads_as_its_json(data, runs, extents, splits, pins, memslot, name):
    rng = np.random.default_rng(runs * 7 + extents)
    starts = np.concatenate([[0], np.sort(rng.choice(1 << 40, runs, replace=False)) * PS]) if runs else [0]
    snap = Snapshot.build(
        size=1 << 60, flags=3, backend="anon", folio_size=2 << 20, attr_starts=starts,
        attr_private=rng.random(len(starts)) < 0.5,
        extents=rng.integers(-(1 << 63), (1 << 63) - 1, size=(extents, 3), dtype=np.int64),
        split_folios=np.arange(splits) << 21, pins=[(i * PS, PS, i + 1) for i in range(pins)], memslot=memslot,
        meta={"name": name})
    same_bytes(snap.json_text(), snap.to_json().encode(), data)


@settings(max_examples=40, deadline=None)
@given(st.data(), st.lists(st.tuples(st.integers(0, 2047), st.integers(1, 3), st.booleans()), max_size=1500))
def test_get_attributes_reads_as_its_result(data, conversions):
    gm = GuestMemfd(2048 * PS, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, backend="sim")
    for page, pages, private in conversions:
        pages = min(pages, 2048 - page)
        gm.set_memory_attributes(page * PS, pages * PS, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0)
    first = data.draw(st.integers(0, 2047))
    size = data.draw(st.integers(1, 2048 - first)) * PS
    whole = protocol.ok_result(None, protocol.format_runs(gm.get_attributes(first * PS, size)))
    bounds, private = gm.attribute_arrays(first * PS, size)
    assert gm.attribute_runs(first * PS, size) == len(private)
    same_bytes(protocol.attributes_result(bounds, private), whole, data)


def test_a_long_result_holds_its_arrays_not_its_text():
    """100 000 runs: ~9 bytes a run held (boundary and flag, the index and one block), against ~24 bytes
    a run of text; reading it to the end caches one block, not the text."""
    runs = 100_000
    bounds = np.arange(runs + 1, dtype=np.int64) * (1 << 30)
    private = np.arange(runs) % 2 == 1
    text = protocol.attributes_result(bounds, private)
    assert len(text) > 24 * runs
    held = text.held_bytes()
    assert held < 9.2 * runs, held
    pos = 0
    while chunk := text.read(pos, 128 << 10):
        pos += len(chunk)
    assert pos == len(text)
    assert len(text._cached[2]) <= held - 9 * runs
