"""``ufsgmem run``: an unmodified program against this kernel, as if it had guest_memfd (v8 or 6.18).

The proof is ``examples/gmem_vcpu.c``, a VMM written only against <linux/kvm.h>: under ``run`` it creates a
guest_memfd on the VM fd, binds it to a gmem-only memslot with a NULL userspace_addr, and a real vCPU reads
and writes shared and private pages across conversions. One test per rule reads its line of that run; the
other tests exercise what ``run`` itself promises (refusals, the handshake, clean-up however it ends) and
the server's private view directly.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ufsgmem.fuse import server as fuse_server
from ufsgmem import mounts
from ufsgmem.run import NotReachable, RunError, check_reachable, run_program
from ufsgmem.run import session as run_session
from ufsgmem.testing import expect_sigbus, fuse_unavailable_reason, mounted

pytestmark = pytest.mark.fuse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "gmem_vcpu.c"


def _kvm_skip() -> str | None:
    if fuse_unavailable_reason():
        return fuse_unavailable_reason()
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm is absent"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no permission on /dev/kvm"
    if not shutil.which("gcc"):
        return "gcc is not installed"
    return None


def run_mounts() -> set[str]:
    """Mount points of ``ufsgmem run`` private mounts (their directories are named ufsgmem-run-*)."""
    return {m for m in mounts.ufsgmem_mounts() if "/ufsgmem-run-" in m}


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ufsgmem", "run", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def gmem_vcpu(tmp_path_factory):
    reason = _kvm_skip()
    if reason:
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("run") / "gmem_vcpu"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(exe), str(EXAMPLE)], check=True,
                   capture_output=True, text=True)
    return exe


@pytest.fixture(scope="module")
def v8_run(gmem_vcpu):
    """The example once under ``ufsgmem run`` (v8), with what was mounted before and after."""
    before = run_mounts()
    done = run_cli("--", str(gmem_vcpu))
    return done, before, run_mounts()


# --- the proof --------------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_the_uapi_only_vmm_passes_every_check_under_run(v8_run):
    done, before, after = v8_run
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    passed, failed = int(last.split()[0]), int(last.split()[2])
    assert failed == 0 and passed >= 50, done.stdout
    assert "FAIL" not in done.stdout
    assert after <= before, f"left mounted: {after - before}"


@pytest.mark.kvm
def test_natively_the_example_skips_with_the_kernels_reason(gmem_vcpu):
    done = subprocess.run([str(gmem_vcpu)], capture_output=True, text=True, timeout=60)
    if done.returncode == 77:
        assert "skip" in done.stdout
    else:  # a kernel with guest_memfd: it must pass there too
        assert done.returncode == 0, done.stdout


@pytest.mark.kvm
@pytest.mark.parametrize("line", [
    "KVM_CREATE_GUEST_MEMFD on the VM fd",
    "KVM_SET_USER_MEMORY_REGION2 binds it with a NULL userspace_addr",
    "create: an unknown flag bit is EINVAL", "create: size 0 is EINVAL", "create: size 4095 is EINVAL",
    "bind: unaligned guest_memfd_offset is EINVAL", "bind: a range past the file's end is EINVAL",
    "bind: an fd that is not a guest_memfd is EINVAL",
    "bind: a range already bound to another memslot is EINVAL", "bind: another VM's guest_memfd is EINVAL",
    "bind: a guest_memfd memslot is immutable (moving it is EINVAL)",
    "mmap: MAP_PRIVATE of a guest_memfd is EINVAL", "mmap: a guest_memfd created without MMAP is ENODEV",
    "reopening the guest_memfd through /proc is refused",
    "ioctl: unaligned offset is EINVAL", "ioctl: a range past the end is EINVAL", "ioctl: flags != 0 is EINVAL",
    "private: a host read gets SIGBUS", "private: the guest reads what the host wrote while shared",
    "shared again: the host reads what the guest wrote while private",
    "fork: the child's older mappings get SIGBUS once the page is private",
    "the parent's vCPU reads page 4 (private, content kept)",
    "punch: the guest reads zeros from the private page", "punch: the page stays private (host SIGBUS)",
    "the guest reads and writes every page, shared and private",
    "threads: a vCPU thread's accesses race conversions, content kept",
    "a memslot whose guest_memfd was closed: the guest's access is a memory fault",
    "ioctl: a guest_memfd of a VM without private memory cannot convert (EINVAL)",
    "VM-level KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) is EINVAL without the VM-level cap",
])
def test_each_rule(v8_run, line):
    done = v8_run[0]
    assert f"ok   {line}" in done.stdout or f"ok     {line}" in done.stdout, done.stdout


@pytest.mark.kvm
def test_playing_6_18_the_gmem_ioctl_is_enotty(gmem_vcpu, ufsgmem_run):
    """Through the pytest plugin's ``ufsgmem_run`` fixture, as a VMM project would run it."""
    done = ufsgmem_run([gmem_vcpu], kernel="6.18", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok   no in-place conversion: the guest_memfd ioctl is ENOTTY" in done.stdout
    assert "ok   VM-level KVM_SET_MEMORY_ATTRIBUTES(PRIVATE) is EINVAL" in done.stdout
    assert "GUEST_MEMFD_MEMORY_ATTRIBUTES 0," in done.stdout


CAPS = textwrap.dedent("""
    import fcntl, os, sys
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, int(sys.argv[1]))
    caps = (234, 244, 250, 233)
    print(*[fcntl.ioctl(kvm, 0xAE03, c) for c in caps], *[fcntl.ioctl(vm, 0xAE03, c) for c in caps],
          fcntl.ioctl(kvm, 0xAE03, 235))
""")


@pytest.mark.kvm
@pytest.mark.parametrize("kernel,vm_type,want", [
    ("v8", 1, (1, 3, 8, 0, 1, 3, 8, 0)),  # a KVM_X86_SW_PROTECTED_VM, served on the host's default type
    ("v8", 0, (1, 3, 8, 0, 1, 3, 0, 0)),  # a default VM has no private memory: no attributes on it
    ("6.18", 0, (1, 3, 0, None, 1, 3, 0, None)),
])
def test_capabilities(tmp_path, kernel, vm_type, want):
    reason = _kvm_skip()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "caps.py"
    script.write_text(CAPS)
    done = run_cli("--kernel", kernel, "--", sys.executable, str(script), str(vm_type))
    assert done.returncode == 0, done.stderr
    got = tuple(int(x) for x in done.stdout.split())
    for g, w in zip(got, want):
        assert w is None or g == w, got
    assert bool(got[8] & 2) == (kernel == "v8")  # KVM_CAP_VM_TYPES adds SW_PROTECTED only playing v8


# --- what run promises ------------------------------------------------------------------------------------
def test_an_unknown_backend_is_refused_before_anything_runs():
    done = run_cli("--backend", "nosuch", "--", "/bin/true")
    assert done.returncode == 127 and "unknown backend 'nosuch'" in done.stderr and "anon" in done.stderr


@pytest.mark.kvm
def test_the_example_passes_on_another_backend(gmem_vcpu):
    """--backend reaches the server (a private mount's default and each create request): thp serves it all."""
    done = run_cli("--backend", "thp", "--", str(gmem_vcpu))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_static_program_is_refused(tmp_path):
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    src = tmp_path / "s.c"
    src.write_text("int main(void) { return 0; }\n")
    exe = tmp_path / "static"
    built = subprocess.run(["gcc", "-static", "-o", str(exe), str(src)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no static libc here: {built.stderr[:200]}")
    with pytest.raises(NotReachable, match="statically linked"):
        check_reachable(str(exe))
    done = run_cli("--", str(exe))
    assert done.returncode == 127 and "statically linked" in done.stderr


def test_a_setuid_program_of_another_user_is_refused(tmp_path):
    exe = tmp_path / "suid"
    shutil.copy("/bin/true", exe)
    os.chown(exe, 65534, -1) if os.geteuid() == 0 else pytest.skip("needs root to chown")
    os.chmod(exe, 0o4755)
    with pytest.raises(NotReachable, match="setuid"):
        check_reachable(str(exe))


def test_a_script_is_judged_by_its_interpreter(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text("#!/usr/bin/env sh\nexit 0\n")
    script.chmod(0o755)
    assert check_reachable(str(script)) == str(script)


def test_no_handshake_means_no_native_run(tmp_path, monkeypatch):
    """A library the loader does not load gives no handshake: run stops the program and says so."""
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    monkeypatch.setattr(run_session, "build_shim", lambda: str(tmp_path / "missing.so"))
    marker = tmp_path / "ran"
    before = run_mounts()  # another run on this machine may have its own
    with pytest.raises(RunError, match="did not load"):
        run_program(["/bin/sh", "-c", f"touch {marker}; sleep 30"], handshake_timeout=5)
    assert run_mounts() <= before


def test_exit_status_and_the_mount_goes_with_the_program(tmp_path):
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    before = run_mounts()
    done = run_cli("--", "/bin/sh", "-c", 'test -f "$UFSGMEM_RUN_MOUNT/ctl" && exit 7')
    assert done.returncode == 7, done.stderr
    killed = run_cli("--", "/bin/sh", "-c", "kill -SEGV $$")
    assert killed.returncode == 128 + signal.SIGSEGV
    assert run_mounts() <= before


def test_sigkill_of_run_leaves_no_mount_and_no_program(tmp_path):
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    before = run_mounts()
    pidfile = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, "-m", "ufsgmem", "run", "--", "/bin/sh", "-c",
                             f"echo $$ > {pidfile}; exec sleep 300"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip() and run_mounts() - before):
            assert time.monotonic() < deadline, "run did not start its program"
            assert proc.poll() is None
            time.sleep(0.05)
        program = int(pidfile.read_text())
        ours = run_mounts() - before
        tops = {os.path.dirname(m) for m in ours}
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 30
        while (ours & run_mounts()) or _alive(program) or any(os.path.exists(t) for t in tops):
            assert time.monotonic() < deadline, f"left behind: mounts {ours & run_mounts()}, program alive " \
                                                f"{_alive(program)}, directories {[t for t in tops if os.path.exists(t)]}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --- the server's private view ------------------------------------------------------------------------------
def _ctl(path: str, request: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.write(fd, request.encode())
    finally:
        os.close(fd)


def test_private_view_serves_private_pages_only_and_keeps_one_copy():
    """``NAME/private`` maps private pages (not shared ones); what the guest wrote there reaches ``mem``
    when the page turns shared, and a punch zeroes it there too."""
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    page = mmap.PAGESIZE
    with mounted() as mnt:
        _ctl(f"{mnt.path}/ctl", "create pv size=16K flags=mmap")  # all private
        mem_fd = os.open(f"{mnt.path}/pv/mem", os.O_RDWR)
        priv_fd = os.open(f"{mnt.path}/pv/private", os.O_RDWR)
        try:
            with mmap.mmap(priv_fd, 4 * page, mmap.MAP_SHARED) as priv, \
                    mmap.mmap(mem_fd, 4 * page, mmap.MAP_SHARED) as mem:
                priv[0:4] = b"gues"
                priv[page:page + 4] = b"two!"
                assert expect_sigbus(lambda: mem[0])  # private: the host is refused
                _ctl(f"{mnt.path}/pv/ctl", "set_memory_attributes offset=0 size=4K attributes=shared")
                assert mem[0:4] == b"gues"  # written back from the private view before the flip
                assert expect_sigbus(lambda: priv[0])  # shared now: the private view refuses it
                _ctl(f"{mnt.path}/pv/ctl", "punch_hole offset=4K size=4K")
                assert priv[page:page + 4] == bytes(4)  # zeros, and still private
                assert expect_sigbus(lambda: mem[page])
                with pytest.raises(OSError):
                    os.read(priv_fd, 4)  # no read(2): it is for mapping only
        finally:
            os.close(mem_fd)
            os.close(priv_fd)
            _ctl(f"{mnt.path}/ctl", "destroy pv")


LIFETIME = textwrap.dedent("""
    import fcntl, mmap, os, struct, sys
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, 0xAE01, 0)
    args = bytearray(struct.pack("<QQ6Q", 1 << 20, 3, 0, 0, 0, 0, 0, 0))
    fd = fcntl.ioctl(vm, 0xC040AED4, args, True)
    step = sys.argv[1]
    if step == "dup":
        other = os.dup(fd)
    elif step == "map":
        m = mmap.mmap(fd, 4096, mmap.MAP_SHARED)
        m[0] = 1
    print("created", flush=True)
    sys.stdin.readline()
    os.close(fd)
    print("closed", flush=True)
    sys.stdin.readline()
    if step == "dup":
        os.close(other)
    elif step == "map":
        m.close()
    print("released", flush=True)
    sys.stdin.readline()
""")


@pytest.mark.kvm
@pytest.mark.parametrize("step", ["close", "dup", "map"])
def test_the_file_goes_with_the_programs_last_fd_and_mapping(tmp_path, step):
    """As the kernel frees a guest_memfd on its last reference (a dup'd fd and a mapping are references),
    the server frees the file's memory then, not when the program exits."""
    from fusefix import memfds, wait_freed
    reason = _kvm_skip()
    if reason:
        pytest.skip(reason)
    script = tmp_path / "lifetime.py"
    script.write_text(LIFETIME)
    with mounted() as mnt:
        before = memfds(mnt.pid)
        proc = subprocess.Popen([sys.executable, "-m", "ufsgmem", "run", "--mount", mnt.path, "--", sys.executable,
                                 str(script), step], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=ROOT)
        try:
            assert proc.stdout.readline().strip() == "created"
            created = memfds(mnt.pid) - before
            assert created, "the server holds no memory for the new file"
            assert os.listdir(mnt.path) == ["ctl"], "the file has no name on the mount"
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.stdout.readline().strip() == "closed"
            if step == "close":
                assert wait_freed(mnt.pid, created, f"{mnt.path}/ctl"), "still held after the last close"
            else:
                os.stat(f"{mnt.path}/ctl")
                assert created & memfds(mnt.pid), "freed while a dup or a mapping still refers to it"
                proc.stdin.write("\n")
                proc.stdin.flush()
                assert proc.stdout.readline().strip() == "released"
                assert wait_freed(mnt.pid, created, f"{mnt.path}/ctl"), "still held after the last reference"
            proc.stdin.write("\n\n")
            proc.stdin.flush()
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- the conformance suite under run ---------------------------------------------------------------------------
@pytest.mark.kvm
def test_conformance_under_run_removes_exactly_the_documented_deviations():
    """The suite's third subject: every case as a program under run (KVM_CREATE_GUEST_MEMFD on a VM fd),
    judged against the kernel record and the mount's deviation list. Nothing fails, and the deviations it
    removes (observed: it agrees where the mount is a listed deviation) are exactly the entries that say
    how run removes them; the others it keeps. Nothing of the run is left mounted."""
    from ufsgmem.conformance import record, runner, under_run
    from ufsgmem.conformance.deviations import MOUNT, REMOVED_BY_RUN

    reason = _kvm_skip() or under_run.unavailable_reason()
    if reason:
        pytest.skip(reason)
    before = run_mounts()
    verdicts = runner.judge_observations(under_run.observe_all(), "run", record.select())
    assert run_mounts() == before
    failed = {v.case.name: f"{v.why}; run: {v.other}; kernel: {v.kernel}" for v in verdicts if not v.ok}
    assert not failed, failed
    assert len(verdicts) > 40
    removed = {v.case.name for v in verdicts if v.case.name in MOUNT and v.verdict == "agree"}
    kept = {v.case.name for v in verdicts if v.verdict == "deviation"}
    assert removed == set(REMOVED_BY_RUN) and removed | kept == set(MOUNT), (removed, kept)
    assert all(v.verdict in ("agree", "v8", "n/a") for v in verdicts if v.case.name not in MOUNT)
    # only the emulated pin, which has no system call, is out of a program's reach
    assert {v.case.name for v in verdicts if v.verdict == "n/a"} == {"set_memory_attributes_pinned[mmap|init_shared]"}


def test_the_conformance_child_refuses_to_run_natively(tmp_path):
    """Outside ufsgmem run the child would observe the machine's kernel: it refuses and writes nothing."""
    env = {k: v for k, v in os.environ.items() if k != "UFSGMEM_RUN_MOUNT"}
    done = subprocess.run([sys.executable, "-m", "ufsgmem.conformance.under_run", "--out", str(tmp_path / "o.json")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 2 and "not under ufsgmem run" in done.stderr
    assert not (tmp_path / "o.json").exists()


def test_a_symlinked_interpreter_is_run_by_its_own_path(tmp_path):
    """A venv's python is a symlink; executing its target instead would lose the venv."""
    link = tmp_path / "python"
    link.symlink_to(sys.executable)
    assert check_reachable(str(link)) == str(link)


@pytest.mark.kvm
def test_bench_figures_under_run():
    """``ufsgmem bench``'s R1/R2: every figure measured on both sides (no timing is asserted)."""
    from ufsgmem.bench import run_vcpu
    from ufsgmem.bench.suite import Config, Progress, mounted as bench_mounted
    reason = _kvm_skip()
    if reason:
        pytest.skip(reason)
    with bench_mounted() as mount:
        figs = run_vcpu.figures(Config.quick_config(), Progress(1), mount)
    assert [f.id for f in figs] == ["R1.first", "R1.repeated", "R1.shared", "R2"]
    for fig in figs:
        assert len(fig.value.values) == run_vcpu.REPS and len(fig.reference.values) == run_vcpu.REPS, fig.id
        assert fig.value.median > 0 and fig.reference.median > 0, fig.id


@pytest.mark.kvm
def test_everything_else_is_untouched_a_ufsgmem_aware_vmm_passes_under_run(tmp_path):
    """examples/vmm opens MNT/NAME/mem itself and converts through its own ioctls: under run its files are
    not the interposer's, so every call reaches the kernel or its own mount as without run."""
    reason = _kvm_skip()
    if reason:
        pytest.skip(reason)
    done = run_cli("--", sys.executable, str(ROOT / "examples" / "vmm" / "vmm.py"), "--backend", "anon",
                   "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checks passed" in done.stdout


def test_a_static_program_started_by_the_program_is_refused_too(tmp_path):
    """The handshake proves only the first program loaded the interposer: an exec of a program it cannot
    follow (static) is refused in the child with a message, never run natively."""
    if fuse_unavailable_reason() or not shutil.which("gcc"):
        pytest.skip(fuse_unavailable_reason() or "gcc is not installed")
    src = tmp_path / "s.c"
    src.write_text('#include <stdio.h>\nint main(void) { puts("ran natively"); return 0; }\n')
    exe = tmp_path / "static"
    built = subprocess.run(["gcc", "-static", "-o", str(exe), str(src)], capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"no static libc here: {built.stderr[:200]}")
    done = run_cli("--", "/bin/sh", "-c", f'{exe}; echo "status $?"')
    assert "ran natively" not in done.stdout
    assert "refusing to execute" in done.stderr and "status 126" in done.stdout
    script = tmp_path / "py.py"
    script.write_text(f"import subprocess, sys\ntry:\n    subprocess.run([{str(exe)!r}])\n"
                      "except PermissionError:\n    print('refused')\n")
    done = run_cli("--", sys.executable, str(script))
    assert "refused" in done.stdout and "ran natively" not in done.stdout, done.stdout + done.stderr


def test_guest_file_and_private_view_stay_coherent():
    """``NAME/guest`` (pread/pwrite of any page) sees what a mapping of ``private`` wrote, and a mapping
    of ``private`` sees what ``guest`` wrote."""
    if fuse_unavailable_reason():
        pytest.skip(fuse_unavailable_reason())
    page = mmap.PAGESIZE
    with mounted() as mnt:
        _ctl(f"{mnt.path}/ctl", "create gv size=8K flags=mmap")  # all private
        priv_fd = os.open(f"{mnt.path}/gv/private", os.O_RDWR)
        guest_fd = os.open(f"{mnt.path}/gv/guest", os.O_RDWR)
        try:
            with mmap.mmap(priv_fd, 2 * page, mmap.MAP_SHARED) as priv:
                priv[8:12] = b"vcpu"  # dirty in the private view's page cache
                assert os.pread(guest_fd, 4, 8) == b"vcpu"
                os.pwrite(guest_fd, b"host", page + 16)
                assert priv[page + 16:page + 20] == b"host"
                priv[16:20] = b"more"
                os.pwrite(guest_fd, b"gw", 0)  # a guest write of the same page keeps the mapping's bytes
                assert priv[0:2] == b"gw" and priv[16:20] == b"more" and priv[8:12] == b"vcpu"
        finally:
            os.close(priv_fd)
            os.close(guest_fd)
            _ctl(f"{mnt.path}/ctl", "destroy gv")
