"""Replay one trace against one backend/policy on the in-process core and measure what happens.

The core (:class:`~ufsgmem.gmem.GuestMemfd`) is the same one the FUSE mount serves, so a replay sees the
kernel's rules (alignment to the folio size, EAGAIN on pinned pages, SIGBUS on host access to private
memory) exactly as a program would, without FUSE in the way: what is compared is the *policy*, not the
transport. Accesses go through :meth:`GuestMemfd.access`, which allocates on first use but moves no
bytes, so a 1 TiB replay costs what its records cost, not what its memory would.

A backend/policy is named as ``NAME[:key=value,...]`` (:class:`BackendSpec`), e.g. ``anon``,
``thp:page_size=2M`` or ``sim:fragmentation=0.5,page_size=1G``. ``page_size`` goes to the core (the
folio size); every other option goes to the backend's constructor. Values are parsed as sizes or
numbers where they look like one, ``true``/``false`` as booleans, anything else as text.

Measured per run (:class:`RunResult`):

* a sample every ``sample_every`` records (and after create and at the end): allocated and backend
  bytes, shared bytes, huge folios whole/split, conversions so far, elapsed time;
* the S2 layout at the end (optionally also every ``layout_every`` records): block counts per size for
  the ``guest``, ``shared`` and ``kvm`` views, from :func:`ufsgmem.layout.compute_layout`;
* time spent inside conversions (conversions per second, and the median and worst single conversion:
  a run with few conversions, like ``cc``, has a rate that one slow call can swing), and the replay time of all records, which
  leaves out the time taken by sampling (``sample_seconds``) and by the final layout
  (``layout_seconds``): both cost O(runs) per call and would otherwise hide the replay's own cost;
* every failed record, counted by op and errno name (``convert:EAGAIN``); a host access to private
  memory is ``touch:SIGBUS``, the signal the process would get.

Caveat: timing is wall-clock on a shared machine; compare runs made together, not across days.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..address import format_size, parse_size
from ..errors import errname
from ..gmem import PRIVATE, SHARED, GuestMemfd, HostFault
from ..plugins import load_backend
from .trace import Trace

VIEWS = ("guest", "shared", "kvm")
#: progress(run_label, records_done, records_total)
ProgressFn = Callable[[str, int, int], None]
_NUMBER = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")


def _option_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if _NUMBER.match(text) and not re.match(r"^[+-]?\d+$", text):
        return float(text)
    try:
        return parse_size(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class BackendSpec:
    """``NAME[:key=value,...]``: a backend by registry name plus its options (the policy)."""

    text: str
    name: str
    options: dict = field(default_factory=dict)
    page_size: int | None = None

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        name, _, rest = text.partition(":")
        if not re.match(r"^[A-Za-z0-9_.-]+$", name):
            raise ValueError(f"backend spec {text!r}: expected NAME[:key=value,...]")
        options: dict = {}
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"backend spec {text!r}: option {item!r} is not key=value")
            options[key.strip()] = _option_value(value.strip())
        page_size = options.pop("page_size", None)
        if page_size is not None and (not isinstance(page_size, int) or isinstance(page_size, bool)):
            raise ValueError(f"backend spec {text!r}: page_size {page_size!r} is not a size")
        return cls(text=text, name=name, options=options, page_size=page_size)


@dataclass
class RunResult:
    """What one (trace, backend) replay did. Plain data: ``as_dict()`` is what ``--json`` writes."""

    trace: str
    workload: str
    size: int
    backend: str
    page_size: int = 0
    arch: str = "x86_64"
    records: int = 0
    ops: dict = field(default_factory=dict)
    failure: str | None = None
    replay_seconds: float = 0.0
    sample_seconds: float = 0.0
    convert_seconds: float = 0.0
    conversions: int = 0
    convert_p50_us: float = 0.0
    convert_max_us: float = 0.0
    errors: dict = field(default_factory=dict)
    samples: list = field(default_factory=list)
    final: dict = field(default_factory=dict)
    layout: dict | None = None
    layout_levels: dict = field(default_factory=dict)
    layout_note: str = ""
    layout_seconds: float = 0.0
    layout_samples: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.trace} × {self.backend}"

    @property
    def conversions_per_second(self) -> float:
        return self.conversions / self.convert_seconds if self.convert_seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["conversions_per_second"] = self.conversions_per_second
        out["error_count"] = self.error_count
        if self.layout is not None:  # JSON keys are strings; keep sizes readable and exact
            out["layout"] = {v: {format_size(s): n for s, n in c.items()} for v, c in self.layout.items()}
            out["layout_samples"] = [{"record": s["record"], **{v: {format_size(k): n for k, n in s[v].items()}
                                                               for v in VIEWS if v in s}}
                                     for s in self.layout_samples]
        return out


class LayoutUnavailable(RuntimeError):
    """ufsgmem.layout cannot be imported (not written yet, or broken)."""


def layout_counts(snapshot, arch: str = "x86_64", levels: dict | None = None) -> dict[str, dict[int, int]]:
    """Block counts per size (bytes → count) of each view of ``snapshot``; per level into ``levels``."""
    try:
        from ..layout import compute_layout
    except ImportError as exc:
        raise LayoutUnavailable(f"S2 block counts need ufsgmem.layout, which cannot be imported ({exc})") \
            from exc
    out = {}
    for view in VIEWS:
        layout = compute_layout(snapshot, view=view, arch=arch)
        out[view] = {int(size): int(n) for size, n in sorted(layout.counts_by_size().items())}
        if levels is not None:
            levels[view] = {int(lv): int(n) for lv, n in sorted(layout.counts_by_level().items())}
    return out


def effective_page_size(trace: Trace, spec: BackendSpec) -> int | None:
    """The policy's page size wins; else the trace's, if the backend offers it; else the backend's default."""
    if spec.page_size is not None:
        return spec.page_size
    offered = getattr(load_backend(spec.name), "page_sizes", ())
    return trace.page_size if trace.page_size in offered else None


