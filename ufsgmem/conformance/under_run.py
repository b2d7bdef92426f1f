"""The third subject: the suite's kernel code run as a program under ``ufsgmem run``.

``ufsgmem run`` sees the calls a FUSE mount never sees (mmap(2), open(2) of ``/proc/self/fd/N``,
fstatfs(2), the create struct), so a program under it meets the kernel's answer where a plain mount
cannot give it. To show which of the mount's deviations that removes, every case runs in a child started
as a user would start a program: ``python -m ufsgmem run -- python -m ufsgmem.conformance.under_run --out
FILE``. The child runs the cases on :class:`~ufsgmem.conformance.subjects.KernelSubject`, the code that
drives the live kernel (``KVM_CREATE_GUEST_MEMFD`` on a fresh VM fd, then plain system calls), which the
interposer answers from its private mount; the v8 conversion rules on a VM with private memory
(:func:`subject_for`). It writes ``{"cases": {name: observation}}`` to FILE (JSON:
observations are dicts of short strings, so they come back equal), and the parent judges them with
:func:`.runner.judge_observations` against the same reference and the mount's deviation list
(:data:`~ufsgmem.conformance.deviations.REMOVED_BY_RUN` are the entries run must remove).

Why a file and not stdout: the program's stdout and stderr are the program's (and ``run``'s), so a
warning printed by anything cannot corrupt the observations.

Where ``run`` cannot work (no ``/dev/kvm``, no FUSE, no C compiler for the interposer),
:func:`unavailable_reason` says why before anything starts; the page then says so instead of failing.
A run that starts and then fails is an error (:class:`RunFailed`), never an empty column.

The child refuses to run outside ``ufsgmem run`` (no ``UFSGMEM_RUN_MOUNT``): there it would observe the
machine's kernel and the column would silently show something else.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from .cases import CASES, Case

#: Bound on the whole child run; every case is bounded itself, this catches a wedged one.
TIMEOUT = 600.0
ENV_MOUNT = "UFSGMEM_RUN_MOUNT"  # set by ufsgmem run for the program (ufsgmem.run.session)


class RunFailed(RuntimeError):
    """The child under ``ufsgmem run`` started but gave no observations (the message says why)."""


def unavailable_reason() -> str | None:
    """None when ``ufsgmem run`` can run the suite here; otherwise why not (a short, stable sentence)."""
    from ..run import ShimUnavailable, build_shim
    from ..testing.gmemfd import fuse_unavailable_reason
    from .subjects import vm_unavailable_reason

    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent (ufsgmem run gives its files to KVM)"
    reason = vm_unavailable_reason() or fuse_unavailable_reason()
    if reason:
        return reason
    try:
        build_shim()
    except ShimUnavailable as exc:
        return str(exc)
    return None


def command(out: str) -> list[str]:
    """The command line: ``ufsgmem run`` (its own private mount) around this module's child."""
    return [sys.executable, "-m", "ufsgmem", "run", "--", sys.executable, "-m", __name__, "--out", out]


def observe_all(cases: list[Case] = CASES, timeout: float = TIMEOUT) -> dict[str, dict | str]:
    """Every case's observation under ``ufsgmem run``, by case name; :class:`RunFailed` if the child fails."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(prefix="ufsgmem-under-run-") as tmp:
        out = os.path.join(tmp, "observations.json")
        argv = command(out) + [c.name for c in cases if cases is not CASES]
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:  # run killed with the child: PDEATHSIG takes its program and mount
            raise RunFailed(f"the suite under ufsgmem run did not finish within {timeout:g} s") from None
        if done.returncode != 0 or not os.path.exists(out):
            raise RunFailed(f"the suite under ufsgmem run exited with status {done.returncode}: "
                            f"{(done.stderr or done.stdout).strip()[-1500:]}")
        with open(out) as f:
            observed = json.load(f)["cases"]
    missing = [c.name for c in cases if c.name not in observed]
    if missing:
        raise RunFailed(f"the suite under ufsgmem run gave no observation of {missing}")
    return observed


# --- the child -------------------------------------------------------------------------------------------
KVM_X86_SW_PROTECTED_VM = 1


def subject_for(case: Case):
    """The kernel subject's code on the VM type the case needs: a default VM, as the recorded kernel ran
    every case, except for the v8 conversion rules. Those are the rules of a VM with private memory (design
    §7.3); v8 refuses every conversion on a default VM (EINVAL: its VM has no private memory), so they run
    on ``KVM_X86_SW_PROTECTED_VM``, the type run serves for them, as the kernel's conversion selftests do."""
    from .subjects import KernelSubject

    if case.v8 is None:
        return KernelSubject

    class ProtectedVmSubject(KernelSubject):
        vm_type = KVM_X86_SW_PROTECTED_VM
    return ProtectedVmSubject


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {__name__}",
                                     description="run the conformance cases as a program under ufsgmem run")
    parser.add_argument("--out", required=True, help="write the observations here (JSON)")
    parser.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = parser.parse_args(argv)
    if not os.environ.get(ENV_MOUNT):
        print(f"{parser.prog}: not under ufsgmem run ({ENV_MOUNT} is unset); natively this would observe the "
              "machine's kernel, not run", file=sys.stderr)
        return 2
    from .runner import observe

    wanted = set(args.cases)
    observed = {c.name: observe(c, subject_for(c)) for c in CASES if not wanted or c.name in wanted}
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cases": observed}, f, ensure_ascii=False)
    os.replace(tmp, args.out)  # whole or absent: the parent never reads half a file
    return 0


if __name__ == "__main__":
    sys.exit(main())
