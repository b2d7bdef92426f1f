"""Differential conformance: every case on the real kernel guest_memfd (/dev/kvm) and on ufsgmem.

Each case must agree with the kernel, be a documented deviation (``ufsgmem/conformance/deviations.py``) or,
for the v8 conversion rules this kernel cannot run, match the results design §7.3 (docs/design.md) expects.
Nothing else may differ, and a listed deviation that agrees fails too. Two implementations are compared:

* a real ufsgmem mount (the ``fuse_mount`` fixture of ``fusefix``), the product;
* the in-process core, which runs everywhere and covers the rules it models (no file: n/a otherwise).

``docs/compat.md`` is generated from the mount run; the last test regenerates it and fails if the
committed file differs.
"""

from __future__ import annotations

import os

import pytest

from ufsgmem import kvm
from ufsgmem.conformance import report, runner
from ufsgmem.conformance.cases import CASES, Case, by_name
from ufsgmem.conformance.deviations import Deviation
from ufsgmem.conformance.subjects import CoreSubject, KernelSubject, MountSubject

from fusefix import fuse_mount, requires_fuse  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(kvm.skip_reason() is not None,
                                                   reason=f"no kernel reference: {kvm.skip_reason()}")]

COMPAT_MD = os.path.join(os.path.dirname(__file__), "..", "docs", "compat.md")
IDS = [c.name for c in CASES]


def _explain(v: runner.Verdict) -> str:
    return f"{v.case.name}: {v.why}\n  kernel:  {v.kernel}\n  subject: {v.other}"


@pytest.fixture(scope="module")
def core_verdicts():
    return {v.case.name: v for v in runner.run(CoreSubject, "core", KernelSubject)}


@pytest.fixture(scope="module")
def mount_verdicts(fuse_mount):
    # the fixture also checks, at the end of the module, that the server lived and logged no traceback
    verdicts = runner.run(lambda: MountSubject(fuse_mount.path), "ufsgmem", KernelSubject)
    leftovers = sorted(set(os.listdir(fuse_mount.path)) - {"ctl"})
    assert not leftovers, f"cases left files behind on the mount: {leftovers}"
    return verdicts


@pytest.mark.parametrize("name", IDS)
def test_core_matches_kernel(core_verdicts, name):
    v = core_verdicts[name]
    assert v.ok, _explain(v)


@pytest.mark.fuse
@requires_fuse
@pytest.mark.parametrize("name", IDS)
def test_mount_matches_kernel(mount_verdicts, name):
    v = {v.case.name: v for v in mount_verdicts}[name]
    assert v.ok, _explain(v)
    assert v.verdict != "n/a", f"{name} must run on the mount: {v.other}"


@pytest.mark.fuse
@requires_fuse
def test_compat_md_is_a_fresh_run(mount_verdicts):
    with open(COMPAT_MD) as f:
        committed = f.read()
    assert committed == report.render(mount_verdicts), (
        "docs/compat.md differs from a fresh differential run: "
        "regenerate it with `python -m ufsgmem.conformance --write docs/compat.md`")


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