def _sample(gmem: GuestMemfd, record: int, seconds: float, conversions: int) -> dict:
    status = gmem.status()
    return {"record": record, "seconds": round(seconds, 6),
            "allocated_bytes": status["allocated_bytes"], "backend_bytes": status["backend_bytes"],
            "shared_bytes": status["shared_bytes"], "folios_whole": status["huge_folios"]["whole"],
            "folios_split": status["huge_folios"]["split"], "conversions": conversions}


def _final(gmem: GuestMemfd) -> dict:
    status = gmem.status()
    keep = ("allocated_bytes", "backend_bytes", "shared_bytes", "private_bytes", "pinned_bytes",
            "huge_folios", "folio_splits", "folio_merges", "attribute_runs", "metadata_bytes", "punches",
            "conversions")
    return {k: status[k] for k in keep}


def _apply(gmem: GuestMemfd, record) -> None:
    op = record.op
    if op == "touch":
        who, write = record.arg
        gmem.access(record.offset, record.size, host=who == "host", write=write)
    elif op == "punch":
        gmem.punch_hole(record.offset, record.size)
    elif op == "pin":
        gmem.pin(record.offset, record.size)
    elif op == "unpin":
        gmem.unpin(record.offset, record.size)
    else:  # pragma: no cover - the trace parser admits no other op
        raise AssertionError(f"unexpected op {op!r}")


