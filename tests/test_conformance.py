"""Differential conformance: every case on ufsgmem, compared with the kernel's guest_memfd.

The kernel's side is the kept record (``ufsgmem/conformance/records/``) on every machine, and also the
live kernel where this machine's kernel has guest_memfd; then the live kernel is checked against the
record too, and a kernel change fails. No case waits for a kernel: on a machine without guest_memfd
every case runs against the record.

Each case must agree with the kernel, be a documented deviation (``ufsgmem/conformance/deviations.py``)
or, for the v8 conversion rules the recorded kernel cannot run, match the results design §7.3
(docs/design.md) expects.
Nothing else may differ, and a listed deviation that agrees fails too. Two implementations are compared:

* a real ufsgmem mount (the ``fuse_mount`` fixture of ``fusefix``), the product;
* the in-process core, which runs everywhere and covers the rules it models (no file: n/a otherwise).

``docs/compat.md`` is generated from the mount run against the record, with the same cases run as a
program under ``ufsgmem run`` (``tests/test_run.py`` judges that subject case by case); a test regenerates
it and fails if the committed file differs. The record itself is tested: it covers every case, it round-trips
(recording a subject gives the format that loads), and an altered entry is reported as a difference.
"""

from __future__ import annotations

import copy
import os

import pytest

from ufsgmem import kvm
from ufsgmem.conformance import record as records
from ufsgmem.conformance import report, runner, transcribe, under_run
from ufsgmem.conformance.__main__ import main as conformance_main
from ufsgmem.conformance.cases import CASES, Case, by_name
from ufsgmem.conformance.deviations import Deviation
from ufsgmem.conformance.record import Entry, Record
from ufsgmem.conformance.subjects import GUEST, CoreSubject, MountSubject, vm_unavailable_reason

from fusefix import requires_fuse

LIVE_REASON = kvm.skip_reason()  # None: this kernel has guest_memfd, and it is compared too
REFERENCES = ["record"] + (["live"] if LIVE_REASON is None else [])
COMPAT_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "compat.md")
IDS = [c.name for c in CASES]


def _explain(v: runner.Verdict) -> str:
    return f"{v.case.name} against {v.reference}: {v.why}\n  kernel:  {v.kernel}\n  subject: {v.other}"


@pytest.fixture(scope="module")
def kept_record() -> Record:
    return records.select(os.uname().release if LIVE_REASON is None else None)  # as the CLI chooses


class Runs:
    """Verdicts per reference kind ("record", "live"), each run once per module when first asked for."""

    def __init__(self, factory, name, kept_record):
        self.factory, self.name, self.record, self._runs = factory, name, kept_record, {}

    def reference(self, kind):
        return self.record if kind == "record" else runner.LiveKernel()

    def __call__(self, kind) -> list[runner.Verdict]:
        if kind not in self._runs:
            self._runs[kind] = runner.run(self.factory, self.name, self.reference(kind),
                                          record=self.record if kind == "live" else None)
        return self._runs[kind]

    def by_name(self, kind) -> dict[str, runner.Verdict]:
        return {v.case.name: v for v in self(kind)}


@pytest.fixture(scope="module")
def core_runs(kept_record):
    return Runs(CoreSubject, "core", kept_record)


@pytest.fixture(scope="module")
def run_runs(kept_record):
    """The cases under ``ufsgmem run`` (one child, observed once), judged per reference kind."""
    observed = under_run.observe_all()
    runs = Runs(None, "run", kept_record)
    for kind in REFERENCES:
        runs._runs[kind] = runner.judge_observations(observed, "run", runs.reference(kind),
                                                     record=kept_record if kind == "live" else None)
    return runs


@pytest.fixture(scope="module")
def mount_runs(fuse_mount, kept_record):
    # the fixture also checks, at the end of the module, that the server lived and logged no traceback
    runs = Runs(lambda: MountSubject(fuse_mount.path), "ufsgmem", kept_record)
    yield runs
    leftovers = sorted(set(os.listdir(fuse_mount.path)) - {"ctl"})
    assert not leftovers, f"cases left files behind on the mount: {leftovers}"


@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("reference", REFERENCES)
def test_core_matches_kernel(core_runs, reference, name):
    v = core_runs.by_name(reference)[name]
    assert v.ok, _explain(v)
    assert v.verdict != "unrecorded", _explain(v)


