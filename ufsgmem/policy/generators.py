"""Synthetic traces for three guest workloads, deterministic from a seed and parameterised by size.

They are caricatures that keep what matters to an allocator policy, how conversions are spread in size,
time and address, and leave out everything else:

* ``cc`` — a confidential-computing guest (TDX/SNP style). The VMM loads the image into memory that
  starts shared; early in boot the guest accepts almost all of it as private in a few large
  conversions, keeping a few shared windows (bounce buffers, a GHCB-like page area). Afterwards the
  guest touches its memory (a sweep that ends up covering it all), the host does I/O inside the windows,
  and now and then a 2 MiB balloon punch returns memory. Few, large conversions.
* ``pkvm`` — a protected-KVM guest: memory is private from the start and the guest shares small buffers
  (4 KiB–64 KiB, aligned to their size, scattered over all of memory) with the host and unshares them
  again, many times. Some shared buffers are pinned for DMA; occasionally the guest tries to unshare one
  before the device let go, which the kernel refuses with EAGAIN (the trace records the attempt, the
  unpin and the retry). Many, small conversions.
* ``virtio`` — virtio with bounce buffers that move: a ring of ``window`` shared slots walks through
  memory. Each step shares the slot at the head, the device (host) writes it, the guest reads it, and
  the slot ``window`` steps behind is converted back to private. The shared region is always
  ``window`` slots and keeps moving (it wraps at the end of the file).

Record counts are a parameter of their own, not derived from the size: a 1 TiB trace has as many records
as a 1 GiB one, so replay cost follows the records (the core keeps runs, not pages). The sizes of CC's
sweep touches grow with the file instead.

Determinism: everything comes from one ``random.Random(seed)``; the same (workload, size, seed, records,
params) always gives the same trace, byte for byte.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from typing import Callable

from ..address import align_down, align_up, format_size, parse_size
from ..uapi import GUEST_MEMFD_FLAG_MMAP, SZ_2M, SZ_4K
from .trace import Record, Trace

MIN_SIZE = 1 << 20
DEFAULT_RECORDS = 20_000

#: workload → (parameter defaults, one-line description). ``None`` means "derived from the size".
PARAMS: dict[str, dict[str, object]] = {
    "cc": {"windows": 4, "window": None, "image": None, "accept_chunks": 4, "host_io": 0.35,
           "balloon": 0.002},
    "pkvm": {"max_live": 64, "min_buffer": SZ_4K, "max_buffer": 64 << 10, "pin": 0.1,
             "unshare_pinned": 0.2, "guest": 0.2},
    "virtio": {"window": 64, "buffer": SZ_4K, "start": None},
}
DESCRIPTIONS = {
    "cc": "confidential guest: boot shared, a few large early conversions to private, a few shared windows",
    "pkvm": "protected KVM: many 4K-64K share/unshare cycles scattered over memory, some pinned for DMA",
    "virtio": "virtio bounce ring: a window of shared slots advancing through memory, converted back behind",
}
WORKLOADS = tuple(PARAMS)


def _convert(offset: int, size: int, to: str) -> Record:
    return Record("convert", offset, size, to)


def _touch(offset: int, size: int, who: str, write: bool) -> Record:
    return Record("touch", offset, size, (who, write))


# --- cc --------------------------------------------------------------------------------------------
def _pick_windows(rng: random.Random, lo: int, size: int, count: int, window: int, align: int) -> list[int]:
    """``count`` non-overlapping ``window``-sized starts in ``[lo, size)``, aligned, sorted."""
    slots = (size - window - lo) // align + 1
    if slots < count * 2:
        raise ValueError(f"a {format_size(size)} file has no room for {count} shared windows of "
                         f"{format_size(window)}")
    chosen: list[int] = []
    while len(chosen) < count:
        start = lo + rng.randrange(slots) * align
        i = bisect_left(chosen, start)
        if (i == 0 or chosen[i - 1] + window <= start) and (i == len(chosen) or start + window <= chosen[i]):
            chosen.insert(i, start)
    return chosen


def _pieces(start: int, end: int, chunks: int, align: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into at most ``chunks`` aligned pieces."""
    cuts = sorted({start, end} | {align_down(start + (end - start) * k // chunks, align)
                                   for k in range(1, chunks)})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if start <= a < b <= end]


