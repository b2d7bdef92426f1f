"""Repetitions, medians and spreads: how every benchmark figure is summarised.

A figure is the median of several repetitions (robust to one slow run on a shared 2-core machine) with
the spread shown as min..max, next to the reference measured in the same run, and the ratio between them.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Series:
    """Raw repetitions of one measurement, in ``unit``."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def spread(self) -> tuple[float, float]:
        return (min(self.values), max(self.values)) if self.values else (float("nan"),) * 2

    def as_dict(self) -> dict:
        lo, hi = self.spread
        return {"name": self.name, "unit": self.unit, "median": self.median, "min": lo, "max": hi,
                "repetitions": list(self.values)}


@dataclass
class Figure:
    """One benchmark result: ``value`` beside the ``reference`` it is compared with."""

    id: str
    title: str
    value: Series
    reference: Series | None
    target: str
    #: "lower" when a smaller value is better (latency), "higher" for throughput.
    better: str = "lower"
    note: str = ""
    met: bool | None = None

    @property
    def ratio(self) -> float | None:
        if self.reference is None or not self.reference.values or self.reference.median == 0:
            return None
        return self.value.median / self.reference.median

    def as_dict(self) -> dict:
        d = {
            "title": self.title, "value": self.value.median, "unit": self.value.unit,
            "reference": self.reference.median if self.reference else None,
            "reference_name": self.reference.name if self.reference else None,
            "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note,
            "raw": {"value": self.value.as_dict(), "reference": self.reference.as_dict() if self.reference else None},
        }
        return d


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit == "s":
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.3g} s"
    if unit == "B":
        for scale, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value:.0f} B"
    return f"{value:.3g} {unit}"
