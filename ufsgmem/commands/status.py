"""Show the state of a guest_memfd file: MOUNTPOINT/NAME/status, summarised for people.

Size, flags, backend and page size; allocated, shared, private and pinned bytes; whole and split huge
folios; memory (backend, page cache, committed against the mount's --max-memory); conversion, revocation
and punch counters; and the attribute runs (the first few). --json prints
the status file as it is, for scripts.

examples:
  ufsgmem status /mnt/gmem/vm0
  ufsgmem status /mnt/gmem/vm0 --json | jq .private_bytes
"""

from __future__ import annotations

import json

from ..address import format_size
from ..client import GmemFile
from ..uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE
from ._gmemargs import report

HELP = "show a guest_memfd file's state"

RUNS_SHOWN = 8


def configure(parser) -> None:
    parser.add_argument("file", metavar="MOUNTPOINT/NAME", help="a guest_memfd file on a ufsgmem mount")
    parser.add_argument("--json", action="store_true", help="print the raw status JSON")


def _bytes(n: int, total: int) -> str:
    if not total:
        return format_size(n)
    percent = 100 * n / total
    # never round a part up to "100.0%" or down to "0.0%": those claim all or nothing
    percent = min(percent, 99.9) if n < total else percent
    percent = max(percent, 0.1) if n > 0 else percent
    return f"{format_size(n)} ({percent:.1f}%)"


def summary(status: dict, runs: list[tuple[int, int, int]] | None = None) -> str:
    """The human-readable form of a status dict (and, if given, its attribute runs)."""
    size = status["size"]
    flags = ",".join(status.get("flag_names", [])) or "none"
    lines = [
        f"{status.get('name') or '?'}: {format_size(size)} ({size:#x} bytes), flags {status['flags']:#x} ({flags})",
        f"  backend {status['backend']}, page size {format_size(status['page_size'])}",
        f"  allocated {_bytes(status.get('allocated_bytes', 0), size)}, "
        f"shared {_bytes(status.get('shared_bytes', 0), size)}, "
        f"private {_bytes(status.get('private_bytes', 0), size)}, "
        f"pinned {_bytes(status.get('pinned_bytes', 0), size)}",
    ]
    folios = status.get("huge_folios")
    if folios and status["page_size"] > 4096:
        lines.append(f"  huge folios: {folios.get('whole', 0)} whole, {folios.get('split', 0)} split "
                     f"({status.get('folio_splits', 0)} splits, {status.get('folio_merges', 0)} merges so far)")
    conv = status.get("conversions", {})
    if conv:
        lines.append(f"  conversions: {conv.get('to_private', 0)} to private, {conv.get('to_shared', 0)} to "
                     f"shared, {conv.get('noop', 0)} no-op, {conv.get('eagain', 0)} refused (EAGAIN)")
    if "committed_bytes" in status:
        mount = status.get("mount_memory") or {}
        cap = mount.get("max")
        lines.append(f"  memory: backend {format_size(status.get('backend_bytes', 0))}, page cache at most "
                     f"{format_size(status.get('page_cache_bytes_max', 0))}, committed "
                     f"{format_size(status['committed_bytes'])} (the mount: {format_size(mount.get('committed', 0))}"
                     + (f" of its {format_size(cap)} cap)" if cap else ", no cap)"))
    hold = status.get("low_latency")
    if hold:
        lines.append(f"  low latency (mount --low-latency): CPU latency limit {'held' if hold['held'] else 'idle'}, "
                     f"raised {hold['raised']} times, dropped after {hold['window_s']} s without a request")
    hot = status.get("hot_path")
    if hot:
        served = ", ".join(f"{what} {hot[kind]['compiled']}/{hot[kind]['python']}"
                           for kind, what in (("read", "fills"), ("write", "write-backs"), ("ioctl", "conversions"),
                                              ("fallocate", "fallocates")) if kind in hot)
        lines.append(f"  hot path (mount --hot-path {hot['mode']}): the mount's {served} served compiled/by Python")
    lines.append(f"  revocations: {status.get('revocations', 0)} ({format_size(status.get('revoked_bytes', 0))}"
                 f" unmapped), punches: {status.get('punches', 0)}")
    if runs is not None:
        lines.append(f"  attribute runs: {len(runs)}")
        shown = runs[:RUNS_SHOWN]
        spans = [f"[{offset:#x}, {offset + length:#x})" for offset, length, _ in shown]
        width = max(map(len, spans), default=0)
        for span, (offset, length, attributes) in zip(spans, shown):
            what = "private" if attributes == KVM_MEMORY_ATTRIBUTE_PRIVATE else "shared"
            lines.append(f"    {span:<{width}}  {format_size(length):>7}  {what}")
        if len(runs) > RUNS_SHOWN:
            lines.append(f"    ... {len(runs) - RUNS_SHOWN} more")
    elif "attribute_runs" in status:
        lines.append(f"  attribute runs: {status['attribute_runs']}")
    return "\n".join(lines)


def run(args) -> int:
    def show() -> int:
        with GmemFile(args.file) as f:
            status = f.status()
            if args.json:
                print(json.dumps(status, indent=2, sort_keys=True))
                return 0
            try:
                runs = f.get_attributes()
            except OSError:
                runs = None  # the summary still stands without the runs
        print(summary(status, runs))
        return 0
    return report("status", show)
