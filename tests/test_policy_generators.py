"""The three workload generators: deterministic from their seed, and each with the shape it promises."""

from __future__ import annotations

import glob
import io
import os
import re

import pytest

from ufsgmem.policy import generators
from ufsgmem.policy.generators import generate
from ufsgmem.policy.trace import dump, load

from test_policy_model import PAGE, PageModel

SIZE = 256 << 20
EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "traces")


def text(trace) -> str:
    out = io.StringIO()
    dump(trace, out)
    return out.getvalue()


@pytest.mark.parametrize("workload", generators.WORKLOADS)
def test_same_seed_same_trace_other_seed_other_trace(workload):
    a = generate(workload, SIZE, seed=7, records=1500)
    assert text(a) == text(generate(workload, SIZE, seed=7, records=1500))
    assert text(a) != text(generate(workload, SIZE, seed=8, records=1500))
    assert len(a) == 1500 and a.size == SIZE


@pytest.mark.parametrize("workload", generators.WORKLOADS)
def test_record_count_does_not_grow_with_the_size(workload):
    assert len(generate(workload, 1 << 40, seed=1, records=800)) == 800


def test_cc_converts_a_few_large_ranges_early_and_keeps_a_few_shared_windows():
    trace = generate("cc", SIZE, seed=3, records=3000)
    converts = [(i, r) for i, r in enumerate(trace.records) if r.op == "convert"]
    assert trace.records[0] == ("convert", 0, SIZE, "shared"), "boot: the whole file starts shared"
    assert len(converts) <= 1 + (4 + 1) * 4, "few conversions"
    assert max(i for i, _ in converts) < 30, "all conversions happen early"
    to_private = [r.size for _, r in converts if r.arg == "private"]
    assert min(to_private) >= 2 << 20 and sum(to_private) >= SIZE * 0.9, "large conversions, most memory"
    model = PageModel.of(trace)
    assert model.shared_bytes == 4 * (2 << 20), "four shared windows remain (2 MiB each at 256M)"
    assert model.allocated_bytes >= SIZE * 0.9, "the guest ends up touching (almost) all its memory"
    assert not model.errors


def test_pkvm_shares_many_small_aligned_buffers_all_over_memory():
    trace = generate("pkvm", SIZE, seed=3, records=4000)
    converts = [r for r in trace.records if r.op == "convert"]
    assert len(converts) >= 0.4 * len(trace), "many conversions"
    assert {r.size for r in converts} <= {4 << 10 << k for k in range(5)}
    assert len({r.size for r in converts}) == 5, "every buffer size from 4K to 64K appears"
    assert all(r.offset % r.size == 0 for r in converts), "buffers aligned to their size"
    quarters = {r.offset * 4 // SIZE for r in converts}
    assert quarters == {0, 1, 2, 3}, "scattered over the whole file"
    model = PageModel(trace.size, trace.flags)
    peak = 0
    for record in trace.records:
        model.apply(record)
        peak = max(peak, model.shared_bytes)
    assert peak <= 64 * (64 << 10), "at most max_live buffers shared at once"
    assert model.errors.keys() == {"convert:EAGAIN"}, "only the unshare-while-pinned attempts fail"
    assert any(r.op == "pin" for r in trace.records)


def test_virtio_ring_is_a_moving_window_of_shared_slots():
    window, slot = 16, 8 << 10
    trace = generate("virtio", SIZE, seed=3, records=2000, window=window, buffer=slot)
    model = PageModel(trace.size, trace.flags)
    lows = []
    for record in trace.records:
        model.apply(record)
        if record.op == "convert" and record.arg == "private":  # the end of a steady-state step
            pages = sorted(model.shared)
            assert len(pages) == window * slot // PAGE, "the window keeps its size"
            assert pages[-1] - pages[0] + 1 == len(pages), "the shared slots are contiguous"
            lows.append(pages[0])
    assert len(lows) > 100
    assert all(b - a == slot // PAGE for a, b in zip(lows, lows[1:])), "the ring advances one slot a step"
    assert not model.errors


def test_virtio_ring_wraps_at_the_end_of_the_file():
    size, slot = 1 << 20, 4096
    trace = generate("virtio", size, records=2000, window=8, buffer=slot, start=size - 4 * slot)
    heads = [r.offset for r in trace.records if r.op == "convert" and r.arg == "shared"]
    assert heads[:5] == [size - 4 * slot, size - 3 * slot, size - 2 * slot, size - slot, 0]
    assert not PageModel.of(trace).errors


@pytest.mark.parametrize("workload, params, words", [
    ("nope", {}, "unknown workload"),
    ("cc", {"colour": 1}, "no parameter 'colour'"),
    ("virtio", {"window": 10_000_000}, "window * buffer"),
    ("pkvm", {"min_buffer": 12288}, "powers of two"),
])
def test_bad_generator_arguments_are_refused(workload, params, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        generate(workload, SIZE, records=10, **params)


def test_sizes_below_the_minimum_are_refused():
    with pytest.raises(ValueError, match="at least 1M"):
        generate("cc", 64 << 10)


def test_the_example_traces_are_valid_and_regenerate_byte_for_byte():
    paths = sorted(glob.glob(os.path.join(EXAMPLES, "*.jsonl")))
    assert {os.path.basename(p).split("-")[0] for p in paths} == set(generators.WORKLOADS)
    for path in paths:
        trace = load(path)
        h = trace.header
        again = generate(h["workload"], trace.size, seed=h["seed"], records=h["records"],
                         page_size=trace.page_size, **{k: v for k, v in h["params"].items()})
        with open(path) as f:
            assert f.read() == text(again), f"{path} is not what its header regenerates"
