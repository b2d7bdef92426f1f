"""examples/gmem_uapi.c, built with cc and run twice over: against the kernel's own guest_memfd (``--kvm``)
and against a file on a ufsgmem mount (``--path``). The program knows only the kernel uAPI (read/write,
pread/pwrite, mmap, fallocate, ioctl KVM_SET_MEMORY_ATTRIBUTES2 on the fd), so the same checks passing on
both is the claim that ufsgmem's ``mem`` behaves like a guest_memfd to a VMM.

On a kernel without in-place conversion (mainline up to at least 6.18) the ioctl is ENOTTY and the
program reports its conversion checks as skipped; on a mount nothing may be skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusefix import requires_fuse
from ufsgmem import kvm

SOURCE = Path(__file__).resolve().parent.parent / "examples" / "gmem_uapi.c"
SIZE = 4 << 20
PINNED = 0x2000
TIMEOUT = 60  # seconds, for any one run of the program
SKIPPED_ALL = 77  # the program could not get a guest_memfd of this kind here ("1..0 # SKIP reason")

CHECK_LINE = re.compile(r"^(not ok|ok) (\d+) - (.*)$")
SUMMARY_LINE = re.compile(r"^(\d+) passed, (\d+) failed(?:, (\d+) skipped)?$")


@dataclass
class Check:
    ok: bool
    number: int
    text: str

    @property
    def skipped(self) -> bool:
        return self.ok and " # SKIP " in self.text


@pytest.fixture(scope="module")
def gmem_uapi(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler: neither cc nor gcc is on PATH")
    exe = tmp_path_factory.mktemp("uapi") / "gmem_uapi"
    built = subprocess.run([compiler, "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe), str(SOURCE)],
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert built.returncode == 0, f"{SOURCE.name} does not compile cleanly:\n{built.stderr}"
    return exe


def run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=TIMEOUT)


def output(done: subprocess.CompletedProcess) -> str:
    return f"exit status {done.returncode}\n--- stdout\n{done.stdout}--- stderr\n{done.stderr}"


def checks(done: subprocess.CompletedProcess) -> list[Check]:
    """The numbered checks, after making sure the plan and the summary agree with them."""
    lines = done.stdout.splitlines()
    found = [Check(m[1] == "ok", int(m[2]), m[3]) for m in map(CHECK_LINE.match, lines) if m]
    assert found, f"no check lines at all\n{output(done)}"
    assert [c.number for c in found] == list(range(1, len(found) + 1)), f"checks out of order\n{output(done)}"
    assert f"1..{len(found)}" in lines, f"no plan line 1..{len(found)}\n{output(done)}"
    summaries = [m for m in map(SUMMARY_LINE.match, lines) if m]
    assert len(summaries) == 1, f"expected one summary line\n{output(done)}"
    passed, failed, skipped = (int(g or 0) for g in summaries[0].groups())
    assert (passed, failed, skipped) == (sum(c.ok and not c.skipped for c in found),
                                         sum(not c.ok for c in found), sum(c.skipped for c in found)), \
        f"the summary does not count the check lines\n{output(done)}"
    return found


@pytest.mark.kvm
def test_against_the_kernel(gmem_uapi):
    """The reference: every check the kernel can answer agrees with the kernel; conversion may be skipped."""
    reason = kvm.skip_reason()
    if reason:
        pytest.skip(reason)
    done = run(gmem_uapi, "--kvm", "--size", str(SIZE))
    if done.returncode == SKIPPED_ALL:
        pytest.skip(f"--kvm: {done.stdout.strip().removeprefix('1..0 # SKIP ')}")
    assert done.returncode == 0, output(done)
    found = checks(done)
    assert all(c.ok for c in found), output(done)
    for c in found:
        if c.skipped:  # the only acceptable reason to skip on a kernel
            assert c.text.endswith("# SKIP KVM_SET_MEMORY_ATTRIBUTES2 is ENOTTY here"), output(done)


def assert_all_ok_nothing_skipped(done: subprocess.CompletedProcess) -> list[Check]:
    assert done.returncode == 0, output(done)
    found = checks(done)
    assert all(c.ok for c in found), output(done)
    assert not any(c.skipped for c in found), f"a ufsgmem mount must support conversion\n{output(done)}"
    return found


@requires_fuse
@pytest.mark.fuse
def test_against_a_mount(gmem_uapi, gmem):
    g = gmem(SIZE, "mmap|init_shared")
    done = run(gmem_uapi, "--path", g.path("mem"), "--size", str(SIZE))
    found = assert_all_ok_nothing_skipped(done)
    assert any("SIGBUS reading page" in c.text for c in found), output(done)


@requires_fuse
@pytest.mark.fuse
def test_against_a_mount_with_a_pinned_page(gmem_uapi, gmem):
    """Page 2 pinned through NAME/ctl: the bulk conversion is EAGAIN at 0x2000, the rest converts around it."""
    g = gmem(SIZE, "mmap|init_shared")
    g.request(f"pin offset={PINNED:#x} size=0x1000")
    unpin_error = None
    try:
        done = run(gmem_uapi, "--path", g.path("mem"), "--size", str(SIZE), "--pinned", hex(PINNED))
    finally:
        try:
            g.request(f"unpin offset={PINNED:#x} size=0x1000")
        except OSError as exc:
            unpin_error = exc
    found = assert_all_ok_nothing_skipped(done)
    assert any(f"EAGAIN, error_offset {PINNED:#x}" in c.text for c in found), output(done)
    assert f"# page {PINNED:#x} is pinned (EAGAIN): left shared" in done.stdout.splitlines(), output(done)
    assert unpin_error is None, f"unpin after the run: {unpin_error}"
