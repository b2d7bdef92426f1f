"""``ufsgmem run`` figures: a vCPU's accesses to shared and private pages, and a VMM's conversion, under run.

``run_vcpu.c`` (built per bench run, like the floor server) is a tiny uAPI-only VMM. Under ``ufsgmem run``
it creates its guest_memfd with ``KVM_CREATE_GUEST_MEMFD`` and binds it gmem-only, so private pages are
reached through the private view; on the bench's plain mount it maps ``mem`` and hands KVM that mapping
(``examples/vmm``'s way), which reaches shared pages only. Figures (µs, median over the repetitions):

* R1.first / R1.repeated — a guest's first and repeated access to a private page against a shared one,
  both under run. An access is two KVM_RUN exits (I/O, HLT), which is most of "repeated"; "first" adds the
  fault, a FUSE page fill of the private view or of ``mem``.
* R1.shared — a guest's first access to a shared page under run against the same on a plain mount.
* R2 — a 4 KiB shared→private→shared round trip of ``KVM_SET_MEMORY_ATTRIBUTES2`` on a page the guest
  touched, seen from the VMM: under run (conversion, then the remap of the hidden range) against the same
  ioctl on a plain mount's ``mem``.

Caveat: "first" is a first access by the guest, not necessarily a cold page cache: readahead of an
earlier fill may already hold the page (for ``mem`` and for the private view alike).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from .stats import Figure, Series

SOURCE = os.path.join(os.path.dirname(__file__), "run_vcpu.c")
REPS, NPAGES = 5, 12  # the guest reaches 512 KiB of slot in real mode: REPS * 2 * NPAGES + 1 pages


def _parse(out: str) -> list[list[float]]:
    return [[float(x) for x in line.split()] for line in out.splitlines() if line.strip()]


def figures(cfg, progress, mount) -> list[Figure]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not os.path.exists("/dev/kvm"):
        progress.step("ufsgmem run figures: skipped (no C compiler or no /dev/kvm)")
        return []
    with tempfile.TemporaryDirectory(prefix="ufsgmem-run-bench-") as build:
        exe = os.path.join(build, "run_vcpu")
        built = subprocess.run([cc, "-O2", "-Wall", "-o", exe, SOURCE], capture_output=True, text=True)
        if built.returncode != 0:
            progress.step(f"ufsgmem run figures: skipped (build failed: {built.stderr.strip()[:200]})")
            return []
        under = subprocess.run([sys.executable, "-m", "ufsgmem", "run", "--", exe, "uapi", str(REPS), str(NPAGES)],
                               capture_output=True, text=True, timeout=600)
        name = f"runbench{os.getpid()}"
        size = (REPS * 2 * NPAGES + 1) * 4096
        mount.create(name, size, "mmap|init_shared").close()
        try:
            plain = subprocess.run([exe, "plain", os.path.join(mount.path, name, "mem"), str(REPS), str(NPAGES)],
                                   capture_output=True, text=True, timeout=600)
        finally:
            mount.destroy(name)
    if under.returncode != 0 or plain.returncode != 0:
        progress.step(f"ufsgmem run figures: failed ({(under.stderr + plain.stderr).strip()[:300]})")
        return []
    progress.step("ufsgmem run: guest accesses and conversions under run and on a plain mount")
    u, p = _parse(under.stdout), _parse(plain.stdout)

    def series(name: str, rows, col: int) -> Series:
        return Series(name, "s", [row[col] * 1e-6 for row in rows])
    first_private, first_shared = series("first private, run", u, 2), series("first shared, run", u, 0)
    return [
        Figure("R1.first", "guest's first access to a private page vs a shared one, under ufsgmem run",
               first_private, first_shared, "context"),
        Figure("R1.repeated", "guest's repeated access to a private page vs a shared one, under ufsgmem run",
               series("repeated private, run", u, 3), series("repeated shared, run", u, 1), "context"),
        Figure("R1.shared", "guest's first access to a shared page, under ufsgmem run vs a plain mount's mem",
               first_shared, series("first shared, plain mount", p, 0), "context"),
        Figure("R2", "4 KiB shared->private->shared ioctl round trip seen from the VMM, under ufsgmem run vs a "
               "plain mount", series("round trip, run", u, 4), series("round trip, plain mount", p, 4), "context"),
    ]


def main() -> int:
    """``python -m ufsgmem.bench.run_vcpu``: these figures alone, on a fresh mount."""
    from .suite import Config, Progress, mounted, report
    with mounted() as mount:
        figs = figures(Config(), Progress(1), mount)
    print(report({"figures": figs}))
    return 0 if figs else 1


if __name__ == "__main__":
    sys.exit(main())