def replay(trace: Trace, spec: BackendSpec | str, *, sample_every: int | None = None, layout_every: int = 0,
           arch: str = "x86_64", progress: ProgressFn | None = None, with_layout: bool = True) -> RunResult:
    """Replay ``trace`` against ``spec``. A create the backend refuses is a failed run, not an exception.

    ``sample_every`` defaults to about 200 samples per run. ``layout_every`` > 0 also computes the S2
    layout every that many records (it costs O(runs) each time). An unknown backend name raises
    PluginError (listing the available ones) before anything runs.
    """
    spec = BackendSpec.parse(spec) if isinstance(spec, str) else spec
    total = len(trace.records)
    sample_every = sample_every or max(1, -(-total // 200))
    result = RunResult(trace=trace.name, workload=str(trace.header.get("workload", "")), size=trace.size,
                       backend=spec.text, arch=arch, records=total, ops=trace.counts())
    page_size = effective_page_size(trace, spec)
    result.page_size = page_size or load_backend(spec.name).page_sizes[0]
    try:
        gmem = GuestMemfd(trace.size, trace.flags, backend=spec.name, page_size=page_size,
                          backend_options=spec.options, name=trace.name)
    except (OSError, TypeError, ValueError) as exc:
        result.failure = f"create refused: {exc}"
        return result
    with gmem:
        result.page_size = gmem.folio_size
        _run(gmem, trace, result, sample_every, layout_every, arch, progress, with_layout)
    return result


class _Clock:
    """Replay time with the measuring taken out: sampling is O(runs) and must not count as replay."""

    def __init__(self):
        self.start = time.perf_counter()
        self.measuring = 0.0
        self.converting = 0.0
        self.latencies: list[float] = []

    def replay_seconds(self) -> float:
        return time.perf_counter() - self.start - self.measuring


def _step(gmem, record, clock: _Clock, errors: Counter) -> None:
    """Apply one record; a refusal is counted by op and errno (SIGBUS for a host fault), never raised."""
    try:
        if record.op == "convert":
            t0 = time.perf_counter()
            try:
                gmem.set_memory_attributes(record.offset, record.size,
                                           PRIVATE if record.arg == "private" else SHARED)
            finally:
                took = time.perf_counter() - t0
                clock.converting += took
                clock.latencies.append(took)
        else:
            _apply(gmem, record)
    except HostFault:
        errors[f"{record.op}:SIGBUS"] += 1
    except OSError as exc:
        errors[f"{record.op}:{errname(exc.errno)}"] += 1


def _measure(clock: _Clock, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        fn(*args)
    finally:
        clock.measuring += time.perf_counter() - t0


def _run(gmem, trace, result, sample_every, layout_every, arch, progress, with_layout) -> None:
    errors: Counter = Counter()
    conversions, total, clock = 0, len(trace.records), _Clock()
    take = lambda i: result.samples.append(_sample(gmem, i, clock.replay_seconds(), conversions))  # noqa: E731
    _measure(clock, take, 0)
    for index, record in enumerate(trace.records, start=1):
        conversions += record.op == "convert"
        _step(gmem, record, clock, errors)
        if index % sample_every == 0 or index == total:
            _measure(clock, take, index)
            if progress:
                progress(f"{trace.name} × {result.backend}", index, total)
        if with_layout and layout_every and index % layout_every == 0 and not result.layout_note:
            _measure(clock, _layout_sample, gmem, index, arch, result)
    result.replay_seconds, result.sample_seconds = clock.replay_seconds(), clock.measuring
    result.convert_seconds, result.conversions = clock.converting, conversions
    if clock.latencies:
        ordered = sorted(clock.latencies)
        result.convert_p50_us = ordered[len(ordered) // 2] * 1e6
        result.convert_max_us = ordered[-1] * 1e6
    result.errors = dict(sorted(errors.items()))
    result.final = _final(gmem)
    if with_layout:
        t0 = time.perf_counter()
        try:
            result.layout = layout_counts(gmem.snapshot(), arch, result.layout_levels)
        except LayoutUnavailable as exc:
            result.layout_note = str(exc)
        result.layout_seconds = time.perf_counter() - t0


def _layout_sample(gmem, index: int, arch: str, result: RunResult) -> None:
    try:
        result.layout_samples.append({"record": index, **layout_counts(gmem.snapshot(), arch)})
    except LayoutUnavailable as exc:
        result.layout_note = str(exc)
