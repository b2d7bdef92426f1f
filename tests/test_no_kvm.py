"""Without ``/dev/kvm`` (most containers and CI runners), everything that needs no vCPU keeps working.

The machine's ``/dev`` is replaced, in a private mount namespace (``unshare --mount``) and for the
processes started there only, by a tmpfs holding what a container has (null, zero, full, random,
urandom, tty, fuse, shm, the fd links) and no ``kvm``. In there:

* ``ufsgmem demo`` runs to its end (mount, create, conversions from a VMM-like script, SIGBUS, layout,
  unmount);
* the code that reaches KVM says that it is absent instead of failing obscurely: ``kvm.skip_reason()``
  names ``/dev/kvm``, and the testing API's kernel target gives that reason;
* the test files that touch KVM pass, or skip with a reason that names ``/dev/kvm``; none errors, and the
  FUSE tests among them still run.

Root only (a mount namespace and device nodes); skips with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fusefix import requires_fuse
pytestmark = [requires_fuse, pytest.mark.fuse, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
#: the device nodes a container typically has (and FUSE), made afresh in the private /dev
NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse")
#: test files with KVM-touching tests: in the namespace each passes, or skips naming /dev/kvm
KVM_TEST_FILES = ("tests/test_kvm.py", "tests/test_c_uapi.py", "tests/test_vmm_example.py",
                  "tests/test_conformance.py")


def _private_dev_setup() -> str:
    """Shell commands that replace /dev in the current (private) mount namespace, without kvm."""
    lines = ["mount -t tmpfs -o mode=0755,nosuid ufsgmem-test-nokvm /dev"]
    for name in NODES:
        path = f"/dev/{name}"
        if not os.path.exists(path):
            continue
        st = os.stat(path)
        lines.append(f"mknod -m {stat.S_IMODE(st.st_mode):o} {path} c {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
    lines += ["mkdir -m 1777 /dev/shm", "mount -t tmpfs -o mode=1777,nosuid,nodev ufsgmem-test-shm /dev/shm",
              "ln -s /proc/self/fd /dev/fd", "ln -s /proc/self/fd/0 /dev/stdin",
              "ln -s /proc/self/fd/1 /dev/stdout", "ln -s /proc/self/fd/2 /dev/stderr"]
    return "; ".join(lines)


def without_kvm(*command: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``command`` in a mount namespace whose /dev has no kvm; its result (bounded by ``timeout``)."""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-ec",
                           _private_dev_setup() + '; exec "$@"', "sh", *command],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def root_and_unshare():
    if os.geteuid() != 0:
        pytest.skip("a mount namespace with its own /dev needs root")
    if shutil.which("unshare") is None or shutil.which("mknod") is None:
        pytest.skip("unshare and mknod (util-linux, coreutils) are needed")


def test_the_namespace_really_has_no_kvm():
    done = without_kvm(sys.executable, "-c",
                       "import os; print(os.path.exists('/dev/kvm'), os.path.exists('/dev/fuse'))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"], done.stdout


def test_the_demo_runs_without_kvm(tmp_path):
    # --out: the demo keeps what it wrote for the person who ran it; a test keeps it in its own tmp_path
    done = without_kvm(sys.executable, "-m", "ufsgmem", "demo", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "demo: unmounted" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr, done.stderr


REPORTS = r"""
import json
from ufsgmem import kvm
from ufsgmem.testing.gmemfd import kernel_unavailable_reason
try:
    kvm.Kvm()
    opened = "opened"
except OSError as exc:
    opened = str(exc)
print(json.dumps({"skip_reason": kvm.skip_reason(), "testing": kernel_unavailable_reason(), "open": opened}))
"""


def test_kvm_code_reports_the_absence():
    done = without_kvm(sys.executable, "-c", REPORTS)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["skip_reason"] == "/dev/kvm is absent (no KVM on this machine)", out
    assert "/dev/kvm" in out["testing"], out
    assert "/dev/kvm" in out["open"], out


def test_kvm_test_files_pass_or_skip_naming_dev_kvm():
    """The KVM-touching test files, run in the namespace: no failure, no error, every skip of a test
    marked ``kvm`` names /dev/kvm, and the FUSE tests among them still pass."""
    done = without_kvm(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                       *KVM_TEST_FILES, timeout=1200)
    text = done.stdout + done.stderr
    summary = text.strip().splitlines()[-1] if text.strip() else ""
    assert done.returncode == 0, text[-6000:]
    assert " failed" not in summary and " error" not in summary, summary
    passed = re.search(r"(\d+) passed", summary)
    assert passed, f"nothing ran: {summary}"
    # the conformance cases compare with the kept record, so they run here too (over a hundred of them)
    assert int(passed[1]) > 100, f"the conformance cases did not run without /dev/kvm: {summary}"
    skips = [line for line in text.splitlines() if line.startswith("SKIPPED")]
    unexplained = [line for line in skips if "/dev/kvm" not in line and "kvm" in line.lower()]
    assert not unexplained, "\n".join(unexplained)
    assert any("/dev/kvm" in line for line in skips), f"no test said it skipped for want of /dev/kvm:\n{text[-3000:]}"
