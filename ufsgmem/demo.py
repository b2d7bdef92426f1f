"""``ufsgmem demo``: the whole product on built-in defaults, end to end, leaving nothing behind.

What it does, on a real mount in a temporary directory:

1. picks the best backend available: ``hugetlb`` with 2 MiB pages when the pool can be grown by the
   pages the file needs (they are given back at the end), else ``anon``;
2. mounts ufsgmem in the background (``ufsgmem mount``) and creates a guest_memfd with MMAP;
3. starts a second process, the *mapper* (think: a device model or a migration thread of the VMM), that
   maps ``mem`` MAP_SHARED and fills it with a pattern, then answers requests to check, write and
   probe pages. A probe forks a child that reads one byte through the inherited mapping, so a SIGBUS
   is observed by the mapper and reported, without killing it;
4. drives a VMM-like script from this process: shared→private conversions of a huge page, a single
   4 KiB page and a large range while the mapper has them mapped and dirty (each timed: that is the
   revocation cost), SIGBUS on private pages but not their neighbours, the guest's view of private
   memory (content preserved), a guest write to a private page seen by the host after converting back,
   a punch-hole that zeroes, a pin that makes conversion fail with EAGAIN at the pinned page;
5. exports the layout (text summary and a PNG) when the layout exporters are installed;
6. prints a summary, then destroys the file, unmounts and gives the huge pages back, also on error and
   Ctrl-C.

The mapper is this module run with ``--mapper``; it speaks one JSON object per line on stdin/stdout.
"""

from __future__ import annotations

import contextlib
import errno
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from . import hugepages
from .address import format_size
from .client import GmemFile, Mount
from .errors import errname
from .uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, SZ_2M, SZ_4K

DEFAULT_SIZE = 64 << 20
NAME = "guest0"
#: KVM's rule (a block only where attributes agree and the folio is whole) shows what conversions cost
LAYOUT_VIEW = "kvm"


def _say(text: str) -> None:
    print(text, flush=True)


# --- huge pages -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hugepages_2m(count: int):
    """Grow the 2 MiB pool by ``count`` pages for the block; yield ``count``, or 0 if it could not grow.

    Gives back exactly what it added (see :mod:`ufsgmem.hugepages`).
    """
    if count <= 0:
        yield 0
        return
    with hugepages.reserved(SZ_2M, count) as got:
        yield count if got == count else 0


def hugetlb_available() -> bool:
    from .plugins import BACKENDS, available
    return "hugetlb" in available(BACKENDS) and hugepages.unavailable_reason(SZ_2M) is None


