"""examples/vmm: a real KVM vCPU whose RAM is a ufsgmem file runs the whole scenario on a fresh mount, every
step behaves as expected, and nothing is left behind (no file, no device process, no huge pages, no mount).

Runs the example twice: as shipped (hugetlb 2 MiB pages when the pool can be grown, guest at CPL 3) and on
anonymous pages with the guest at CPL 0, so both ways KVM can refuse a private access are exercised where
they differ (on PVM, CPL 0 code goes through KVM's instruction emulator).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys

import pytest

from clientfix import communicate_or_stop
from fusefix import fuse_available, mounted
from ufsgmem import hugepages, kvm
from ufsgmem.fuse import server
from ufsgmem.uapi import SZ_2M

try:
    from conftest import _other_runs  # other test runs on this machine may move the huge page pool
except ImportError:  # pragma: no cover
    def _other_runs() -> list[int]:
        return []

VMM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vmm", "vmm.py")
TIMEOUT = 180  # seconds; a run takes a few


def _kvm_unavailable() -> str | None:
    if platform.machine() != "x86_64":
        return f"the example's guest is x86-64 code (this is {platform.machine()})"
    try:
        with kvm.Kvm():
            return None
    except OSError as exc:
        return f"cannot use {kvm.KVM_DEVICE}: {exc}"


def _unavailable() -> str | None:
    reason = _kvm_unavailable()
    if reason:
        return f"KVM: {reason}"
    reason = fuse_available()
    return f"FUSE: {reason}" if reason else None


pytestmark = [pytest.mark.kvm, pytest.mark.fuse, pytest.mark.skipif(_unavailable() is not None,
                                                                     reason=str(_unavailable()))]


def _pool() -> int | None:
    return hugepages.read(SZ_2M) if hugepages.unavailable_reason(SZ_2M) is None else None


def _device_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"device.py" in f.read()
    except OSError:
        return False


def run_vmm(mountpoint: str, out: str, *args: str) -> tuple[int, str, str]:
    """Run the example to completion; on a hang, SIGTERM (it cleans up), then SIGKILL, and fail."""
    proc = subprocess.Popen([sys.executable, VMM, "--mount", mountpoint, "--out", out, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    stdout, stderr, stopped = communicate_or_stop(proc, TIMEOUT)
    if stopped:
        pytest.fail(f"the example did not finish within {TIMEOUT} s\n{stdout}\n{stderr}")
    return proc.returncode, stdout, stderr


def check_run(tmp_path, *args: str) -> str:
    """Run the example on a fresh mount; assert it passed and left nothing behind; return its output."""
    pool_before, others = _pool(), _other_runs()
    out_dir = str(tmp_path / "out")
    with mounted() as mount:
        code, out, err = run_vmm(mount.path, out_dir, *args)
        assert code == 0, f"exit {code}\n{out}\n{err}"
        assert os.listdir(mount.path) == ["ctl"], "the example must destroy its guest_memfd file"
        mountpoint = mount.path
    assert server.mount_type(mountpoint) is None
    assert "Traceback" not in err, err

    # every step, each named in the summary, as expected
    assert "=== vmm summary ===" in out
    assert "[FAIL]" not in out
    verdict = re.search(r"^=== (\d+)/(\d+) checks passed: every step behaved as expected ===$", out, re.M)
    assert verdict and verdict[1] == verdict[2] == "18", out
    for number in ["S1", "S2", "S3", "S4", *map(str, range(1, 13)), "R", "L"]:
        assert re.search(rf"^\[ok\]\s+{number} ", out, re.M), f"step {number} missing\n{out}"
    assert "KVM_SET_USER_MEMORY_REGION2(flags=KVM_MEM_GUEST_MEMFD, guest_memfd=<mem fd>) -> EINVAL" in out
    if kvm.skip_reason() is None:  # the kernel's own guest_memfd binds: the EINVAL is about the file
        assert "the same call with a kernel guest_memfd (KVM_CREATE_GUEST_MEMFD, flags mmap) -> 0" in out
    assert "KVM_SET_USER_MEMORY_REGION(slot 0, GPA 0x0, 16 MiB" in out
    assert "ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2, {0x200000, 0x10000, 0}) -> 0" in out  # shared by the guest
    assert "ioctl(mem, KVM_SET_MEMORY_ATTRIBUTES2, {0x200000, 0x10000, 8}) -> 0" in out  # and back private
    assert "-> -EINVAL, RAX = -22" in out
    assert "rep stosb: no exit for the memory; the guest read 0x5a5a5a5a" in out
    assert re.search(r"device pid \d+ read \[0x200000, \+0x10000\) through its own mapping: 65536 x 0x5a", out)
    assert len(re.findall(r"killed by SIGBUS \(stderr: Fatal Python error: Bus error\); the guest got -EFAULT",
                          out)) == 2
    assert "a forked child of the VMM reading it through the VMM's mapping: killed by SIGBUS" in out
    assert "content preserved across shared->private: the guest read 0x5a5a5a5a" in out
    assert "fallocate(mem, KEEP_SIZE|PUNCH_HOLE, 0x600000, 0x200000) -> 0" in out
    assert "punched memory reads as zeros" in out
    assert "vCPU read it directly (no exit): the guest read 0x5ec2e7ed, content preserved" in out
    assert "the guest powered off with code 0 after step 12" in out
    assert len(re.findall(r"vCPU (read|write) of 0x[0-9a-f]+ \(private\): (KVM_RUN -> -1 EFAULT|KVM_EXIT_MMIO)",
                          out)) == 5

    # the stage-2 layout
    with open(os.path.join(out_dir, "layout-kvm.json")) as f:
        layout = json.load(f)
    assert layout["format"] == "ufsgmem-layout/1" and layout["view"] == "kvm" and layout["leaves"] > 0
    assert layout["counts_by_attribute"].get("private", 0) > 0 and layout["counts_by_attribute"].get("shared")
    assert os.path.getsize(os.path.join(out_dir, "layout-kvm.png")) > 0
    assert re.search(r"kvm view: \d+ leaves", out)

    # nothing left behind
    pids = [int(p) for p in re.search(r"^device processes: ([\d ]+)$", out, re.M)[1].split()]
    assert len(pids) == 3, "one device, restarted after each of its two SIGBUS deaths"
    assert not [p for p in pids if _device_alive(p)], "device processes left running"
    if pool_before is not None and not others and not _other_runs():
        assert _pool() == pool_before, "the example must give its huge pages back"
    return out


def test_vmm_example_as_shipped(tmp_path):
    out = check_run(tmp_path)
    assert "guest runs at CPL 3" in out
    assert "backend hugetlb page size 2048 KiB" in out or "hugetlb unavailable" in out
    if os.path.isdir("/sys/module/kvm_pvm"):
        # measured here (PVM runs CPL 3 natively): a private access is a bare EFAULT from KVM_RUN
        assert "vCPU write of 0x400000 (private): KVM_RUN -> -1 EFAULT, exit_reason UNKNOWN (0)" in out


def test_vmm_example_anon_cpl0(tmp_path):
    out = check_run(tmp_path, "--backend", "anon", "--cpl", "0")
    assert "guest runs at CPL 0" in out and "backend anon page size 4 KiB" in out
    if os.path.isdir("/sys/module/kvm_pvm"):
        # measured here (PVM emulates CPL 0): KVM's emulator reports the private page as MMIO
        assert "vCPU write of 0x400000 (private): KVM_EXIT_MMIO (phys_addr 0x400000, len 4, is_write 1)" in out
