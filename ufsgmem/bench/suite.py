"""``ufsgmem bench``: every figure of design §5 measured in one run, beside its reference, with the ratio.

Targets (docs/design.md §5; docs/performance.md says what limits each):

========  ======================================================================  =============================
P1        first-touch write throughput of a 1 GiB ``mem`` mapping                   ≥ 1.5× kernel guest_memfd where
                                                                                  the kernel has one; ≥ 0.8× shmem
P2        2 MiB shared→private→shared, mapped and dirty in another process, vs     ≤ 1.15× the floor
          the FUSE floor server (``fuse_floor.c``) in the same run
P3        4 KiB round trip through the ioctl on ``mem``, dirty in another process,  ≤ 1.25× the floor
          vs the FUSE floor server in the same run (P3.clean: a page nobody maps)
P4        4 KiB conversion latency, 1 GiB vs 64 GiB file                            ≤ 1.25×
P5        layout export of a 1 TiB guest with 100 000 shared holes; metadata/run    ≤ 2 s; ≤ 128 B/run
P6        backend bytes of a preallocated hugetlb file after 10 000 conversions     = file size
STREAM    4 KiB conversions per second scattered over 1 GiB, nothing mapped: the    ≥ 2× the python hot path
          compiled hot path vs a ``--hot-path python`` mount in the same run
========  ======================================================================  =============================

Besides the targets it reports the context a reader needs: read throughput, the round trips against the
kernel's discard model (punch-hole + refault) where the kernel has guest_memfd, 4 KiB round trips with the
caller and a ``--cpus`` server on one CPU and on a ``--low-latency`` mount, the Python hot path's
conversions per second (``STREAM.python``) and round trips (``P3.python``, ``P3.python.clean``,
``P2.python``: a ``--hot-path python`` mount against a default one), and the page-cache bytes the FUSE mount holds for shared
mappings (a real cost of the design: mapped pages live in the FUSE page cache *and* in the backend).

A reference this machine lacks (the kernel's guest_memfd, huge pages, a C compiler for the floor server,
the CPU latency device, a server that knows ``--hot-path``) is reported as unavailable with the reason, in
the table and in the JSON's ``unavailable``; the figure is still measured where it can be, and the run
goes on.

Every figure is the median of several repetitions, with min..max and the raw values in the JSON. Both
sides of a ratio are measured in the same run, interleaved, so machine load hits both alike.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable


from .. import __version__, hugepages, kvm
from ..client import GmemFile, Mount
from ..fuse.latency import DEVICE as CPU_LATENCY_DEVICE, NO_LIMIT, current_limit
from ..uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, SZ_1G, SZ_2M, SZ_4K
from . import floor, memory, run_vcpu
from .dirtier import Dirtier
from .stats import Figure, Series, fmt, timed

GiB = 1 << 30


@dataclass
class Config:
    size: int = GiB          # the mapping size for P1/P2 (≥ 1 GiB for the real run)
    reps: int = 5            # repetitions of each throughput figure
    latency_reps: int = 200  # repetitions of each latency figure
    stream: int = 2000       # conversions in the scattered stream
    p4_large: int = 64 * GiB
    p5_size: int = 1 << 40
    p5_holes: int = 100_000
    p6_conversions: int = 10_000
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "Config":
        return cls(size=64 << 20, reps=2, latency_reps=20, stream=200, p4_large=4 * GiB,
                   p5_size=1 << 40, p5_holes=5_000, p6_conversions=500, quick=True)


@dataclass
class References:
    """The optional references of this machine: why each one it lacks is missing.

    ``kernel_gmem`` is None where the kernel can create a guest_memfd, else the reason it cannot (on the
    machines ufsgmem is for, ``KVM_CREATE_GUEST_MEMFD`` is ENOTTY or ``/dev/kvm`` is absent). Every figure
    that would have compared with a missing reference is still measured, beside what is there instead.
    """

    kernel_gmem: str | None
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def probe(cls) -> "References":
        refs = cls(kernel_gmem=kvm.skip_reason())
        if refs.kernel_gmem is not None:
            refs.lack("kernel guest_memfd", refs.kernel_gmem)
        return refs

    def lack(self, what: str, reason: str) -> None:
        self.unavailable[what] = reason


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.total} {time.monotonic() - self.start:6.1f}s] {what}",
              file=sys.stderr, flush=True)


# --- mount ------------------------------------------------------------------------------------------
class MountRefused(RuntimeError):
    """``ufsgmem mount`` failed; the message is its command line and the last line it printed (the reason)."""


@contextlib.contextmanager
def mounted(*options: str):
    """A fresh ufsgmem mount in a temporary directory, unmounted at the end whatever happens.

    Raises :class:`MountRefused` if the mount command fails (an option this server does not know, ...).
    """
    mountpoint = tempfile.mkdtemp(prefix="ufsgmem-bench-")
    cli = [sys.executable, "-m", "ufsgmem"]
    proc = subprocess.run([*cli, "mount", mountpoint, *options], stderr=subprocess.PIPE, text=True)
    sys.stderr.write(proc.stderr)  # kept for the reason, still shown
    if proc.returncode != 0:
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)
        said = [line for line in proc.stderr.splitlines() if line.strip()]
        raise MountRefused(f"ufsgmem mount {' '.join(options)} failed (exit {proc.returncode})"
                           + (f": {said[-1].strip()}" if said else ""))
    try:
        with Mount(mountpoint) as mount:
            yield mount
    finally:
        subprocess.run([*cli, "umount", mountpoint], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(mountpoint)


@contextlib.contextmanager
def created(mount: Mount, name: str, size: int, flags: str = "mmap|init_shared", **kwargs):
    f = mount.create(name, size, flags, **kwargs)
    try:
        yield f
    finally:
        f.close()
        mount.destroy(name)


# --- P1: first touch --------------------------------------------------------------------------------
def p1_first_touch(cfg: Config, mount: Mount, refs: References, progress: Progress) -> list[Figure]:
    """P1 against the kernel's guest_memfd where there is one, and against shmem memfd always."""
    size = cfg.size
    targets: dict[str, Callable] = {"shmem memfd": memory.shmem_mapping, "anonymous": memory.anon_mapping}
    if refs.kernel_gmem is None:
        targets["kernel guest_memfd"] = memory.kernel_gmem_mapping
    backends = ["anon", "thp"]
    pool = contextlib.ExitStack()
    reason = hugepages.unavailable_reason(SZ_2M)
    if reason is None and pool.enter_context(hugepages.reserved(SZ_2M, size // SZ_2M)) < size // SZ_2M:
        reason = f"the 2 MiB pool could not grow by {size // SZ_2M} pages"
    if reason is None:
        backends.append("hugetlb")
    else:
        refs.lack("P1 on the hugetlb backend", reason)
    with pool:
        for backend in backends:
            targets[f"ufsgmem mem ({backend})"] = _ufsgmem_target(mount, backend)
        write = {name: Series(name, "GB/s") for name in targets}
        read = {name: Series(name, "GB/s") for name in targets}
        for rep in range(cfg.reps):
            for name, target in list(targets.items()):  # interleaved: load hits every target alike
                try:
                    for series, is_write in ((write, True), (read, False)):
                        with target(size) as m:
                            series[name].values.append(size / memory.first_touch(m, is_write) / 1e9)
                except OSError as e:  # e.g. another process took huge pages from the pool meanwhile
                    if not name.startswith("ufsgmem mem (") or name == "ufsgmem mem (anon)":
                        raise  # the references and the default backend must work
                    refs.lack(f"P1 on {name}", f"gave up at repetition {rep + 1}: {e}")
                    del targets[name], write[name], read[name]
            progress.step(f"P1 first touch, repetition {rep + 1}/{cfg.reps}")
    best = max((n for n in targets if n.startswith("ufsgmem")), key=lambda n: write[n].median)
    vs_shmem = write[best].median / write["shmem memfd"].median
    ref_name = "kernel guest_memfd" if refs.kernel_gmem is None else "shmem memfd"
    title = f"first-touch write of a {fmt(size, 'B')} mapping, {best} vs {ref_name}"
    if refs.kernel_gmem is None:
        fig = Figure("P1", title, write[best], write[ref_name], "≥ 1.5× kernel and ≥ 0.8× shmem memfd",
                     better="higher", note=f"vs shmem memfd {vs_shmem:.2f}×")
        fig.met = bool(fig.ratio is not None and fig.ratio >= 1.5 and vs_shmem >= 0.8)
    else:
        fig = Figure("P1", title, write[best], write[ref_name], "≥ 0.8× shmem memfd", better="higher",
                     note=f"no kernel guest_memfd to compare with: {refs.kernel_gmem}")
        fig.met = vs_shmem >= 0.8
    extra = [Figure(f"P1.write.{n}", f"first-touch write, {n}", s, write[ref_name], "context", better="higher")
             for n, s in write.items()]
    extra += [Figure(f"P1.read.{n}", f"first-touch read, {n}", s, read[ref_name], "context",
                     better="higher") for n, s in read.items()]
    return [fig, *extra]


def _ufsgmem_target(mount: Mount, backend: str):
    @contextlib.contextmanager
    def target(size: int):
        page = {"hugetlb": "2M"}.get(backend)
        flags = "mmap" if backend == "hugetlb" else "mmap|init_shared"
        name = f"bench-{backend}"
        with created(mount, name, size, flags, backend=backend, page_size=page) as f:
            if backend == "hugetlb":  # huge-page files start private (HugeTLB rule)
                f.convert(0, size, to="shared")
            with memory.path_mapping(os.path.join(f.path, "mem"), size) as m:
                yield m
    return target


# --- P2/P3: round trips -----------------------------------------------------------------------------
def round_trip(f: GmemFile, offset: int, size: int) -> float:
    """shared→private→shared through ``ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2)``, as a VMM converts."""
    start = time.perf_counter()
    f.set_memory_attributes(offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE)
    f.set_memory_attributes(offset, size, 0)
    return time.perf_counter() - start


def kernel_round_trips(cfg: Config, mount: Mount, refs: References, progress: Progress) -> list[Figure]:
    """Round trips of 4 KiB, 2 MiB and the whole mapping, dirty in another process, beside the kernel's
    discard model (punch-hole + refault: how a VMM converts without in-place conversion) where the kernel
    has guest_memfd. Context for P2/P3, whose targets are against the FUSE floor."""
    size = cfg.size
    figures = []
    with contextlib.ExitStack() as stack:
        f = stack.enter_context(created(mount, "bench-rt", size))
        dirtier = stack.enter_context(Dirtier(os.path.join(f.path, "mem"), size))
        kernel = stack.enter_context(memory.kernel_gmem_file(size)) if refs.kernel_gmem is None else None
        for label, length, reps in (("4 KiB", SZ_4K, cfg.latency_reps), ("2 MiB", SZ_2M, max(cfg.reps * 4, 10)),
                                    ("1 GiB", size, cfg.reps)):
            ours = Series(f"ufsgmem {label} round trip", "s")
            ref = Series(f"kernel punch+refault {label}", "s") if kernel is not None else None
            for rep in range(reps):
                offset = (rep * length) % size
                dirtier.dirty(offset, length)  # mapped and dirty in another process
                ours.values.append(round_trip(f, offset, length))
                if kernel is not None:
                    ref.values.append(kernel.punch_and_refault(offset, length))
            progress.step(f"round trips {label}")
            figures.append((label, ours, ref))
    note = "" if refs.kernel_gmem is None else f"no kernel guest_memfd to compare with: {refs.kernel_gmem}"
    ids = {"4 KiB": "P3.kernel", "2 MiB": "P2.kernel", "1 GiB": "RT.1G"}
    return [Figure(ids[label], f"{label} shared→private→shared, dirty in another process, vs the kernel's "
                   "punch-hole + refault", ours, ref, "context", note=note) for label, ours, ref in figures]


#: The mount options of STREAM's reference: every request served by Python, as before the compiled hot path.
HOT_PATH_PYTHON = ("--hot-path", "python")
STREAM_TARGET = 2.0


def stream_block(f: GmemFile, pages: list[int]) -> float:
    """Conversions per second of one pass: every page of ``pages`` to private, then every one back."""
    elapsed = timed(lambda: [f.set_memory_attributes(p * SZ_4K, SZ_4K, KVM_MEMORY_ATTRIBUTE_PRIVATE)
                             for p in pages]) + \
        timed(lambda: [f.set_memory_attributes(p * SZ_4K, SZ_4K, 0) for p in pages])
    return 2 * len(pages) / elapsed


def conversion_stream(cfg: Config, mount: Mount, refs: References, progress: Progress) -> list[Figure]:
    """STREAM: 4 KiB conversions per second scattered over a file, on ``mount`` (the default, compiled hot
    path) against a ``--hot-path python`` mount (every request served by Python), in alternating blocks.

    Nothing is mapped, so a conversion is one ioctl through FUSE and the server's own work: the figure
    the compiled hot path is for (target: ≥ 2× the Python path's). A server that refuses the option (one
    from before it) leaves the reference unavailable, with the mount's reason, and only ``mount`` is measured.
    """
    size = cfg.size
    rng = random.Random(1)
    pages = rng.sample(range(size // SZ_4K), cfg.stream)
    compiled = Series("ufsgmem 4 KiB conversions per second, compiled hot path", "conv/s")
    python = Series("ufsgmem 4 KiB conversions per second, --hot-path python", "conv/s")
    unavailable = "STREAM on a --hot-path python mount"
    with contextlib.ExitStack() as stack:
        files = {"compiled": (stack.enter_context(created(mount, "bench-stream", size)), compiled)}
        try:
            reference = stack.enter_context(mounted(*HOT_PATH_PYTHON))
        except MountRefused as e:
            refs.lack(unavailable, str(e))
        else:
            files["python"] = (stack.enter_context(created(reference, "bench-stream", size)), python)
        order = list(files)
        for _ in range(max(cfg.reps, 2)):  # alternating blocks: load hits both alike
            for name in order:
                f, series = files[name]
                series.values.append(stream_block(f, pages))
            order.reverse()
    progress.step("conversion stream, alternating with a --hot-path python mount" if python.values else
                  f"conversion stream without the python hot path ({refs.unavailable[unavailable]})")
    title = f"4 KiB conversions scattered over {fmt(size, 'B')}, nothing mapped"
    if not python.values:
        return [Figure("STREAM", f"{title}, the default mount", compiled, None,
                       f"≥ {STREAM_TARGET}× the python hot path", better="higher",
                       note=f"no python hot path to compare with: {refs.unavailable[unavailable]}")]
    title += ", compiled hot path vs --hot-path python (alternating blocks)"
    fig = Figure("STREAM", title, compiled, python, f"≥ {STREAM_TARGET}× the python hot path", better="higher")
    fig.met = fig.ratio is not None and fig.ratio >= STREAM_TARGET
    return [fig, Figure("STREAM.python", f"4 KiB conversions scattered over {fmt(size, 'B')} on a --hot-path "
                        "python mount (STREAM's reference)", python, None, "context", better="higher")]


@contextlib.contextmanager
def p3_setting(cfg: Config, *options: str):
    """P3's setting on a mount of its own made with ``options``: a file, and a dirtier mapping it."""
    with mounted(*options) as mount, created(mount, "bench-p3", cfg.size) as f, \
            Dirtier(os.path.join(f.path, "mem"), cfg.size) as dirtier:
        yield f, dirtier


def dirty_round_trip(setting, offset: int, length: int) -> float:
    """Dirty ``[offset, offset + length)`` in the setting's dirtier, then time its round trip."""
    f, dirtier = setting
    dirtier.dirty(offset, length)
    return round_trip(f, offset, length)


def p3_round_trips(setting, size: int, reps: range, dirty: Series, clean: Series) -> None:
    """Add ``len(reps)`` round trips of a page dirty in the dirtier to ``dirty``, and as many of a page
    nobody maps to ``clean``."""
    dirty.values.extend(dirty_round_trip(setting, (rep * SZ_4K) % size, SZ_4K) for rep in reps)
    start = size // 2  # pages nobody has mapped
    clean.values.extend(round_trip(setting[0], start + rep * SZ_4K, SZ_4K) for rep in reps)


def p3_on_a_mount(cfg: Config, label: str, *options: str) -> tuple[Series, Series]:
    """P3's dirty and clean 4 KiB round trips on a mount of their own, made with ``options``."""
    dirty = Series(f"ufsgmem 4 KiB round trip, {label}", "s")
    clean = Series(f"ufsgmem 4 KiB round trip, page not mapped, {label}", "s")
    with p3_setting(cfg, *options) as setting:
        p3_round_trips(setting, cfg.size, range(cfg.latency_reps), dirty, clean)
    return dirty, clean


def p3_one_cpu(cfg: Config, progress: Progress) -> list[Figure]:
    """P3 again with this process, its dirtier and a server mounted ``--cpus`` all on one CPU.

    Every FUSE request costs two wake-ups; on a VM one that crosses to another vCPU costs tens of µs.
    Here each wakes a thread on the same CPU instead: what a VMM gets by pinning the thread that converts
    beside a pinned server (docs/performance.md says what it costs elsewhere).
    """
    saved = os.sched_getaffinity(0)
    cpu = min(saved)
    os.sched_setaffinity(0, {cpu})
    try:
        dirty, clean = p3_on_a_mount(cfg, "one CPU", "--cpus", str(cpu))
    finally:
        os.sched_setaffinity(0, saved)
    progress.step("P3 with caller and server on one CPU")
    return [Figure("P3.onecpu", f"4 KiB round trip through the ioctl, dirty in another process, caller, dirtier and "
                   f"server on CPU {cpu} (mount --cpus)", dirty, None, "context"),
            Figure("P3.onecpu.clean", f"4 KiB round trip through the ioctl of a page no process maps, caller and "
                   f"server on CPU {cpu}", clean, None, "context")]


def p3_low_latency(cfg: Config, refs: References, progress: Progress) -> list[Figure]:
    """P3 and P3.clean on a ``--low-latency`` mount against a plain one, measured in alternating blocks.

    On a VM whose idle vCPUs halt into the host, waking one is part of a FUSE request's cost (10-30 % of
    P3 here, docs/performance.md); this is what a VMM gets from the option (``ufsgmem/fuse/latency.py``).
    Nothing is pinned. The limit is global, so a plain block starts only once the other mount's hold has
    lapsed. Needs root, and nobody else holding a CPU latency limit (the plain mount would not be plain).
    """
    if not os.access(CPU_LATENCY_DEVICE, os.W_OK):
        refs.lack("P3 on a --low-latency mount", f"{CPU_LATENCY_DEVICE} is not writable (needs root)")
        progress.step("P3 with --low-latency: skipped (needs root)")
        return []
    if current_limit() != NO_LIMIT:
        refs.lack("P3 on a --low-latency mount", f"another process holds a {current_limit()} µs CPU latency limit")
        progress.step(f"P3 with --low-latency: skipped (another process holds a {current_limit()} µs CPU "
                      "latency limit)")
        return []
    size, blocks = cfg.size, 4
    per_block = max(cfg.latency_reps // blocks, 1)
    series = {name: (Series(f"ufsgmem 4 KiB round trip, {name}", "s"),
                     Series(f"ufsgmem 4 KiB round trip, page not mapped, {name}", "s"))
              for name in ("plain mount", "--low-latency")}
    with p3_setting(cfg) as plain, p3_setting(cfg, "--low-latency") as low:
        settings = {"plain mount": plain, "--low-latency": low}
        for block in range(blocks):
            order = ("plain mount", "--low-latency") if block % 2 == 0 else ("--low-latency", "plain mount")
            for name in order:
                if name == "plain mount":
                    wait_for_no_latency_limit()
                reps = range(block * per_block, (block + 1) * per_block)
                p3_round_trips(settings[name], size, reps, *series[name])
    progress.step("P3 with --low-latency, alternating with a plain mount")
    (low_dirty, low_clean), (plain_dirty, plain_clean) = series["--low-latency"], series["plain mount"]
    return [Figure("P3.lowlat", "4 KiB round trip through the ioctl, dirty in another process, mount --low-latency "
                   "vs a plain mount (alternating blocks)", low_dirty, plain_dirty, "context"),
            Figure("P3.lowlat.clean", "4 KiB round trip through the ioctl of a page no process maps, mount "
                   "--low-latency vs a plain mount", low_clean, plain_clean, "context")]


def alternating_round_trips(cfg: Config, settings: dict, names: tuple[str, str], label) -> dict[str, tuple]:
    """P3's dirty and clean 4 KiB round trips and P2's 2 MiB ones on two settings (``p3_setting`` or
    ``floor_setting``), in blocks whose order alternates, so that the load of the moment hits both alike:
    ``{name: (dirty, clean, dirty 2 MiB)}`` series, named with ``label(name)``. A name without a setting
    (its reference is unavailable) gets empty series."""
    size, blocks = cfg.size, 4
    per_block, per_block_2m = max(cfg.latency_reps // blocks, 1), max(cfg.reps, 2)
    series = {name: (Series(f"4 KiB round trip, {label(name)}", "s"),
                     Series(f"4 KiB round trip, page not mapped, {label(name)}", "s"),
                     Series(f"2 MiB round trip, {label(name)}", "s")) for name in names}
    for block in range(blocks):
        for name in (names if block % 2 == 0 else names[::-1]):
            if name not in settings:
                continue
            dirty, clean, dirty_2m = series[name]
            p3_round_trips(settings[name], size, range(block * per_block, (block + 1) * per_block), dirty, clean)
            # 2 MiB ranges from size / 4: clear of P3's pages (from 0 and from size / 2)
            dirty_2m.values.extend(dirty_round_trip(settings[name], size // 4 + rep * SZ_2M, SZ_2M)
                                   for rep in range(block * per_block_2m, (block + 1) * per_block_2m))
    return series


def hot_path_python(cfg: Config, progress: Progress) -> list[Figure]:
    """P3, P3.clean and P2 on a ``--hot-path python`` mount (every request served by the Python handlers,
    as before the compiled path) against a default mount (``ufsgmem/fuse/fastpath.c`` serving mem's
    common requests), in alternating blocks: what the compiled path buys for round trips, in the same run
    (STREAM has its own reference on such a mount)."""
    names = ("compiled", "python")
    with p3_setting(cfg) as compiled, p3_setting(cfg, *HOT_PATH_PYTHON) as python:
        series = alternating_round_trips(cfg, {"compiled": compiled, "python": python}, names,
                                         lambda name: f"--hot-path {name}")
    progress.step("P2/P3 on a --hot-path python mount, alternating with a default one")
    (c_dirty, c_clean, c_2m), (p_dirty, p_clean, p_2m) = (series[name] for name in names)
    return [Figure("P3.python", "4 KiB round trip through the ioctl, dirty in another process, mount --hot-path python "
                   "vs the default (compiled)", p_dirty, c_dirty, "context"),
            Figure("P3.python.clean", "4 KiB round trip of a page no process maps, --hot-path python vs compiled",
                   p_clean, c_clean, "context"),
            Figure("P2.python", "2 MiB round trip, dirty in another process, --hot-path python vs compiled",
                   p_2m, c_2m, "context")]


@contextlib.contextmanager
def floor_setting(cfg: Config, exe: str):
    """P3's setting on the floor server (``floor.py``): its ``mem``, and a dirtier mapping it."""
    with floor.FloorMount(exe, cfg.size) as mount, Dirtier(os.path.join(mount.mountpoint, "mem"), cfg.size) as dirtier:
        yield mount.file, dirtier


FLOOR_TARGETS = {"P3": 1.25, "P3.clean": 1.25, "P2": 1.15}


def floor_round_trips(cfg: Config, refs: References, progress: Progress) -> list[Figure]:
    """P3, P3.clean and P2: a plain ufsgmem mount against the floor server, in alternating blocks.

    The floor server (``fuse_floor.c``) takes the same steps through FUSE and nothing else, so its round
    trip is about the least a FUSE server that preserves content can show on this machine, and the ratio
    is what ufsgmem's own server adds (docs/performance.md). Building it needs a C compiler and libfuse3's
    headers; without them ufsgmem's side is still measured, with no reference and the reason in
    ``refs``.
    """
    names = ("ufsgmem", "floor server")
    with tempfile.TemporaryDirectory(prefix="ufsgmem-floor-build-") as build_dir, contextlib.ExitStack() as stack:
        settings = {"ufsgmem": stack.enter_context(p3_setting(cfg))}
        try:
            settings["floor server"] = stack.enter_context(floor_setting(cfg, floor.build(build_dir)))
        except floor.Unavailable as e:
            refs.lack("the FUSE floor server", str(e))
        series = alternating_round_trips(cfg, settings, names, lambda name: name)
        have_floor = "floor server" in settings
    progress.step("P2/P3 against the FUSE floor server, alternating with ufsgmem" if have_floor else
                  f"P2/P3 without the FUSE floor ({refs.unavailable['the FUSE floor server']})")
    (ours_dirty, ours_clean, ours_2m), (floor_dirty, floor_clean, floor_2m) = (series[name] for name in names)
    note = "" if have_floor else f"no FUSE floor to compare with: {refs.unavailable['the FUSE floor server']}"
    figures = [
        Figure("P3", "4 KiB shared→private→shared through the ioctl on mem, dirty in another process, ufsgmem vs a "
               "C FUSE server that only revokes (bench/fuse_floor.c; alternating blocks)", ours_dirty, floor_dirty,
               "≤ 1.25× the floor", note=note),
        Figure("P3.clean", "4 KiB round trip through the ioctl of a page no process maps, ufsgmem vs the C floor "
               "server", ours_clean, floor_clean, "≤ 1.25× the floor", note=note),
        Figure("P2", "2 MiB shared→private→shared, dirty in another process, ufsgmem vs the C floor server",
               ours_2m, floor_2m, "≤ 1.15× the floor", note=note)]
    for fig in figures:
        if not have_floor:
            fig.reference = None
        elif fig.ratio is not None:
            fig.met = fig.ratio <= FLOOR_TARGETS[fig.id]
    return figures


def wait_for_no_latency_limit(timeout: float = 5.0) -> None:
    """Until no CPU latency limit is in force (a --low-latency hold lapses 0.2 s after its last request)."""
    deadline = time.monotonic() + timeout
    while current_limit() != NO_LIMIT:
        if time.monotonic() > deadline:
            raise RuntimeError(f"a CPU latency limit is still held after {timeout} s: the plain mount would not "
                               "be plain")
        time.sleep(0.01)


# --- P4: cost follows the range, not the file -------------------------------------------------------
def p4_file_size(cfg: Config, mount: Mount, progress: Progress) -> list[Figure]:
    series = {}
    for size in (GiB, cfg.p4_large):
        s = Series(f"4 KiB conversion latency, {fmt(size, 'B')} sim file", "s")
        with created(mount, "bench-p4", size, backend="sim") as f:
            for rep in range(cfg.latency_reps):
                offset = (rep * 7919 * SZ_4K) % size
                s.values.append(timed(lambda: f.convert(offset, SZ_4K, to="private")))
                f.convert(offset, SZ_4K, to="shared")
        series[size] = s
    progress.step("P4 file-size independence")
    fig = Figure("P4", f"4 KiB conversion, {fmt(cfg.p4_large, 'B')} file vs 1 GiB file",
                 series[cfg.p4_large], series[GiB], "≤ 1.25×")
    fig.met = fig.ratio is not None and fig.ratio <= 1.25
    return [fig]


# --- P5: layout export at 1 TiB ---------------------------------------------------------------------
def p5_layout(cfg: Config, progress: Progress) -> list[Figure]:
    """Snapshot + json export of all three views of a 1 TiB sim guest (1 GiB folios) with N shared holes."""
    from ..plugins import export
    from ..gmem import SHARED, GuestMemfd

    with GuestMemfd(cfg.p5_size, 0, backend="sim", page_size=SZ_1G) as gmem:
        stride = (cfg.p5_size // cfg.p5_holes) & ~(SZ_4K - 1)
        for i in range(cfg.p5_holes):
            gmem.set_memory_attributes(i * stride + SZ_2M + SZ_4K, SZ_4K, SHARED)
        runs = len(gmem.get_attributes())
        per_run = gmem.metadata_bytes() / runs
        export_time = Series("snapshot + json export of guest, shared and kvm views", "s")
        for _ in range(cfg.reps):
            export_time.values.append(timed(
                lambda: [export("json", snap, view=view, arch="x86_64")
                         for snap in [gmem.snapshot()] for view in ("guest", "shared", "kvm")]))
    progress.step("P5 layout export at 1 TiB")
    fig = Figure("P5", f"layout export, {fmt(cfg.p5_size, 'B')} with {cfg.p5_holes} shared holes (3 views)",
                 export_time, None, "≤ 2 s; ≤ 128 B per run")
    fig.met = export_time.median <= 2.0 and per_run <= 128
    fig.note = f"metadata {per_run:.1f} B per attribute run ({runs} runs)"
    meta = Series("core metadata bytes per attribute run", "B", [per_run])
    return [fig, Figure("P5.meta", "metadata per attribute run", meta, None, "≤ 128 B")]


# --- P6: no per-conversion allocation ---------------------------------------------------------------
def p6_hugetlb_bytes(cfg: Config, refs: References, progress: Progress) -> list[Figure]:
    from ..gmem import PRIVATE, SHARED, GuestMemfd

    size = 256 << 20

    def unavailable(reason: str) -> list[Figure]:
        refs.lack("P6 (hugetlb backend)", reason)
        progress.step(f"P6: skipped ({reason})")
        return [Figure("P6", "hugetlb backend bytes after conversions", Series("backend bytes", "B"), None,
                       "= file size (ratio 1)", note=f"not measured: {reason}")]

    reason = hugepages.unavailable_reason(SZ_2M)
    if reason:
        return unavailable(reason)
    with hugepages.reserved(SZ_2M, size // SZ_2M) as got:
        if got < size // SZ_2M:
            return unavailable(f"the 2 MiB pool could not grow by {size // SZ_2M} pages")
        with GuestMemfd(size, 1, backend="hugetlb", page_size=SZ_2M) as gmem:
            rng = random.Random(6)
            for i in range(cfg.p6_conversions // 2):
                offset = rng.randrange(size // SZ_4K) * SZ_4K
                gmem.set_memory_attributes(offset, SZ_4K, SHARED)
                gmem.host_write(offset, b"x")
                gmem.set_memory_attributes(offset, SZ_4K, PRIVATE)
            held = gmem.backend.backend_bytes()
    progress.step("P6 hugetlb bytes after conversions")
    fig = Figure("P6", f"hugetlb backend bytes after {cfg.p6_conversions} conversions of a {fmt(size, 'B')} file",
                 Series("backend bytes", "B", [held]), Series("file size", "B", [size]), "= file size (ratio 1)")
    fig.met = held == size
    return [fig]


# --- the price of direct I/O: a late mmap -----------------------------------------------------------
def late_mmap(cfg: Config, mount: Mount, refs: References, progress: Progress) -> list[Figure]:
    """mmap(2) of a file whose every page is dirty in another mapping, then one access through that older
    mapping. ``mem`` is opened with direct I/O (so read(2)/write(2) can be refused), and the kernel drops a
    direct-I/O file's whole page cache at every mmap(2): the older mapping's dirty pages are written back
    one request each and its next access faults (docs/architecture.md). The kernel's guest_memfd maps in
    microseconds; this figure says what a VMM pays here for mapping late."""
    size = cfg.size
    ours = Series("ufsgmem mmap(2) + refault, 1 file dirty in another mapping", "s")
    ref = Series("kernel guest_memfd mmap(2) + access", "s") if refs.kernel_gmem is None else None

    def late(fd: int, older: mmap.mmap) -> float:
        memory.first_touch(older, True)  # every page dirty in the older mapping
        start = time.perf_counter()
        with memory._mapped(fd, size):
            older[size // 2] = 3  # the older mapping goes on working
        return time.perf_counter() - start

    with contextlib.ExitStack() as stack:
        f = stack.enter_context(created(mount, "bench-late", size))
        kernel = stack.enter_context(memory.kernel_gmem_file(size)) if ref is not None else None
        fd = os.open(os.path.join(f.path, "mem"), os.O_RDWR)
        stack.callback(os.close, fd)
        older = stack.enter_context(memory._mapped(fd, size))
        for _ in range(max(cfg.reps // 2, 1)):
            ours.values.append(late(fd, older))
            if kernel is not None:
                ref.values.append(late(kernel.fd, kernel.mapping))
    progress.step("late mmap")
    note = "" if ref is not None else f"no kernel guest_memfd to compare with: {refs.kernel_gmem}"
    return [Figure("MMAP.late", f"mmap(2) of {fmt(size, 'B')} while another mapping holds every page dirty, "
                   "and one access through that mapping", ours, ref, "context (the price of direct I/O for mem)",
                   note=note)]


# --- page cache cost --------------------------------------------------------------------------------
def page_cache_cost(cfg: Config, mount: Mount, progress: Progress) -> list[Figure]:
    size = cfg.size
    with created(mount, "bench-cache", size) as f, memory.path_mapping(os.path.join(f.path, "mem"), size) as m:
        memory.first_touch(m, True)
        cached = memory.resident_bytes(m)
        committed = f.status()["committed_bytes"]  # the backend holds it once the dirty pages are written back
    progress.step("page-cache cost")
    fig = Figure("CACHE", "FUSE page-cache bytes held for a fully touched shared mapping, vs backend bytes committed",
                 Series("page cache bytes", "B", [cached]), Series("committed bytes", "B", [committed]),
                 "context (the FUSE page cache duplicates mapped memory)")
    return [fig]


# --- driver -----------------------------------------------------------------------------------------
def machine() -> dict:
    import numpy

    from ..fuse.lowlevel import libfuse_version
    return {
        "kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "ufsgmem": __version__, "libfuse": libfuse_version(),
        "numpy": numpy.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def run(cfg: Config) -> dict:
    progress = Progress(cfg.reps + 15)
    refs = References.probe()
    figures: list[Figure] = []
    with mounted() as mount:
        figures += p1_first_touch(cfg, mount, refs, progress)
        figures += kernel_round_trips(cfg, mount, refs, progress)
        figures += conversion_stream(cfg, mount, refs, progress)
        figures += p4_file_size(cfg, mount, progress)
        figures += page_cache_cost(cfg, mount, progress)
        figures += late_mmap(cfg, mount, refs, progress)
        figures += run_vcpu.figures(cfg, progress, mount)
    figures += floor_round_trips(cfg, refs, progress)
    figures += p3_one_cpu(cfg, progress)
    figures += p3_low_latency(cfg, refs, progress)
    figures += hot_path_python(cfg, progress)
    figures += p5_layout(cfg, progress)
    figures += p6_hugetlb_bytes(cfg, refs, progress)
    return {"machine": machine(), "config": cfg.__dict__, "figures": figures, "unavailable": refs.unavailable}


def report(result: dict) -> str:
    """The table printed at the end: median (min..max over the repetitions) beside the reference."""
    width = max(len(fig.id) for fig in result["figures"])
    lines = [f"{'id':<{width}} {'value (min..max)':>30} {'reference':>12} {'ratio':>8}  target / figure"]
    for fig in result["figures"]:
        ref = fmt(fig.reference.median, fig.reference.unit) if fig.reference else "-"
        ratio = f"{fig.ratio:.3f}" if fig.ratio is not None else "-"
        mark = {True: "MET ", False: "MISS", None: "    "}[fig.met]
        lo, hi = fig.value.spread
        value = fmt(fig.value.median, fig.value.unit)
        if len(fig.value.values) > 1:
            value += f" ({fmt(lo, fig.value.unit)}..{fmt(hi, fig.value.unit)})"
        lines.append(f"{fig.id:<{width}} {value:>30} {ref:>12} {ratio:>8}  "
                     f"{mark} {fig.target} — {fig.title}{' (' + fig.note + ')' if fig.note else ''}")
    if result["unavailable"]:
        lines.append("\nUnavailable on this machine (the figures above that needed them are measured without):")
        lines += [f"  {what}: {reason}" for what, reason in result["unavailable"].items()]
    return "\n".join(lines)


#: The figures with a target, at the top of the JSON; every other one is under ``context``.
TARGETS = ("P1", "P2", "P3", "P4", "P5", "P6", "STREAM")


def to_json(result: dict) -> dict:
    targets = {f.id: f.as_dict() for f in result["figures"] if f.id in TARGETS}
    context = {f.id: f.as_dict() for f in result["figures"] if f.id not in targets}
    return {**targets, "context": context, "unavailable": result["unavailable"], "machine": result["machine"],
            "config": result["config"]}
