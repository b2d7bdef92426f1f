"""Replays, the report and the ``ufsgmem policy`` command, on the core with real and fake backends.

``fakesim`` is a small stand-in with the shape of the ``sim`` backend (no memory, huge page sizes,
options): registered through ``ufsgmem.plugins.register`` so these tests do not depend on another
plugin's details. It keeps only which pages are allocated, with physical address = offset + 4 GiB.
"""

from __future__ import annotations

import json
import sys

import pytest

from ufsgmem import plugins
from ufsgmem.backend import Backend, PhysExtent
from ufsgmem.cli import main
from ufsgmem.errors import PluginError
from ufsgmem.policy import report
from ufsgmem.policy.generators import generate
from ufsgmem.policy.replay import VIEWS, BackendSpec, replay
from ufsgmem.policy.trace import Record, Trace, save
from ufsgmem.runmap import RunMap
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, PAGE_SHIFT, SZ_1G, SZ_2M, SZ_4K

from test_policy_model import PageModel, assert_replay_matches_model, random_trace

PHYS = 4 << 30


class FakeSim(Backend):
    name = "fakesim"
    page_sizes = (SZ_4K, SZ_2M, SZ_1G)
    last_options: dict = {}

    def __init__(self, size, page_size, *, progress=None, fragmentation=0.0, **options):
        super().__init__(size, page_size, progress=progress, **options)
        FakeSim.last_options = {"fragmentation": fragmentation, **options}
        self._pages = RunMap(size >> PAGE_SHIFT, 0)

    def view(self, offset, size):
        return memoryview(bytes(size))

    def write(self, offset, data):
        pass

    def allocate(self, offset, size):
        self._pages.set(offset >> PAGE_SHIFT, (offset + size) >> PAGE_SHIFT, 1)

    def punch_hole(self, offset, size):
        self._pages.set(offset >> PAGE_SHIFT, min(offset + size, self.size) >> PAGE_SHIFT, 0)

    def physical_extents(self):
        return [PhysExtent(s << PAGE_SHIFT, PHYS + (s << PAGE_SHIFT), (e - s) << PAGE_SHIFT)
                for s, e, v in self._pages.runs() if v]

    def backend_bytes(self):
        return self._pages.count(1) << PAGE_SHIFT

    def close(self):
        pass


@pytest.fixture(autouse=True)
def fakesim():
    plugins.register(plugins.BACKENDS, "fakesim", FakeSim)
    yield FakeSim
    plugins.unregister(plugins.BACKENDS, "fakesim")


def layout_available() -> bool:
    try:
        import ufsgmem.layout  # noqa: F401
    except ImportError:
        return False
    return True


# --- backend specs ---------------------------------------------------------------------------------
def test_a_backend_spec_carries_options_and_the_page_size():
    spec = BackendSpec.parse("sim:fragmentation=0.25,page_size=2M,seed=7,chunk=1G,name=buddy,warm=true")
    assert (spec.name, spec.page_size) == ("sim", SZ_2M)
    assert spec.options == {"fragmentation": 0.25, "seed": 7, "chunk": SZ_1G, "name": "buddy", "warm": True}
    assert BackendSpec.parse("anon") == BackendSpec("anon", "anon", {}, None)


@pytest.mark.parametrize("text", ["", "sim:frag", "sim:=3", "bad name", "sim:page_size=huge"])
def test_a_malformed_backend_spec_is_refused(text):
    with pytest.raises(ValueError):
        BackendSpec.parse(text)


def test_options_reach_the_backend(fakesim):
    replay(random_trace(0, records=5), "fakesim:fragmentation=0.5,colour=blue", with_layout=False)
    assert fakesim.last_options == {"fragmentation": 0.5, "colour": "blue"}


def test_an_unknown_backend_lists_the_available_ones():
    with pytest.raises(PluginError, match="available: .*anon"):
        replay(random_trace(0, records=5), "nosuch")


# --- replay agrees with the trace's meaning --------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("spec, folio", [("fakesim", SZ_4K), ("fakesim:page_size=2M", SZ_2M)])
def test_fakesim_replay_of_random_traces_matches_the_page_model(seed, spec, folio):
    assert_replay_matches_model(random_trace(seed, size=32 << 20), spec, folio)


@pytest.mark.parametrize("workload", ["cc", "pkvm", "virtio"])
@pytest.mark.parametrize("spec, folio", [("anon", SZ_4K), ("fakesim:page_size=2M", SZ_2M)])
def test_workload_replays_end_where_the_trace_says(workload, spec, folio):
    assert_replay_matches_model(generate(workload, 128 << 20, seed=2, records=1500), spec, folio)


