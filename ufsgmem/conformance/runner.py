"""Run every case on a subject, compare it with the kernel's observation (live or recorded), judge each pair.

The kernel's side comes from a *reference*: :class:`LiveKernel` runs the case on the live kernel
guest_memfd (a fresh default VM through ``/dev/kvm``); a :class:`~ufsgmem.conformance.record.Record`
returns what a kernel was recorded doing. Where a live kernel is compared, the record can be given too,
and each case where the live kernel no longer does what was recorded carries a ``kernel_change``.

Verdicts:

* ``agree`` — same observation (for a subject judged against another's list, e.g. ``run`` against the
  mount's, a listed deviation it must remove agrees, and the verdict's ``why`` says it removes it);
* ``deviation`` — a listed :class:`~ufsgmem.conformance.deviations.Deviation`; the keys it does not name
  still agree;
* ``v8`` — a conversion rule this kernel cannot run: the subject matches the expected observation the case
  records (design §7.3);
* ``n/a`` — the subject has no way to do what the case needs (the in-process core has no file);
* ``unrecorded`` — the record has no kernel observation for the case (it says why); the subject's
  observation is shown, and a crash still fails;
* ``FAIL`` — anything else: an unlisted difference, a stale deviation, a v8 mismatch, or a case that
  raised. The tests fail on any FAIL.

Every case runs on fresh subjects (a new VM, new files), so cases cannot leak state into each other.
A record entry that knows only some keys of an observation (``known_keys``) is compared on exactly
those keys, and the verdict's ``reference`` says so.
"""

from __future__ import annotations

import functools
import os
import traceback
from dataclasses import dataclass
from typing import Callable

from .cases import CASES, Case
from .deviations import BY_SUBJECT, REMOVED_BY_SUBJECT, Deviation
from .record import Entry, Record, live_capabilities
from .subjects import KernelSubject, NotApplicable, Subject

NA = "n/a"


@dataclass
class Verdict:
    case: Case
    kernel: dict | str
    other: dict | str
    verdict: str  # agree | deviation | v8 | n/a | unrecorded | FAIL
    why: str = ""
    reference: str = ""  # what the kernel column is: "live 6.18.44" or "record 6.18.44 (2026-11-29)"
    kernel_change: str = ""  # live reference only: how the live kernel differs from the record
    recorded: dict | str | None = None  # live reference only: the record's observation

    @property
    def ok(self) -> bool:
        return self.verdict != "FAIL"


def observe(case: Case, factory: Callable[[], Subject]) -> dict | str:
    """The case's observation on a fresh subject, ``n/a`` if it lacks a capability, or an error dict."""
    with factory() as subject:
        if not case.needs <= subject.capabilities:
            return f"{NA} (no {', '.join(sorted(case.needs - subject.capabilities))})"
        try:
            return case.run(subject)
        except NotApplicable as exc:
            return f"{NA} ({exc})"
        except Exception as exc:  # a crash is a result the tests must see, not hide
            return {"raised": f"{type(exc).__name__}: {exc}",
                    "where": traceback.extract_tb(exc.__traceback__)[-1].name}


class LiveKernel:
    """The live kernel as a reference: each case runs on fresh subjects from ``factory``."""

    kind = "live"

    def __init__(self, factory: Callable[[], Subject] = KernelSubject, release: str | None = None):
        self.factory = factory
        self.release = release or os.uname().release

    @property
    def label(self) -> str:
        return f"live {self.release}"


    @functools.cached_property
    def capabilities(self) -> dict[str, int]:
        return live_capabilities()

    def entry(self, case: Case) -> Entry:
        return Entry(observe(case, self.factory))


Reference = LiveKernel | Record


def _known(observation, keys):
    """The part of ``observation`` a partial record entry can be compared with."""
    if keys is None or not isinstance(observation, dict):
        return observation
    return {k: observation[k] for k in keys if k in observation}


REMOVES = "removes the mount's deviation"