def _cc(size: int, rng: random.Random, records: int, p: dict) -> list[Record]:
    align = SZ_2M if size >= 64 * SZ_2M else SZ_4K
    window = p["window"] or max(align, align_down(min(size // 256, 64 << 20), align))
    image = p["image"] or max(align, align_down(min(size // 16, 64 << 20), align))
    out = [_convert(0, size, "shared"), _touch(0, image, "host", True)]  # boot: the VMM loads the image
    windows = _pick_windows(rng, image, size, p["windows"], window, align)
    edges = [0] + [x for w in windows for x in (w, w + window)] + [size]
    private = [(a, b) for a, b in zip(edges[::2], edges[1::2]) if a < b]
    for a, b in private:  # acceptance: a few large conversions, in address order
        out += [_convert(s, e - s, "private") for s, e in _pieces(a, b, p["accept_chunks"], align)]
    touches = max(1, int((records - len(out)) * (1 - p["host_io"])))
    chunk = align_up(-(-size // touches), SZ_4K)
    sweep = 0
    while len(out) < records:
        r = rng.random()
        if r < p["balloon"]:
            a, b = private[rng.randrange(len(private))]
            if b - a >= align:
                out.append(Record("punch", a + rng.randrange((b - a) // align) * align, align))
        elif r < p["balloon"] + p["host_io"]:
            w = windows[rng.randrange(len(windows))]
            length = min(window, SZ_4K << rng.randrange(5))
            offset = w + rng.randrange((window - length) // SZ_4K + 1) * SZ_4K
            out.append(_touch(offset, length, "host", rng.random() < 0.5))
        else:
            out.append(_touch(sweep, min(chunk, size - sweep), "guest", True))
            sweep = sweep + chunk if sweep + chunk < size else 0
    return out


# --- pkvm ------------------------------------------------------------------------------------------
def _pkvm(size: int, rng: random.Random, records: int, p: dict) -> list[Record]:
    orders = range((p["min_buffer"] // SZ_4K).bit_length() - 1, (p["max_buffer"] // SZ_4K).bit_length())
    if not orders or p["min_buffer"] & (p["min_buffer"] - 1) or p["max_buffer"] & (p["max_buffer"] - 1):
        raise ValueError("pkvm min_buffer and max_buffer must be powers of two with min <= max")
    live: list[int] = []            # sorted starts of shared buffers
    info: dict[int, list] = {}      # start -> [size, pinned]
    out: list[Record] = []
    while len(out) < records:
        if rng.random() < p["guest"]:
            length = SZ_4K << rng.randrange(10)
            out.append(_touch(rng.randrange(size // length) * length, length, "guest", rng.random() < 0.7))
        elif len(live) < p["max_live"] and (not live or rng.random() < 0.5):
            length = SZ_4K << rng.choice(orders)
            start = rng.randrange(size // length) * length
            i = bisect_left(live, start)
            if (i and live[i - 1] + info[live[i - 1]][0] > start) or (i < len(live) and start + length > live[i]):
                continue  # overlaps a live buffer: the guest would pick another one
            pinned = rng.random() < p["pin"]
            insort(live, start)
            info[start] = [length, pinned]
            out += [_convert(start, length, "shared"), _touch(start, length, "host", True)]
            if pinned:
                out.append(Record("pin", start, length))
        else:
            start = live.pop(rng.randrange(len(live)))
            length, pinned = info.pop(start)
            if pinned:
                if rng.random() < p["unshare_pinned"]:
                    out.append(_convert(start, length, "private"))  # EAGAIN: the device still holds it
                out.append(Record("unpin", start, length))
            out.append(_convert(start, length, "private"))
    return out


# --- virtio ----------------------------------------------------------------------------------------
def _virtio(size: int, rng: random.Random, records: int, p: dict) -> list[Record]:
    slot, window = p["buffer"], p["window"]
    ring = size - size % slot
    if slot % SZ_4K or window < 1 or window * slot >= ring:
        raise ValueError(f"virtio needs a 4K-multiple buffer and window * buffer below the "
                         f"{format_size(size)} file")
    start = align_down(p["start"], slot) % ring if p["start"] is not None else rng.randrange(ring // slot) * slot
    out: list[Record] = []
    step = 0
    while len(out) < records:
        head = (start + step * slot) % ring
        out += [_convert(head, slot, "shared"), _touch(head, slot, "host", True),
                _touch(head, slot, "guest", False)]
        if step >= window:
            out.append(_convert((start + (step - window) * slot) % ring, slot, "private"))
        step += 1
    return out


GENERATORS: dict[str, Callable[[int, random.Random, int, dict], list[Record]]] = {
    "cc": _cc, "pkvm": _pkvm, "virtio": _virtio,
}


def _resolve(workload: str, params: dict) -> dict:
    defaults = PARAMS[workload]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{workload} has no parameter {unknown[0]!r} (parameters: {', '.join(defaults)})")
    out = dict(defaults)
    for key, value in params.items():
        default = defaults[key]
        if isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = parse_size(value) if isinstance(value, str) else int(value)
    return out


def generate(workload: str, size: int | str, *, seed: int = 0, records: int = DEFAULT_RECORDS,
             page_size: int | None = None, **params) -> Trace:
    """A :class:`Trace` of ``workload`` on a file of ``size`` bytes with ``records`` records after create."""
    if workload not in GENERATORS:
        raise ValueError(f"unknown workload {workload!r} (workloads: {', '.join(WORKLOADS)})")
    size = parse_size(size)
    if size < MIN_SIZE or size % SZ_4K:
        raise ValueError(f"size {size} must be a multiple of 4K and at least {format_size(MIN_SIZE)}")
    if records < 1:
        raise ValueError(f"records {records} must be positive")
    resolved = _resolve(workload, params)
    rng = random.Random(f"{workload}/{seed}")
    body = GENERATORS[workload](size, rng, records, resolved)[:records]
    name = f"{workload}-{format_size(size)}-s{seed}"
    header = {"workload": workload, "seed": seed, "records": records,
              "params": {k: v for k, v in resolved.items() if v is not None}}
    return Trace(name=name, description=DESCRIPTIONS[workload], size=size, flags=GUEST_MEMFD_FLAG_MMAP,
                 page_size=page_size, records=body, header=header)
