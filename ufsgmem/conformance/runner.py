"""Run every case on the kernel and on another subject, and judge each pair.

Verdicts:

* ``agree`` — same observation;
* ``deviation`` — a listed :class:`~ufsgmem.conformance.deviations.Deviation`; the keys it does not name
  still agree;
* ``v8`` — a conversion rule this kernel cannot run: the subject matches the expected observation the case
  records (design §7.3);
* ``n/a`` — the subject has no way to do what the case needs (the in-process core has no file);
* ``FAIL`` — anything else: an unlisted difference, a stale deviation, a v8 mismatch, or a case that
  raised. The tests fail on any FAIL.

Every case runs on fresh subjects (a new VM, new files), so cases cannot leak state into each other.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Callable

from .cases import CASES, Case
from .deviations import BY_SUBJECT, Deviation
from .subjects import NotApplicable, Subject

NA = "n/a"


@dataclass
class Verdict:
    case: Case
    kernel: dict | str
    other: dict | str
    verdict: str  # agree | deviation | v8 | n/a | FAIL
    why: str = ""

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


def judge(case: Case, kernel, other, deviations: dict[str, Deviation]) -> Verdict:
    deviation = deviations.get(case.name)
    if isinstance(other, str) and other.startswith(NA):
        return Verdict(case, kernel, other, "n/a" if deviation is None else "FAIL",
                       "" if deviation is None else "listed deviation of a case that does not run")
    if case.v8 is not None:
        if other == case.v8:
            return Verdict(case, kernel, other, "v8", "kernel 6.18 has no KVM_SET_MEMORY_ATTRIBUTES2 "
                           "(in-place conversion, v8); ufsgmem matches the results design §7.3 expects")
        return Verdict(case, kernel, other, "FAIL", f"differs from the v8 expectation {case.v8}")
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


def run(other_factory: Callable[[], Subject], other_name: str, kernel_factory: Callable[[], Subject],
        cases: list[Case] = CASES) -> list[Verdict]:
    deviations = BY_SUBJECT.get(other_name, {})
    return [judge(c, observe(c, kernel_factory), observe(c, other_factory), deviations) for c in cases]