# --- the mount --------------------------------------------------------------------------------------------
def _ufsgmem(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ufsgmem", *args], capture_output=True, text=True,
                          check=False, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def mounted(mountpoint: str):
    """A background ufsgmem mount for the block, unmounted afterwards whatever happens."""
    os.makedirs(mountpoint, exist_ok=True)
    done = _ufsgmem("mount", mountpoint)
    if done.returncode != 0:
        raise RuntimeError(f"ufsgmem mount {mountpoint} failed: {done.stderr.strip() or done.stdout.strip()}")
    try:
        yield mountpoint
    finally:
        done = _ufsgmem("umount", mountpoint)
        if done.returncode != 0 and os.path.ismount(mountpoint):
            subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
        if os.path.ismount(mountpoint):
            print(f"demo: WARNING: {mountpoint} is still mounted: {done.stderr.strip()}", file=sys.stderr)


# --- the second process -----------------------------------------------------------------------------------
class Mapper:
    """The parent's handle on the mapper process (one JSON request and one JSON answer per line)."""

    def __init__(self, path: str):
        # Ctrl-C is for the demo, which then closes our stdin: the mapper runs in a session of its own, so
        # the terminal's SIGINT never reaches it. (Not a preexec_fn that ignores SIGINT: the fork handlers
        # preexec_fn runs in this process would swallow a Ctrl-C that arrives right then.)
        self.proc = subprocess.Popen([sys.executable, "-m", "ufsgmem.demo", "--mapper", path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)
        self.pid = self.proc.pid
        self.ask(op="ready")

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the mapper process (pid {self.pid}) died: exit {self.proc.wait()}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"mapper: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pattern(offset: int) -> int:
    """The byte the mapper writes into the page at ``offset`` (distinct for neighbouring pages)."""
    return (offset // SZ_4K) % 251 + 1


def mapper_main(path: str) -> int:
    """The mapper: maps ``path/mem`` and serves requests until stdin closes."""
    f = GmemFile(path)
    m = f.map()
    try:
        _serve(m.array())  # every view lives in _serve's frame, so the mapping can close after it
    finally:
        m.close()
        f.close()
    return 0


def _serve(mem) -> None:
    import numpy as np

    pages = np.arange(len(mem) // SZ_4K, dtype=np.int64)
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "ready":
                answer = {"pid": os.getpid(), "size": len(mem)}
            elif op == "fill":  # every page gets its pattern byte
                off, size = req["offset"], req["size"]
                view = mem[off:off + size].reshape(-1, SZ_4K)
                view[:] = (((off // SZ_4K + pages[:len(view)]) % 251) + 1).astype(np.uint8)[:, None]
                answer = {"written": size}
            elif op == "check":  # content of shared pages: the pattern, or a given byte
                off, size = req["offset"], req["size"]
                view = mem[off:off + size].reshape(-1, SZ_4K)
                want = (np.full(len(view), req["byte"], dtype=np.uint8) if "byte" in req else
                        (((off // SZ_4K + pages[:len(view)]) % 251) + 1).astype(np.uint8))
                bad = np.nonzero((view != want[:, None]).any(axis=1))[0]
                answer = {"ok": not len(bad), "bad_pages": int(len(bad)),
                          "first_bad": int(off + bad[0] * SZ_4K) if len(bad) else None}
            elif op == "probe":  # read one byte in a forked child: SIGBUS or the value
                answer = _probe(mem, req["offset"])
            else:
                answer = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # report, keep serving: the parent decides
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def _probe(mem, offset: int) -> dict:
    pid = os.fork()
    if pid == 0:  # the child: touch the page through the inherited mapping (SIGBUS if private)
        faulthandler.disable()  # the SIGBUS is expected: no traceback dump
        try:
            int(mem[offset])
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return {"signal": signal.Signals(sig).name, "pid": pid}
    return {"signal": None, "pid": pid, "readable": True}


# --- the VMM-like script ----------------------------------------------------------------------------------
@dataclass
class Summary:
    backend: str = ""
    page_size: int = 0
    size: int = 0
    #: the scenario works in 2 MiB blocks whatever the backend's page size
    huge: int = SZ_2M
    hugepages_reserved: int = 0
    conversions: int = 0
    revocations_ms: list[float] = field(default_factory=list)
    sigbus_seen: int = 0
    sigbus_expected: int = 0
    neighbours_ok: int = 0
    content_checks: int = 0
    content_failures: int = 0
    eagain_offset: int | None = None
    layout: list[str] = field(default_factory=list)
    status: dict = field(default_factory=dict)

    def check(self, ok: bool, what: str) -> None:
        self.content_checks += 1
        if not ok:
            self.content_failures += 1
            _say(f"  !! content check failed: {what}")


def scenario(f: GmemFile, mapper: Mapper, s: Summary, out_dir: str) -> None:
    """The VMM-like script of step 4 (and the layout of step 5), one function a step, in the order run."""
    share_and_fill(f, mapper, s)
    ranges = convert_to_private(f, s)
    probe_private(f, mapper, s, ranges)
    export_layout(f, out_dir, s)  # while shared and private memory are mixed: the interesting layout
    guest_write_then_share(f, mapper, s, ranges)
    punch_hole(f, mapper, s)
    pinned_page_blocks_conversion(f, s)
    s.status = f.status()


def share_and_fill(f: GmemFile, mapper: Mapper, s: Summary) -> None:
    """Make the whole file shared (huge-page files start private; the VMM shares them for setup) and have
    the mapper write the pattern on every page through its mapping."""
    if not f.status()["flags"] & GUEST_MEMFD_FLAG_INIT_SHARED:
        f.convert(0, s.size, to="shared")
        s.conversions += 1
    mapper.ask(op="fill", offset=0, size=s.size)
    _say(f"mapper (pid {mapper.pid}) mapped {format_size(s.size)} MAP_SHARED and wrote a pattern on every page")


def convert_to_private(f: GmemFile, s: Summary) -> list[tuple[int, int, str]]:
    """Shared -> private while mapped and dirty in the mapper: each conversion revokes, and is timed.
    Returns the ranges converted, ``(offset, length, what)``."""
    size, huge = s.size, s.huge
    ranges = [(0, huge, "one huge page"), (4 * huge + SZ_4K, SZ_4K, "a single 4K page inside a 2M block"),
              (size // 2, size // 4, f"a {format_size(size // 4)} range")]
    for offset, length, what in ranges:
        start = time.perf_counter()
        f.convert(offset, length, to="private")
        s.revocations_ms.append((time.perf_counter() - start) * 1e3)
        s.conversions += 1
        _say(f"VMM: converted {what} [{offset:#x}, {offset + length:#x}) to private in "
             f"{s.revocations_ms[-1]:.2f} ms")
    return ranges


def probe_private(f: GmemFile, mapper: Mapper, s: Summary, ranges: list[tuple[int, int, str]]) -> None:
    """The host gets SIGBUS on the private ranges and not on the shared page after each; the guest reads
    their content unchanged."""
    for offset, length, _ in ranges:
        s.sigbus_expected += 1
        probe = mapper.ask(op="probe", offset=offset)
        if probe["signal"] == "SIGBUS":
            s.sigbus_seen += 1
            _say(f"mapper (pid {mapper.pid}): its child {probe['pid']} read private page {offset:#x} through "
                 f"the mapping and was killed by SIGBUS")
        after = offset + length
        if after < s.size and mapper.ask(op="probe", offset=after)["signal"] is None:
            s.neighbours_ok += 1
        s.check(f.guest_read(offset, 1)[0] == pattern(offset) and
                f.guest_read(offset + length - 1, 1)[0] == pattern(offset + length - 1),
                f"guest view of private [{offset:#x}, {offset + length:#x})")
    _say(f"mapper: host reads of the private ranges raised SIGBUS {s.sigbus_seen}/{s.sigbus_expected} times; "
         f"the shared pages right after them stayed readable {s.neighbours_ok}/{len(ranges)}")


def guest_write_then_share(f: GmemFile, mapper: Mapper, s: Summary, ranges: list[tuple[int, int, str]]) -> None:
    """The guest writes to a private page; converting everything back shows it to the host, and every
    other byte is preserved."""
    size, huge = s.size, s.huge
    guest_page = 4 * huge + SZ_4K
    f.guest_write(guest_page, b"\xee" * SZ_4K)
    for offset, length, _ in ranges:
        f.convert(offset, length, to="shared")
        s.conversions += 1
    s.check(mapper.ask(op="check", offset=guest_page, size=SZ_4K, byte=0xEE)["ok"],
            "guest write to a private page visible to the host after converting to shared")
    s.check(mapper.ask(op="check", offset=0, size=guest_page)["ok"], "content before the guest page preserved")
    s.check(mapper.ask(op="check", offset=guest_page + SZ_4K, size=size - guest_page - SZ_4K)["ok"],
            "content after the guest page preserved")
    _say("VMM: converted everything back to shared; the mapper sees the guest's write and every other byte "
         "unchanged")


def punch_hole(f: GmemFile, mapper: Mapper, s: Summary) -> None:
    """Punch-hole zeroes (and revokes) one huge page; the attribute stays shared."""
    huge = s.huge
    f.punch_hole(2 * huge, huge)
    s.check(mapper.ask(op="check", offset=2 * huge, size=huge, byte=0)["ok"], "punched range reads as zeros")
    s.check(mapper.ask(op="check", offset=3 * huge, size=huge)["ok"], "the range after the hole is intact")
    _say(f"VMM: punched [{2 * huge:#x}, {3 * huge:#x}): the mapper reads zeros there, intact data next to it")


def pinned_page_blocks_conversion(f: GmemFile, s: Summary) -> None:
    """A pinned page (a device doing DMA) makes shared -> private fail with EAGAIN at that page; once
    unpinned, the same conversion succeeds."""
    huge = s.huge
    pinned = 5 * huge + 3 * SZ_4K
    f.pin(pinned, SZ_4K)
    try:
        f.convert(5 * huge, huge, to="private")
    except OSError as exc:
        s.eagain_offset = getattr(exc, "error_offset", None) if exc.errno == errno.EAGAIN else None
        where = f", error_offset {s.eagain_offset:#x}" if s.eagain_offset is not None else ""
        _say(f"VMM: converting [{5 * huge:#x}, {6 * huge:#x}) with page {pinned:#x} pinned (a device doing DMA) "
             f"failed with {errname(exc.errno)}{where}")
    else:
        s.check(False, "conversion over a pinned page must fail with EAGAIN")
    f.unpin(pinned, SZ_4K)
    f.convert(5 * huge, huge, to="private")
    s.conversions += 1
    _say("VMM: unpinned, and the same conversion succeeded")


def export_layout(f: GmemFile, out_dir: str, s: Summary) -> None:
    """Text summary and PNG of the S2 layout, when the layout exporters are installed."""
    import importlib.util
    from .errors import PluginError
    from .plugins import load_exporter
    if importlib.util.find_spec("ufsgmem.layout") is None:
        s.layout.append("layout export skipped: ufsgmem.layout is not installed yet")
        return
    try:
        snapshot = f.snapshot()
        os.makedirs(out_dir, exist_ok=True)
        for name in ("text", "png"):
            exporter = load_exporter(name)
            data = exporter.export(snapshot, view=LAYOUT_VIEW, arch="x86_64")
            path = os.path.join(out_dir, f"layout-{LAYOUT_VIEW}{exporter.suffix}")
            with open(path, "wb") as out:
                out.write(data)
            s.layout.append(f"{name} layout ({LAYOUT_VIEW} view, taken while 3 ranges were private) written to "
                            f"{path} ({len(data)} bytes)")
            if name == "text":
                s.layout.extend("  " + line for line in data.decode(errors="replace").splitlines()[:12])
    except (PluginError, Exception) as exc:  # the demo's job is the mount; report and go on
        s.layout.append(f"layout export skipped: {type(exc).__name__}: {exc}")


def print_summary(s: Summary) -> None:
    st = s.status
    times = sorted(s.revocations_ms)
    _say("")
    _say("=== ufsgmem demo summary ===")
    _say(f"file           {format_size(s.size)} on backend {s.backend}, page size {format_size(s.page_size)}"
         + (f" ({s.hugepages_reserved} huge pages reserved for the demo)" if s.hugepages_reserved else ""))
    conv = st.get("conversions", {})
    _say(f"conversions    {s.conversions} requested; the server counted {conv.get('to_private', 0)} to private, "
         f"{conv.get('to_shared', 0)} to shared, {conv.get('eagain', 0)} refused with EAGAIN")
    if times:
        _say(f"revocation     shared->private of mapped, dirty ranges: min {times[0]:.2f} ms, "
             f"max {times[-1]:.2f} ms")
    _say(f"revocations    {st.get('revocations', 0)} ({format_size(st.get('revoked_bytes', 0))} unmapped)")
    _say(f"SIGBUS         seen {s.sigbus_seen} of {s.sigbus_expected} expected (from the mapper's probes); "
         f"neighbours readable {s.neighbours_ok}")
    _say(f"pin            EAGAIN with error_offset "
         f"{hex(s.eagain_offset) if s.eagain_offset is not None else 'missing'}")
    _say(f"content checks {s.content_checks - s.content_failures}/{s.content_checks} passed")
    whole = st.get("huge_folios", {})
    if s.page_size > SZ_4K:
        _say(f"huge folios    {whole.get('whole', 0)} whole, {whole.get('split', 0)} split")
    for line in s.layout:
        _say(line)


def ok(s: Summary) -> bool:
    return (s.content_failures == 0 and s.sigbus_seen == s.sigbus_expected and s.eagain_offset is not None)


def run(size: int = DEFAULT_SIZE, out_dir: str | None = None, backend: str | None = None) -> int:
    """The demo; returns the exit status (0 when every check passed)."""
    work = tempfile.mkdtemp(prefix="ufsgmem-demo-")
    out_dir = out_dir or os.path.join(work, "out")
    s = Summary(size=size)
    want_huge = backend in (None, "hugetlb") and hugetlb_available()
    try:
        with hugepages_2m(size // SZ_2M if want_huge else 0) as reserved:
            s.hugepages_reserved = reserved
            if want_huge and reserved:
                s.backend = "hugetlb"
            else:
                if backend == "hugetlb":
                    raise RuntimeError("hugetlb asked for, but the 2 MiB pool could not be grown")
                s.backend = backend or "anon"
            why = (f", {reserved} x 2 MiB huge pages reserved" if reserved else " (as asked)" if backend else
                   " (hugetlb unavailable or the pool could not be grown)")
            _say(f"demo: backend {s.backend}{why}")
            mnt = os.path.join(work, "mnt")
            with mounted(mnt):
                _say(f"demo: mounted ufsgmem on {mnt}")
                with Mount(mnt) as mount:
                    flags = GUEST_MEMFD_FLAG_MMAP | (0 if s.backend == "hugetlb" else GUEST_MEMFD_FLAG_INIT_SHARED)
                    f = mount.create(NAME, size, flags, backend=s.backend,
                                     page_size=SZ_2M if s.backend == "hugetlb" else None)
                    st = f.status()
                    s.page_size = st["page_size"]
                    _say(f"demo: created {NAME}: {format_size(size)}, flags {','.join(st.get('flag_names', []))}, "
                         f"page size {format_size(st['page_size'])}")
                    mapper = None
                    try:
                        mapper = Mapper(f.path)
                        scenario(f, mapper, s, out_dir)
                    finally:
                        if mapper is not None:
                            mapper.close()
                        f.close()
                        with contextlib.suppress(OSError):
                            mount.destroy(NAME)
        print_summary(s)
        _say("demo: unmounted, huge pages given back" if s.hugepages_reserved else "demo: unmounted")
        return 0 if ok(s) else 1
    except KeyboardInterrupt:
        print("demo: interrupted; everything was unmounted and released", file=sys.stderr)
        return 130
    finally:
        if not os.path.ismount(os.path.join(work, "mnt")):
            keep = out_dir.startswith(work) and os.path.isdir(out_dir) and os.listdir(out_dir)
            if keep:
                shutil.rmtree(os.path.join(work, "mnt"), ignore_errors=True)
            else:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--mapper":
        sys.exit(mapper_main(sys.argv[2]))
    sys.exit(run())
