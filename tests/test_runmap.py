"""RunMap against the obvious model: a Python list with one value per page.

Every query of the run map must agree with the list, every update must leave the map canonical (sorted,
strictly increasing starts, no equal neighbours: ``RunMap.check``), and the metadata must cost exactly
two 8-byte words per run, whatever the number of pages (the P5 budget is 128 bytes per run).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ufsgmem.runmap import RunMap


def model_runs(values: list[int], start: int = 0, end: int | None = None) -> list[tuple[int, int, int]]:
    """The maximal runs of ``values[start:end]`` as (start, end, value)."""
    end = len(values) if end is None else end
    runs: list[tuple[int, int, int]] = []
    for page in range(start, end):
        if runs and runs[-1][1] == page and runs[-1][2] == values[page]:
            runs[-1] = (runs[-1][0], page + 1, values[page])
        else:
            runs.append((page, page + 1, values[page]))
    return runs


def assert_matches(rm: RunMap, values: list[int]) -> None:
    rm.check()
    assert list(rm.runs()) == model_runs(values)
    assert len(rm) == len(model_runs(values)), "runs must always be merged"
    assert [rm.value_at(p) for p in range(len(values))] == values
    assert rm.metadata_bytes() == 16 * len(rm), "a run costs two 8-byte words"


# --- plain cases -------------------------------------------------------------------------------------

def test_new_map_is_one_run():
    rm = RunMap(10, 7)
    assert list(rm.runs()) == [(0, 10, 7)]
    assert len(rm) == 1
    assert rm.metadata_bytes() == 16
    rm.check()


@pytest.mark.parametrize("npages", [0, -1])
def test_empty_map_is_refused(npages):
    with pytest.raises(ValueError):
        RunMap(npages)


def test_set_splits_and_merges_back():
    rm, model = RunMap(16, 0), [0] * 16
    for start, end, value in [(4, 8, 1), (8, 12, 1), (0, 4, 1), (12, 16, 1), (5, 6, 0), (5, 6, 1)]:
        rm.set(start, end, value)
        model[start:end] = [value] * (end - start)
        assert_matches(rm, model)
    assert list(rm.runs()) == [(0, 16, 1)], "setting everything to one value leaves a single run"


def test_set_in_the_middle_of_a_run_makes_three_runs():
    rm = RunMap(9, 0)
    rm.set(3, 6, 8)
    assert list(rm.runs()) == [(0, 3, 0), (3, 6, 8), (6, 9, 0)]
    assert rm.metadata_bytes() == 3 * 16


def test_add_counts_and_merges():
    rm, model = RunMap(8, 0), [0] * 8
    for start, end, delta in [(0, 4, 1), (2, 6, 1), (2, 6, -1), (0, 4, -1), (7, 8, 3), (0, 8, 0)]:
        rm.add(start, end, delta)
        for p in range(start, end):
            model[p] += delta
        assert_matches(rm, model)
    assert list(rm.runs()) == [(0, 7, 0), (7, 8, 3)]


def test_empty_updates_change_nothing():
    rm = RunMap(8, 0)
    rm.set(2, 5, 1)
    before = rm.as_arrays()
    rm.set(3, 3, 9)
    rm.add(4, 4, 2)
    rm.add(0, 8, 0)
    assert rm.as_arrays() == before


def test_runs_are_clipped_to_the_query():
    rm = RunMap(12, 0)
    rm.set(2, 5, 1)
    rm.set(8, 12, 2)
    assert list(rm.runs(3, 9)) == [(3, 5, 1), (5, 8, 0), (8, 9, 2)]
    assert list(rm.runs(4, 4)) == []
    assert list(rm.runs(11)) == [(11, 12, 2)]


def test_queries():
    rm = RunMap(10, 0)
    rm.set(3, 6, 8)
    assert rm.is_uniform(3, 6, 8)
    assert not rm.is_uniform(3, 7, 8)
    assert not rm.is_uniform(2, 6, 8)
    assert rm.is_uniform(0, 3, 0)
    assert rm.is_uniform(5, 5, 99), "an empty range is vacuously uniform"
    assert rm.first(0, 10, lambda v: v == 8) == 3
    assert rm.first(4, 10, lambda v: v == 8) == 4, "first() clips to the query start"
    assert rm.first(6, 10, lambda v: v == 8) is None
    assert rm.count(8) == 3
    assert rm.count(0) == 7
    assert rm.count(8, 4, 9) == 2
    assert rm.count(1) == 0


@pytest.mark.parametrize("start, end", [(-1, 2), (0, 11), (5, 4), (11, 12)])
def test_out_of_range_is_refused_and_changes_nothing(start, end):
    rm = RunMap(10, 0)
    rm.set(2, 4, 1)
    before = rm.as_arrays()
    for call in (lambda: rm.set(start, end, 1), lambda: rm.add(start, end, 1),
                 lambda: list(rm.runs(start, end)), lambda: rm.is_uniform(start, end, 0),
                 lambda: rm.count(0, start, end)):
        with pytest.raises(ValueError):
            call()
    assert rm.as_arrays() == before


@pytest.mark.parametrize("page", [-1, 10])
def test_value_at_outside_is_refused(page):
    with pytest.raises(ValueError):
        RunMap(10).value_at(page)


def test_as_arrays_is_a_copy():
    rm = RunMap(4, 0)
    starts, values = rm.as_arrays()
    starts.append(2)
    values[0] = 5
    assert list(rm.runs()) == [(0, 4, 0)]


def test_check_catches_broken_invariants():
    rm = RunMap(8, 0)
    rm.set(2, 4, 1)
    rm._internals()[1][0][1] = 0  # equal neighbours: no longer canonical
    with pytest.raises(AssertionError):
        rm.check()
    rm = RunMap(8, 0)
    rm.set(2, 4, 1)
    rm._internals()[0][0][1] = 9  # a run starting past the end
    with pytest.raises(AssertionError):
        rm.check()


def test_metadata_is_per_run_not_per_page():
    big = RunMap(1 << 28, 8)  # the page count of a 1 TiB file
    for i in range(1000):
        big.set(i * 1000, i * 1000 + 1, 0)
    big.check()
    assert len(big) == 2000
    assert big.metadata_bytes() == 2000 * 16
    assert big.count(0) == 1000


# --- property test against the list model ------------------------------------------------------------

@st.composite
def operations(draw):
    npages = draw(st.integers(1, 40))
    page = st.integers(0, npages)
    ops = []
    for _ in range(draw(st.integers(0, 30))):
        a, b = sorted((draw(page), draw(page)))
        if draw(st.booleans()):
            ops.append(("set", a, b, draw(st.integers(0, 3))))
        else:
            ops.append(("add", a, b, draw(st.integers(-2, 2))))
    return npages, draw(st.integers(0, 3)), ops


@settings(max_examples=300, deadline=None)
@given(operations(), st.data())
def test_runmap_matches_list_model(case, data):
    npages, initial, ops = case
    rm, model = RunMap(npages, initial), [initial] * npages
    for op, start, end, value in ops:
        apply(rm, model, op, start, end, value)
    # queries on random sub-ranges
    for _ in range(5):
        a = data.draw(st.integers(0, npages))
        b = data.draw(st.integers(a, npages))
        v = data.draw(st.integers(-2, 5))
        assert list(rm.runs(a, b)) == model_runs(model, a, b)
        assert rm.is_uniform(a, b, v) == all(x == v for x in model[a:b])
        assert rm.count(v, a, b) == model[a:b].count(v)
        expected_first = next((p for p in range(a, b) if model[p] >= v), None)
        assert rm.first(a, b, lambda x: x >= v) == expected_first


# --- chunk edges -------------------------------------------------------------------------------------
# RunMap keeps its runs in chunks of at most CHUNK_RUNS runs (512); these subclasses shrink the chunks so
# that a few dozen pages cross many chunk edges, and every test above runs against the same list model.

class TinyRunMap(RunMap):
    __slots__ = ()
    CHUNK_RUNS = 4


class SmallRunMap(RunMap):
    __slots__ = ()
    CHUNK_RUNS = 8


def alternating(cls, npages: int, width: int = 1) -> tuple[RunMap, list[int]]:
    """A map (and its model) whose value flips every ``width`` pages: npages / width runs."""
    rm, model = cls(npages, 0), [0] * npages
    for start in range(width, npages, 2 * width):
        end = min(start + width, npages)
        rm.set(start, end, 1)
        model[start:end] = [1] * (end - start)
    return rm, model


def chunks(rm: RunMap) -> int:
    return len(rm._internals()[0])


def apply(rm: RunMap, model: list[int], op: str, start: int, end: int, value: int) -> None:
    if op == "set":
        rm.set(start, end, value)
        model[start:end] = [value] * (end - start)
    else:
        rm.add(start, end, value)
        for p in range(start, end):
            model[p] += value
    assert_matches(rm, model)
    assert rm.as_arrays()[0].tolist() == [s for s, _, _ in model_runs(model)]
    for v in set(model) | {value, -7}:
        assert rm.count(v) == model.count(v), "whole-map count comes from the kept page counts"


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
def test_many_runs_split_chunks_within_bounds(cls):
    rm, model = alternating(cls, 300)
    assert_matches(rm, model)
    assert len(rm) == 300
    assert chunks(rm) >= 300 // cls.CHUNK_RUNS, "300 runs cannot fit in fewer chunks"
    assert all(cls.CHUNK_RUNS // 4 <= len(c) <= cls.CHUNK_RUNS for c in rm._internals()[0])


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
@pytest.mark.parametrize("start, end", [(3, 97), (0, 50), (50, 100), (17, 18), (16, 24), (1, 99)])
def test_set_spanning_several_chunks(cls, start, end):
    for value in (0, 1, 2):
        rm, model = alternating(cls, 100)
        apply(rm, model, "set", start, end, value)


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
def test_add_spanning_several_chunks_and_back(cls):
    rm, model = alternating(cls, 120, width=3)
    apply(rm, model, "add", 6, 108, 2)
    assert len(rm) == 120 // 3, "adding to whole runs keeps them distinct, no split, no merge"
    apply(rm, model, "add", 5, 110, 3)
    assert len(rm) == 120 // 3 + 2, "a range inside two runs splits each of them once"
    apply(rm, model, "add", 5, 110, -3)
    apply(rm, model, "add", 6, 108, -2)
    apply(rm, model, "add", 0, 120, 1)
    apply(rm, model, "add", 0, 120, -1)
    assert rm.as_arrays() == alternating(cls, 120, width=3)[0].as_arrays()


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
def test_merges_across_chunk_edges(cls):
    rm, model = alternating(cls, 80)
    c = 1
    while c < chunks(rm):  # the first run of each chunk merges with the last run of the chunk before
        edge = rm._internals()[2][c]
        apply(rm, model, "set", edge, edge + 1, rm.value_at(edge - 1))
        c += 1
    rm, model = alternating(cls, 80)
    while chunks(rm) > 1:  # fill the run just before the second chunk's edge: three runs become one
        edge = rm._internals()[2][1]
        apply(rm, model, "set", edge - 1, edge, rm.value_at(edge))
    assert len(rm) <= cls.CHUNK_RUNS


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
def test_deleting_down_to_one_run(cls):
    rm, model = alternating(cls, 200)
    for start in range(0, 200, 10):  # chip away chunk by chunk, from the front
        apply(rm, model, "set", 0, start + 10, 0)
    assert list(rm.runs()) == [(0, 200, 0)] and chunks(rm) == 1
    rm, model = alternating(cls, 200)
    apply(rm, model, "set", 0, 200, 5)  # all at once
    assert list(rm.runs()) == [(0, 200, 5)] and chunks(rm) == 1
    assert rm.count(5) == 200 and rm.count(0) == 0 and rm.count(1) == 0
    rm, model = alternating(cls, 200)
    for start in range(190, -10, -10):  # from the back
        apply(rm, model, "set", start, 200, 1)
    assert list(rm.runs()) == [(0, 200, 1)] and chunks(rm) == 1


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap])
def test_queries_across_chunk_edges(cls):
    rm, model = alternating(cls, 90, width=2)
    for a in range(0, 91, 7):
        for b in range(a, 91, 11):
            assert list(rm.runs(a, b)) == model_runs(model, a, b)
            assert rm.count(1, a, b) == model[a:b].count(1)
            assert rm.is_uniform(a, b, 1) == all(x == 1 for x in model[a:b])
            assert rm.first(a, b, lambda v: v == 1) == next((p for p in range(a, b) if model[p] == 1), None)


def test_check_catches_broken_chunks():
    rm, _ = alternating(TinyRunMap, 40)
    cv = rm._internals()[1]
    cv[2][0] = cv[1][-1]  # equal neighbours across a chunk edge
    with pytest.raises(AssertionError):
        rm.check()
    rm, _ = alternating(TinyRunMap, 40)
    rm._internals()[2][2] += 1  # the chunk index no longer matches the chunk
    with pytest.raises(AssertionError):
        rm.check()
    rm, _ = alternating(TinyRunMap, 40)
    counts = rm._internals()[3]  # (value, pages) pairs
    counts[counts.tolist()[::2].index(1) * 2 + 1] += 1  # a page count out of step with the runs
    with pytest.raises(AssertionError):
        rm.check()


def test_footprint_stays_near_the_payload():
    """The honest memory figure, array headers and index included, at 20 000 runs of default chunks."""
    rm = RunMap(20_000 * 13_000, 0)  # about the page count of a 1 TiB file
    for start in range(13_000, 20_000 * 13_000, 26_000):
        rm.set(start, start + 13_000, 1)
    rm.check()
    assert len(rm) == 20_000
    assert rm.metadata_bytes() == 16 * 20_000
    assert rm.metadata_bytes() <= rm.footprint_bytes() <= 24 * len(rm), "well under 128 bytes per run"


@settings(max_examples=300, deadline=None)
@given(operations(), st.data(), st.sampled_from([TinyRunMap, SmallRunMap]))
def test_chunked_runmap_matches_list_model(case, data, cls):
    npages, _, ops = case
    rm, model = alternating(cls, npages, width=data.draw(st.integers(1, 4)))
    for op, start, end, value in ops:
        apply(rm, model, op, start, end, value)
    for _ in range(5):
        a = data.draw(st.integers(0, npages))
        b = data.draw(st.integers(a, npages))
        v = data.draw(st.integers(-2, 5))
        assert list(rm.runs(a, b)) == model_runs(model, a, b)
        assert rm.is_uniform(a, b, v) == all(x == v for x in model[a:b])
        assert rm.count(v, a, b) == model[a:b].count(v)


@pytest.mark.parametrize("cls", [TinyRunMap, SmallRunMap, RunMap])
def test_long_runs_of_small_updates_match_the_model(cls):
    """What conversions do: many 1-3 page updates, each inside one run, taking the in-place paths (split,
    shrink, merge into a neighbour), across chunk edges for the small-chunk maps."""
    import random
    rng = random.Random(5)
    for _ in range(40):
        npages = rng.randint(1, 80)
        rm, model = cls(npages, 0), [0] * npages
        for _ in range(150):
            start = rng.randrange(npages)
            end = min(npages, start + rng.choice([1, 1, 1, 2, 3, 10]))
            if rng.random() < 0.8:
                value = rng.randint(0, 2)
                rm.set(start, end, value)
                model[start:end] = [value] * (end - start)
            else:
                delta = rng.randint(-1, 1)
                rm.add(start, end, delta)
                model[start:end] = [v + delta for v in model[start:end]]
            rm.check()
            assert list(rm.runs()) == model_runs(model)
            a = rng.randrange(npages)
            b = rng.randint(a, npages)
            assert rm.first(a, b, lambda v: v == 1) == next((p for p in range(a, b) if model[p] == 1), None)


# --- the C-backed API: comparisons in C, copies, wrapping ----------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(1, 120), st.lists(st.tuples(st.booleans(), st.integers(0, 120), st.integers(0, 120),
                                               st.integers(-2, 3)), max_size=40), st.data())
def test_tiny_chunks_new_queries_match_the_model(npages, ops, data):
    """Random set/add on a map of 4-run chunks, check() after every step, and the queries added with the C
    map (first_eq/ne/gt, arrays, count_runs) against the list model."""
    rm, model = TinyRunMap(npages, 0), [0] * npages
    for adding, a, b, value in ops:
        a, b = sorted((a % (npages + 1), b % (npages + 1)))
        apply(rm, model, "add" if adding else "set", a, b, value)
        a = data.draw(st.integers(0, npages))
        b = data.draw(st.integers(a, npages))
        v = data.draw(st.integers(-2, 4))
        pages = range(a, b)
        assert rm.first_eq(a, b, v) == next((p for p in pages if model[p] == v), None)
        assert rm.first_ne(a, b, v) == next((p for p in pages if model[p] != v), None)
        assert rm.first_gt(a, b, v) == next((p for p in pages if model[p] > v), None)
        assert rm.first(a, b, lambda x: x < v) == next((p for p in pages if model[p] < v), None)
        expected = model_runs(model, a, b)
        assert rm.count_runs(a, b) == len(expected)
        starts, values = rm.arrays(a, b)
        assert (starts.tolist(), values.tolist()) == ([s for s, _, _ in expected], [v for _, _, v in expected])


def test_wrap_shares_the_map_and_keeps_its_owner():
    rm = RunMap(64, 0)
    rm.set(8, 16, 1)
    view = RunMap.wrap(rm.address, rm)
    assert view.address == rm.address and view.npages == 64
    view.set(20, 30, 2)  # one map: a change through either is seen by both
    assert list(rm.runs()) == list(view.runs()) == [(0, 8, 0), (8, 16, 1), (16, 20, 0), (20, 30, 2), (30, 64, 0)]
    del rm  # the wrapper holds the owner: the map stays valid
    assert view.count(2) == 10
    view.check()


def test_an_add_past_64_bits_is_refused_and_changes_nothing():
    rm = RunMap(16, 0)
    rm.set(4, 8, 1)
    before = rm.as_arrays()
    with pytest.raises(OverflowError):
        rm.add(0, 16, (1 << 63) - 1)
    assert rm.as_arrays() == before
    rm.check()


def test_runs_are_read_in_pieces():
    """More runs than one read from C holds: the pieces join without a gap or a repeat."""
    rm = RunMap(50_000, 0)
    for page in range(1, 50_000, 2):
        rm.set(page, page + 1, 1)
    runs = list(rm.runs(3, 49_998))
    assert len(runs) == 49_995 and runs[0] == (3, 4, 1) and runs[-1] == (49_997, 49_998, 1)
    assert all(e == s2 for (_, e, _), (s2, _, _) in zip(runs, runs[1:]))