def test_errors_are_counted_by_op_and_errno():
    records = [
        Record("convert", 0, 2 * SZ_2M, "shared"),
        Record("pin", 0, SZ_4K),
        Record("convert", 0, SZ_2M, "private"),       # pinned page: EAGAIN
        Record("convert", 0, SZ_2M, "private"),       # again
        Record("unpin", SZ_4K, SZ_4K),                # not pinned: EINVAL
        Record("touch", 3 * SZ_2M, SZ_4K, ("host", False)),  # private: SIGBUS
        Record("punch", SZ_4K, SZ_4K),                # not aligned to the 2M folio: EINVAL
        Record("pin", 3 * SZ_2M, SZ_4K),              # private: EFAULT
        Record("unpin", 0, SZ_4K),
        Record("convert", 0, SZ_2M, "private"),       # now fine
    ]
    trace = Trace("errs", "", 8 << 20, GUEST_MEMFD_FLAG_MMAP, None, records)
    result = replay(trace, "fakesim:page_size=2M", with_layout=False)
    assert result.errors == {"convert:EAGAIN": 2, "pin:EFAULT": 1, "punch:EINVAL": 1, "touch:SIGBUS": 1,
                             "unpin:EINVAL": 1}
    assert result.error_count == 6 and result.conversions == 4
    assert result.final["shared_bytes"] == SZ_2M
    assert result.final["huge_folios"] == {"whole": 1, "split": 0}, "the pin allocated folio 0 only"


def test_a_create_the_backend_refuses_is_a_failed_run_not_a_crash():
    trace = Trace("hugeinit", "", 8 << 20, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED, None, [])
    result = replay(trace, "fakesim:page_size=2M")
    assert result.failure and "init_shared" in result.failure
    assert "FAILED" in report.table([result])


def test_the_trace_page_size_is_used_where_the_backend_offers_it():
    trace = generate("virtio", 2 << 30, records=50, page_size=SZ_2M)
    assert replay(trace, "fakesim", with_layout=False).page_size == SZ_2M
    assert replay(trace, "anon", with_layout=False).page_size == SZ_4K, "anon has only 4K: its default"
    assert replay(trace, "fakesim:page_size=1G", with_layout=False).page_size == SZ_1G, "the policy wins"


def test_samples_follow_the_replay():
    trace = generate("virtio", 64 << 20, records=1000, window=8)
    result = replay(trace, "fakesim:page_size=2M", sample_every=100, with_layout=False)
    assert [s["record"] for s in result.samples] == list(range(0, 1001, 100))
    assert result.samples[0]["allocated_bytes"] == 0
    assert result.samples[-1]["shared_bytes"] == result.final["shared_bytes"] == 8 * SZ_4K
    assert [s["conversions"] for s in result.samples] == sorted(s["conversions"] for s in result.samples)
    assert max(s["folios_split"] for s in result.samples) >= 1


# --- S2 layout -------------------------------------------------------------------------------------
@pytest.mark.skipif(not layout_available(), reason="ufsgmem.layout is not in this tree yet")
@pytest.mark.parametrize("workload", ["cc", "pkvm", "virtio"])
def test_s2_blocks_cover_the_memory_each_view_maps(workload):
    trace = generate(workload, 128 << 20, seed=4, records=1500)
    result = replay(trace, "fakesim:page_size=2M", layout_every=500)
    assert result.layout is not None, result.layout_note
    model = PageModel.of(trace, SZ_2M)
    covered = {view: sum(size * n for size, n in result.layout[view].items()) for view in VIEWS}
    assert covered["guest"] == covered["kvm"] == model.allocated_bytes
    assert covered["shared"] == len(model.shared & model.allocated) * SZ_4K
    assert sum(result.layout["guest"].values()) <= sum(result.layout["kvm"].values()), \
        "the guest view ignores attributes, so it never needs more blocks than KVM's"
    assert [s["record"] for s in result.layout_samples] == [500, 1000, 1500]
    assert set(result.layout_levels) == set(VIEWS)


def test_without_the_layout_module_the_report_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "ufsgmem.layout", None)  # import now raises ImportError
    result = replay(generate("virtio", 64 << 20, records=100), "fakesim")
    assert result.layout is None and "ufsgmem.layout" in result.layout_note
    assert "ufsgmem.layout" in report.table([result])


# --- TiB scale -------------------------------------------------------------------------------------
@pytest.mark.parametrize("workload", ["cc", "pkvm", "virtio"])
def test_a_tebibyte_replay_keeps_state_proportional_to_the_records(workload):
    """At 1 TiB (2^28 pages) the core keeps runs: metadata follows the records, never the size."""
    trace = generate(workload, 1 << 40, seed=1, records=1000)
    result = replay(trace, "fakesim:page_size=2M", with_layout=False)
    assert result.failure is None
    assert set(result.errors) <= {"convert:EAGAIN"}, "only pKVM's deliberate unshare-while-pinned fails"
    assert result.final["attribute_runs"] <= 2 * len(trace) + 1
    assert result.final["metadata_bytes"] <= 16 * 3 * (2 * len(trace) + 3)
    if workload == "virtio":
        assert result.final["shared_bytes"] == 64 * SZ_4K


