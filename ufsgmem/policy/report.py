"""Compare replays: a text table, JSON, and PNG plots (matplotlib, Agg backend: no display needed).

The table has one row per (trace, backend) run, then the S2 block counts per size and view, then the
errors. The plots are written to a directory:

* ``folios.png`` — huge folios split (left) and whole (right) against records replayed: one row of
  panels per trace, one line per backend;
* ``memory.png`` — allocated bytes (thin) and backend bytes (wide, pale) against records replayed, on a
  log scale (a 4 KiB policy's megabytes next to a preallocated terabyte), one panel per trace;
* ``s2_blocks.png`` — S2 blocks per size at the end, one panel per view, one bar per run (log scale);
* ``conversions.png`` — conversions per second and total replay time per run.
"""

from __future__ import annotations

import json
import os

from ..address import format_size
from .replay import VIEWS, RunResult

STYLES = ("-", "--", ":", "-.")
PLOTS = ("folios.png", "memory.png", "s2_blocks.png", "conversions.png")


def human(n: float) -> str:
    """``1.00T``, ``512M``, ``12.5K``: binary units, three significant digits."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= unit:
            value = n / unit
            return f"{value:.0f}{suffix}" if value >= 100 or value == int(value) else f"{value:.3g}{suffix}"
    return f"{n:.0f}"


def _grid(header: list[str], rows: list[list[str]], right_from: int = 2) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).rjust(w) if i >= right_from else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _blocks_total(run: RunResult, view: str) -> str:
    if run.layout is None:
        return "-"
    return str(sum(run.layout[view].values()))


def _run_row(run: RunResult) -> list[str]:
    if run.failure:
        return [run.trace, run.backend, format_size(run.page_size) if run.page_size else "-", str(run.records),
                "FAILED"] + ["-"] * (len(RUN_HEADER) - 5)
    final = run.final
    peak_split = max((s["folios_split"] for s in run.samples), default=0)
    folios = final["huge_folios"]
    return [run.trace, run.backend, format_size(run.page_size), str(run.records), f"{run.replay_seconds:.2f}",
            str(run.conversions), f"{run.conversions_per_second:,.0f}", f"{run.convert_p50_us:.1f}",
            str(run.error_count),
            human(final["allocated_bytes"]), human(final["backend_bytes"]), human(final["shared_bytes"]),
            f"{folios['whole']}/{folios['split']}", str(peak_split),
            f"{final['folio_splits']}/{final['folio_merges']}",
            "/".join(_blocks_total(run, v) for v in VIEWS), f"{run.layout_seconds:.2f}"]


def _size_label(size: int, arch: str) -> str:
    """``2M L2``; a contiguous-hint size is starred (``64K* L3``): a run of hinted descriptors."""
    try:
        from ..layout import get_arch
        leaf = get_arch(arch).leaf(size)
    except (ImportError, KeyError, ValueError):
        return format_size(size)
    return f"{format_size(size)}{'*' if leaf.contiguous else ''} L{leaf.level}"


RUN_HEADER = ["trace", "backend", "folio", "records", "replay s", "conv", "conv/s", "conv p50 µs", "errors",
              "allocated", "backend bytes", "shared", "folios whole/split", "peak split", "splits/merges",
              "S2 guest/shared/kvm", "layout s"]


def table(runs: list[RunResult]) -> str:
    """The comparison table as text (three sections: runs, S2 blocks, errors and notes)."""
    parts = ["Runs (memory and folios at the end; conv/s = conversions / time inside them)",
             _grid(RUN_HEADER, [_run_row(r) for r in runs])]
    laid = [r for r in runs if r.layout is not None]
    if laid:
        sizes = sorted({s for r in laid for v in VIEWS for s in r.layout[v]})
        rows = [[r.trace, r.backend, view] + [str(r.layout[view].get(s, 0)) for s in sizes]
                + [str(sum(r.layout[view].values()))] for r in laid for view in VIEWS]
        header = ["trace", "backend", "view"] + [_size_label(s, laid[0].arch) for s in sizes] + ["total"]
        parts += ["", f"S2 blocks per size (and lookup level) at the end, {laid[0].arch}", _grid(header, rows, 3)]
    notes = [f"{r.label}: {r.failure}" for r in runs if r.failure]
    notes += [f"{r.label}: {', '.join(f'{k} {n}' for k, n in r.errors.items())}" for r in runs if r.errors]
    notes += sorted({r.layout_note for r in runs if r.layout_note})
    if notes:
        parts += ["", "Errors and notes"] + [f"  {n}" for n in notes]
    return "\n".join(parts) + "\n"


def to_json(runs: list[RunResult], extra: dict | None = None) -> str:
    return json.dumps({"format": "ufsgmem-policy-report/1", **(extra or {}),
                       "runs": [r.as_dict() for r in runs]}, indent=1)


# --- plots -----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(runs: list[RunResult], directory: str) -> list[str]:
    """Write the PNG plots into ``directory`` (created if missing); return their paths."""
    os.makedirs(directory, exist_ok=True)
    plt = _pyplot()
    runs = [r for r in runs if not r.failure]
    paths = []
    for name, draw in (("folios.png", _plot_folios), ("memory.png", _plot_memory),
                       ("s2_blocks.png", _plot_blocks), ("conversions.png", _plot_conversions)):
        fig = draw(plt, runs)
        path = os.path.join(directory, name)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths


def _series(run: RunResult, key: str):
    return [s["record"] for s in run.samples], [s[key] for s in run.samples]


def _by_trace(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(run.trace, []).append(run)
    return groups


def _plot_folios(plt, runs):
    groups = _by_trace(runs) or {"(no runs)": []}
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 2.8 * len(groups) + 0.6), squeeze=False)
    for (trace, group), (split_ax, whole_ax) in zip(groups.items(), axes):
        for i, run in enumerate(group):  # line styles keep identical curves visible
            style = {"label": run.backend, "linewidth": 1.4, "linestyle": STYLES[i % len(STYLES)]}
            split_ax.plot(*_series(run, "folios_split"), **style)
            whole_ax.plot(*_series(run, "folios_whole"), **style)
        split_ax.set_title(f"{trace}: huge folios split")
        whole_ax.set_title(f"{trace}: huge folios whole (log)")
        whole_ax.set_yscale("symlog", linthresh=1)
        split_ax.set_ylabel("folios")
        split_ax.legend(fontsize=7, loc="best")
    for ax in axes[-1]:
        ax.set_xlabel("records replayed")
    fig.tight_layout()
    return fig


def _plot_memory(plt, runs):
    from matplotlib.ticker import FuncFormatter, LogLocator
    groups = _by_trace(runs) or {"(no runs)": []}
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 2.8 * len(groups) + 0.6), squeeze=False)
    nonzero = lambda values: [v if v > 0 else float("nan") for v in values]  # noqa: E731 (log scale)
    for (trace, group), (ax,) in zip(groups.items(), axes):
        for i, run in enumerate(group):
            x, allocated = _series(run, "allocated_bytes")
            line, = ax.plot(x, nonzero(allocated), label=f"{run.backend} allocated", linewidth=1.4,
                            linestyle=STYLES[i % len(STYLES)])
            _, backend = _series(run, "backend_bytes")
            ax.plot(x, nonzero(backend), color=line.get_color(), linewidth=3, alpha=0.3,
                    label=f"{run.backend} backend")
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_locator(LogLocator(base=1024))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        ax.set_title(f"{trace}: bytes allocated (thin) and held by the backend (wide, pale)")
        ax.set_ylabel("bytes (log)")
        ax.legend(fontsize=7, loc="best")
    axes[-1][0].set_xlabel("records replayed")
    fig.tight_layout()
    return fig


def _plot_blocks(plt, runs):
    laid = [r for r in runs if r.layout is not None]
    fig, axes = plt.subplots(1, len(VIEWS), figsize=(13, 4.5), sharey=True)
    if not laid:
        for ax, view in zip(axes, VIEWS):
            ax.set_title(f"{view} view")
            ax.text(0.5, 0.5, "no S2 layout\n(ufsgmem.layout unavailable)", ha="center", va="center",
                    transform=ax.transAxes)
        return fig
    sizes = sorted({s for r in laid for v in VIEWS for s in r.layout[v]})
    width = 0.8 / len(laid)
    for ax, view in zip(axes, VIEWS):
        for i, run in enumerate(laid):
            counts = [run.layout[view].get(s, 0) for s in sizes]
            ax.bar([j + i * width for j in range(len(sizes))], counts, width, label=run.label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [format_size(s) for s in sizes])
        ax.set_yscale("symlog", linthresh=1)
        ax.set_title(f"{view} view")
        ax.set_xlabel("block size")
    axes[0].set_ylabel("S2 blocks at the end")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("Stage-2 blocks per size and view")
    fig.tight_layout()
    return fig


def _plot_conversions(plt, runs):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.5 * len(runs) + 2))
    labels = [r.label for r in runs]
    left.barh(labels, [r.conversions_per_second for r in runs], color="tab:blue")
    left.set_xlabel("conversions per second (time inside conversions)")
    left.invert_yaxis()
    right.barh(labels, [r.replay_seconds for r in runs], color="tab:orange")
    right.set_xlabel("replay time, s (all records)")
    right.set_yticks(range(len(labels)), [""] * len(labels))
    right.invert_yaxis()
    fig.suptitle("Conversion rate and replay time")
    fig.tight_layout()
    return fig