def judge(case: Case, kernel, other, deviations: dict[str, Deviation],
          known_keys: tuple[str, ...] | None = None, removed: dict[str, Deviation] | None = None) -> Verdict:
    """The verdict on ``other`` against the kernel's observation ``kernel`` (None: none is known).

    With ``known_keys`` (a partial record entry) only those keys of both observations are compared, and
    a keyed deviation only over the keys among them. ``removed``: another subject's listed deviations
    this one must not have (it agrees there, or fails)."""
    if known_keys is not None and isinstance(kernel, dict) and isinstance(other, dict):
        deviation = deviations.get(case.name)
        if deviation is not None and deviation.keys is not None:
            keys = tuple(k for k in deviation.keys if k in known_keys)
            deviations = {case.name: Deviation(deviation.reason, keys)} if keys else {}
        verdict = judge(case, _known(kernel, known_keys), _known(other, known_keys), deviations, removed=removed)
        verdict.other = other
        return verdict
    gone = (removed or {}).get(case.name)
    if gone is not None and kernel is not None and not (isinstance(other, str) and other.startswith(NA)):
        if kernel == other:
            return Verdict(case, kernel, other, "agree", f"{REMOVES}: {gone.run}")
        return Verdict(case, kernel, other, "FAIL", f"documented as a deviation this subject removes ({gone.run}), "
                       "but it differs")
    deviation = deviations.get(case.name)
    if isinstance(other, str) and other.startswith(NA):
        return Verdict(case, kernel, other, "n/a" if deviation is None else "FAIL",
                       "" if deviation is None else "listed deviation of a case that does not run")
    if case.v8 is not None:
        if other == case.v8:
            return Verdict(case, kernel, other, "v8", "kernel 6.18 has no KVM_SET_MEMORY_ATTRIBUTES2 "
                           "(in-place conversion, v8); ufsgmem matches the results design §7.3 expects")
        return Verdict(case, kernel, other, "FAIL", f"differs from the v8 expectation {case.v8}")
    if kernel is None:
        if isinstance(other, dict) and "raised" in other:
            return Verdict(case, kernel, other, "FAIL", "raised")
        return Verdict(case, kernel, other, "unrecorded", "the record has no kernel observation for this case")
    if kernel == other:
        if deviation is not None:
            return Verdict(case, kernel, other, "FAIL", "listed as a deviation but agrees: remove the entry")
        return Verdict(case, kernel, other, "agree")
    if deviation is None:
        return Verdict(case, kernel, other, "FAIL", "differs and is not a documented deviation")
    if deviation.keys is not None:
        if not (isinstance(kernel, dict) and isinstance(other, dict)):
            return Verdict(case, kernel, other, "FAIL", "a keyed deviation needs two observations")
        rest = [k for k in set(kernel) | set(other) if k not in deviation.keys and kernel.get(k) != other.get(k)]
        if rest:
            return Verdict(case, kernel, other, "FAIL", f"differs outside the deviation: {sorted(rest)}")
        same = [k for k in deviation.keys if kernel.get(k) == other.get(k)]
        if same:
            return Verdict(case, kernel, other, "FAIL", f"deviation keys that agree (stale): {same}")
    return Verdict(case, kernel, other, "deviation", deviation.reason)


def kernel_change(recorded: Entry, live) -> str:
    """How the live kernel's observation differs from the record's ("" if it does not)."""
    if recorded.observation is None:
        return f"the record has no observation ({recorded.unrecovered}); the live kernel has one"
    seen = _known(live, recorded.known_keys)
    if seen == recorded.observation:
        return ""
    if isinstance(seen, dict) and isinstance(recorded.observation, dict):
        keys = sorted(k for k in set(seen) | set(recorded.observation) if seen.get(k) != recorded.observation.get(k))
        return f"differs from the record in {keys}"
    return "differs from the record"


def reference_cell(reference: Reference, entry: Entry) -> str:
    if entry.known_keys is not None:
        return f"{reference.label}, keys {', '.join(entry.known_keys)} only"
    return reference.label


def run(other_factory: Callable[[], Subject], other_name: str, reference: Reference,
        cases: list[Case] = CASES, record: Record | None = None) -> list[Verdict]:
    """Judge every case of ``other_factory``'s subjects against ``reference``; with a live reference and
    a ``record``, also mark each case where the live kernel differs from the record."""
    return _judge_all(lambda c: observe(c, other_factory), other_name, reference, cases, record)


def judge_observations(observed: dict[str, dict | str], other_name: str, reference: Reference,
                       cases: list[Case] = CASES, record: Record | None = None) -> list[Verdict]:
    """As :func:`run`, for observations made elsewhere (by case name: the ``run`` subject's child)."""
    return _judge_all(lambda c: observed[c.name], other_name, reference, cases, record)


def _judge_all(observation: Callable[[Case], dict | str], other_name: str, reference: Reference,
               cases: list[Case], record: Record | None) -> list[Verdict]:
    deviations = BY_SUBJECT.get(other_name, {})
    removed = REMOVED_BY_SUBJECT.get(other_name)
    verdicts = []
    for c in cases:
        expected = reference.entry(c)
        v = judge(c, expected.observation, observation(c), deviations, expected.known_keys, removed)
        v.reference = reference_cell(reference, expected)
        if expected.unrecovered is not None and v.verdict == "unrecorded":
            v.why = f"no kernel observation: {expected.unrecovered}"
        if record is not None and reference.kind == "live":
            v.recorded = record.entry(c).observation
            v.kernel_change = kernel_change(record.entry(c), expected.observation)
        verdicts.append(v)
    return verdicts