# --- report and command ----------------------------------------------------------------------------
def test_the_table_json_and_plots_describe_every_run(tmp_path):
    traces = [generate(w, 64 << 20, seed=1, records=600) for w in ("cc", "pkvm")]
    runs = [replay(t, spec) for t in traces for spec in ("anon", "fakesim:page_size=2M")]
    text = report.table(runs)
    for run in runs:
        assert f"{run.trace}  " in text and run.backend in text
    assert ("S2 blocks per size" in text) == layout_available()
    data = json.loads(report.to_json(runs))
    assert [r["backend"] for r in data["runs"]] == ["anon", "fakesim:page_size=2M"] * 2
    assert all(r["conversions_per_second"] > 0 for r in data["runs"])
    paths = report.plot(runs, str(tmp_path / "plots"))
    assert sorted(p.rsplit("/", 1)[1] for p in paths) == sorted(report.PLOTS)
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_the_command_generates_replays_and_writes_every_output(tmp_path, capsys):
    traces = []
    for workload in ("cc", "pkvm", "virtio"):
        path = str(tmp_path / f"{workload}.jsonl")
        assert main(["policy", "generate", workload, "--size", "64M", "--records", "400", "--seed", "5",
                     "-o", path]) == 0
        traces.append(path)
    assert main(["policy", "validate", *traces]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["policy", "run", *traces, "--backend", "anon", "--backend", "fakesim:page_size=2M",
                 "--json", str(out / "report.json"), "--plots", str(out), "--table", str(out / "table.txt")])
    assert code == 0
    stdout = capsys.readouterr().out
    assert (out / "table.txt").read_text() == stdout
    assert len(json.loads((out / "report.json").read_text())["runs"]) == 6
    assert all((out / name).stat().st_size > 1000 for name in report.PLOTS)


def test_the_command_names_the_bad_line_of_a_trace(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    save(generate("virtio", 64 << 20, records=20), str(path))
    lines = path.read_text().splitlines()
    lines[9] = lines[9].replace('"shared"', '"open"').replace('"private"', '"open"').replace('"host"', '"vm"')
    path.write_text("\n".join(lines) + "\n")
    assert main(["policy", "validate", str(path)]) == 1
    assert f"{path}:10: " in capsys.readouterr().err
    assert main(["policy", "run", str(path), "--backend", "anon"]) == 2
    assert f"{path}:10: " in capsys.readouterr().err


def test_the_command_refuses_an_unknown_backend_before_replaying(tmp_path, capsys):
    path = str(tmp_path / "t.jsonl")
    save(generate("virtio", 64 << 20, records=20), path)
    assert main(["policy", "run", path, "--backend", "anon", "--backend", "nosuch", "-q"]) == 1
    captured = capsys.readouterr()
    assert "unknown backend 'nosuch'" in captured.err and captured.out == ""


@pytest.mark.skipif(not layout_available(), reason="ufsgmem.layout is not in this tree yet")
def test_the_command_refuses_an_unknown_arch_and_labels_levels(tmp_path, capsys):
    path = str(tmp_path / "t.jsonl")
    save(generate("pkvm", 64 << 20, records=200), path)
    assert main(["policy", "run", path, "--backend", "fakesim", "--arch", "sparc", "-q"]) == 2
    assert "unknown arch 'sparc'" in capsys.readouterr().err
    assert main(["policy", "run", path, "--backend", "fakesim:page_size=2M", "--arch", "arm64-4k", "-q"]) == 0
    assert "4K L3" in capsys.readouterr().out


# --- the real sim backend at 1 TiB -----------------------------------------------------------------
def sim_installed() -> bool:
    return "sim" in plugins.available(plugins.BACKENDS)


@pytest.mark.skipif(not sim_installed(), reason="the sim backend plugin is not installed")
@pytest.mark.parametrize("workload", ["cc", "pkvm", "virtio"])
def test_sim_replays_every_workload_at_one_tebibyte_with_its_layout(workload):
    trace = generate(workload, 1 << 40, seed=1, records=2000)
    result = replay(trace, "sim:page_size=2M")
    assert result.failure is None
    allocated = result.final["allocated_bytes"]
    assert allocated == result.final["backend_bytes"]
    assert allocated >= (1 << 40) - trace.counts()["punch"] * SZ_2M, "preallocated, less the balloon"
    if layout_available():
        covered = {v: sum(size * n for size, n in result.layout[v].items()) for v in VIEWS}
        assert covered["guest"] == covered["kvm"] == allocated
        assert covered["shared"] == result.final["shared_bytes"]
    if workload == "virtio":
        assert result.final["shared_bytes"] == 64 * SZ_4K