@pytest.mark.fuse
@requires_fuse
@pytest.mark.parametrize("name", IDS)
@pytest.mark.parametrize("reference", REFERENCES)
def test_mount_matches_kernel(mount_runs, reference, name):
    v = mount_runs.by_name(reference)[name]
    assert v.ok, _explain(v)
    assert v.verdict != "unrecorded", _explain(v)
    if v.verdict == "n/a" and GUEST in v.case.needs and vm_unavailable_reason():
        pytest.skip(f"{name} needs a vCPU: {vm_unavailable_reason()}")
    assert v.verdict != "n/a", f"{name} must run on the mount: {v.other}"


@pytest.mark.fuse
@requires_fuse
def test_compat_md_is_a_fresh_run(mount_runs, kept_record, request):
    """The committed page is the mount (and the cases under ``ufsgmem run``) compared with the record
    (every machine with KVM can check that); where a live kernel is compared, a page generated against it
    is fresh too."""
    if vm_unavailable_reason():
        pytest.skip(f"the vCPU cases cannot run on the mount here: {vm_unavailable_reason()}")
    if under_run.unavailable_reason():
        pytest.skip(f"the page's ufsgmem run column cannot be made here: {under_run.unavailable_reason()}")
    run_runs = request.getfixturevalue("run_runs")
    with open(COMPAT_MD) as f:
        committed = f.read()
    fresh = {kind: report.render(mount_runs(kind), "ufsgmem", mount_runs.reference(kind),
                                 kept_record if kind == "live" else None, run=run_runs(kind)) for kind in REFERENCES}
    assert committed in fresh.values(), (
        "docs/compat.md differs from a fresh differential run against the record: regenerate it with "
        "`python -m ufsgmem.conformance --reference record --write docs/compat.md`")


@pytest.mark.fuse
@requires_fuse
def test_mount_observations_round_trip_through_a_record(mount_runs, tmp_path):
    """Every observation a mount produces survives a record file unchanged (SIGBUS, byte runs, errnos)."""
    made = Record("test", "2026-12-07", "x86_64", {}, {"method": "recorded", "source": "test", "notes": []},
                  {v.case.name: Entry(v.other) for v in mount_runs("record")})
    made.save(tmp_path / "mount.json")
    assert records.load(tmp_path / "mount.json").entries == made.entries


if LIVE_REASON is None:  # collected only where there is a live kernel to compare: never a skip
    @pytest.mark.kvm
    def test_live_kernel_matches_record(core_runs, kept_record):
        changes = [v for v in core_runs("live") if v.kernel_change]
        assert not changes, (
            f"the live kernel differs from the {kept_record.label} (kernel changes; record this kernel with "
            "`python -m ufsgmem.conformance --record`):\n"
            + "\n".join(f"{v.case.name}: {v.kernel_change}\n  recorded: {v.recorded}\n  live: {v.kernel}"
                        for v in changes))


# --- the record --------------------------------------------------------------------------------------
def test_every_record_covers_exactly_the_cases():
    kept = records.available()
    assert kept, "no kernel record is kept"
    for r in kept:
        assert set(r.entries) == set(IDS), (
            f"{r.path}: entries without a case {sorted(set(r.entries) - set(IDS))}, cases without an entry "
            f"{sorted(set(IDS) - set(r.entries))} (record again, or add the case with `unrecovered`)")
        assert r.provenance.get("method") in ("recorded", "transcribed") and r.provenance.get("source"), r.path
        for name, e in r.entries.items():
            assert e.observation is not None or e.unrecovered, f"{r.path}: {name} has neither"


def test_committed_page_shows_the_record(kept_record):
    """The kernel column of docs/compat.md reads back as the record: the page shows what was compared."""
    with open(COMPAT_MD) as f:
        shown = transcribe.kernel_column(f.read())
    assert {n: e.observation for n, e in shown.items()} == {n: e.observation for n, e in kept_record.entries.items()}


def test_record_round_trips(tmp_path):
    """Recording a subject gives the format that loads, and the subject agrees with its own record."""
    made = records.capture(CoreSubject, release="6.99.0-test", date="2026-12-07",
                           capabilities={"KVM_CAP_GUEST_MEMFD": 1},
                           provenance={"method": "recorded", "source": "test", "notes": []})
    assert set(made.entries) == set(IDS)
    made.save(tmp_path / "core.json")
    loaded = records.load(tmp_path / "core.json")
    assert loaded.to_json() == made.to_json()
    assert loaded.label == "record 6.99.0-test (2026-12-07)"
    verdicts = runner.run(CoreSubject, "core-itself", loaded)  # no deviations: it must agree everywhere
    assert {v.verdict for v in verdicts} == {"agree", "n/a", "v8"}, [_explain(v) for v in verdicts if not v.ok]
    assert all(v.reference == loaded.label for v in verdicts)


def test_record_without_a_live_kernel_is_refused_or_made(tmp_path, capsys):
    target = tmp_path / "live.json"
    status = conformance_main(["--record", str(target)])
    if LIVE_REASON is not None:
        assert status == 2 and not target.exists()
        assert "unavailable" in capsys.readouterr().err
    else:
        assert status == 0 and set(records.load(target).entries) == set(IDS)


def _altered(kept: Record, name: str, key: str, value: str) -> Record:
    altered = Record.from_json(copy.deepcopy(kept.to_json()), "altered")
    assert key in altered.entries[name].observation
    altered.entries[name].observation[key] = value
    return altered


@pytest.mark.parametrize("name, key, value, why", [
    ("fallocate_modes[0]", "0", "EINVAL", "differs and is not a documented deviation"),
    ("create_huge_sizes", "0x10000000000", "ENOMEM", "differs outside the deviation"),
])
def test_altered_record_entry_is_a_difference(kept_record, name, key, value, why):
    """The comparison with the record can fail: one altered entry, and that case (only) fails."""
    case = by_name()[name]
    assert runner.run(CoreSubject, "core", kept_record, cases=[case])[0].verdict in ("agree", "deviation")
    v = runner.run(CoreSubject, "core", _altered(kept_record, name, key, value), cases=[case])[0]
    assert v.verdict == "FAIL" and v.why.startswith(why), _explain(v)


@pytest.mark.fuse
@requires_fuse
def test_altered_record_entry_fails_the_mount(fuse_mount, kept_record):
    case = by_name()["fstat_mode"]
    v = runner.run(lambda: MountSubject(fuse_mount.path), "ufsgmem", _altered(kept_record, case.name, "mode", "0o644"),
                   cases=[case])[0]
    assert v.verdict == "FAIL" and v.kernel["mode"] == "0o644" and v.other["mode"] == "0o600", _explain(v)


class StandInLive(runner.LiveKernel):
    """A live kernel that does what the record says except in one case: the kernel-change path, tested on
    machines without guest_memfd."""

    def __init__(self, kept: Record, name: str, key: str, value: str):
        super().__init__(release="6.18.99-stand-in")
        self.kept, self.changed = kept, _altered(kept, name, key, value)

    capabilities = {"KVM_CAP_GUEST_MEMFD": 1}

    def entry(self, case):
        return Entry(self.changed.entry(case).observation)


def test_kernel_change_is_reported(kept_record):
    live = StandInLive(kept_record, "fallocate_modes[mmap]", "INSERT_RANGE", "EINVAL")
    verdicts = runner.run(CoreSubject, "core", live, record=kept_record)
    changed = [v for v in verdicts if v.kernel_change]
    assert [v.case.name for v in changed] == ["fallocate_modes[mmap]"]
    assert changed[0].kernel_change == "differs from the record in ['INSERT_RANGE']"
    assert changed[0].verdict == "FAIL"  # the core still does what 6.18 did: against this kernel, it differs
    page = report.render(verdicts, "core", live, kept_record)
    assert "## Kernel changes" in page and "live 6.18.99-stand-in; **kernel change**" in page
    printed = report.console(verdicts, kept_record)
    assert "KERNEL CHANGE fallocate_modes[mmap]: differs from the record in ['INSERT_RANGE']" in printed
    assert printed.endswith(f"1 kernel changes since the {kept_record.label}")


def test_partial_entry_compares_known_keys_only():
    """A partial record entry (some keys lost) is compared on exactly the keys it knows."""
    known = ("a",)
    assert runner.judge(_case(), {"a": "ok"}, {"a": "ok", "b": "anything"}, {}, known).verdict == "agree"
    assert runner.judge(_case(), {"a": "ok"}, {"a": "EINVAL", "b": "ok"}, {}, known).verdict == "FAIL"
    assert runner.judge(_case(), {"a": "ok"}, {"b": "ok"}, {}, known).verdict == "FAIL"  # a key went missing
    keyed = {"demo": Deviation("why", keys=("a", "b"))}
    assert runner.judge(_case(), {"a": "ok"}, {"a": "X", "b": "Y"}, keyed, known).verdict == "deviation"
    partial = Record("6.99", "2026-12-07", "x86_64", {}, {}, {"fstat_mode": Entry({"mode": "0o600"}, ("mode",))})
    v = runner.run(CoreSubject, "core", partial, cases=[by_name()["fstat_mode"]])[0]
    assert v.reference == "record 6.99 (2026-12-07), keys mode only"


def test_unrecovered_entry_is_visible_and_still_runs(tmp_path):
    """A case the record knows nothing about is not skipped: the subject runs, its verdict says why."""
    gap = Record("6.99", "2026-12-07", "x86_64", {}, {"method": "transcribed", "source": "test", "notes": []},
                 {"fallocate_modes[0]": Entry(None, unrecovered="lost in transcription")})
    gap.save(tmp_path / "gap.json")
    loaded = records.load(tmp_path / "gap.json")
    for name, why in [("fallocate_modes[0]", "lost in transcription"), ("fallocate[0]", "no entry for this case")]:
        v = runner.run(CoreSubject, "core", loaded, cases=[by_name()[name]])[0]
        assert v.verdict == "unrecorded" and why in v.why and v.other["allocate whole" if "modes" not in name
                                                                      else "0"] in ("ok", "EOPNOTSUPP")
        assert "unrecorded" in report.render([v], "core", loaded)
    boom = Case("boom", "test", "raises", lambda s: 1 / 0)
    assert runner.judge(boom, None, runner.observe(boom, CoreSubject), {}).verdict == "FAIL"


def test_a_malformed_record_is_refused():
    good = records.select().to_json()
    for broken, message in [({**good, "format": 99}, "format 99"),
                            ({**good, "cases": {"x": {"observation": None}}}, "must say why"),
                            ({**good, "cases": {"x": {"observation": {"a": "1"}, "known_keys": ["b"]}}},
                             "known_keys")]:
        with pytest.raises(records.RecordError, match=message):
            Record.from_json(broken)


# --- the judge itself: a difference that is not listed, or a stale listing, must fail -------------------
def _case(v8=None):
    return Case("demo", "test", "a demo case", lambda s: {}, v8=v8)


def test_unlisted_difference_fails():
    assert runner.judge(_case(), {"a": "ok"}, {"a": "EINVAL"}, {}).verdict == "FAIL"


def test_listed_deviation_that_agrees_is_stale():
    v = runner.judge(_case(), {"a": "ok"}, {"a": "ok"}, {"demo": Deviation("why")})
    assert v.verdict == "FAIL" and "remove the entry" in v.why


def test_keyed_deviation_only_covers_its_keys():
    deviations = {"demo": Deviation("why", keys=("a",))}
    assert runner.judge(_case(), {"a": "ok", "b": "ok"}, {"a": "X", "b": "ok"}, deviations).verdict == "deviation"
    assert runner.judge(_case(), {"a": "ok", "b": "ok"}, {"a": "X", "b": "Y"}, deviations).verdict == "FAIL"
    assert runner.judge(_case(), {"a": "ok", "b": "ok"}, {"a": "ok", "b": "Y"}, deviations).verdict == "FAIL"


def test_a_removed_deviation_must_agree():
    """A subject judged against another's list (run against the mount's) must agree where it removes an
    entry: agreeing is the verdict ``agree`` saying so, still differing fails."""
    removed = {"demo": Deviation("why", run="how")}
    v = runner.judge(_case(), {"a": "ENXIO"}, {"a": "ENXIO"}, {}, removed=removed)
    assert v.verdict == "agree" and v.why == f"{runner.REMOVES}: how"
    v = runner.judge(_case(), {"a": "ENXIO"}, {"a": "ok"}, {}, removed=removed)
    assert v.verdict == "FAIL" and "removes (how), but it differs" in v.why


def test_page_says_why_run_did_not_run(kept_record):
    """Where ``ufsgmem run`` cannot work, the page says why in its section and column, never fails."""
    verdicts = runner.run(CoreSubject, "core", kept_record, cases=CASES[:2])
    page = report.render(verdicts, "core", kept_record, run="/dev/kvm is absent (a reason)")
    assert "## Under `ufsgmem run`\n\nNot run here: /dev/kvm is absent (a reason).\n" in page
    assert page.count("| not run |") == 2 and "under `ufsgmem run` |" in page


def test_v8_rows_compare_with_the_reference():
    assert runner.judge(_case(v8={"x": "EINVAL"}), "n/a", {"x": "EINVAL"}, {}).verdict == "v8"
    assert runner.judge(_case(v8={"x": "EINVAL"}), "n/a", {"x": "ok"}, {}).verdict == "FAIL"


def test_a_case_that_raises_is_a_failure():
    boom = Case("boom", "test", "raises", lambda s: 1 / 0)
    observed = runner.observe(boom, CoreSubject)
    assert "ZeroDivisionError" in observed["raised"]
    assert runner.judge(boom, {"x": "ok"}, observed, {}).verdict == "FAIL"


def test_every_case_name_is_unique():
    assert len(by_name()) == len(CASES)
