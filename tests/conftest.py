"""Shared fixtures: a real mount and files on it (``fuse_mount``, ``gmem``: ``fusefix.py``), capabilities the
tests set up themselves (huge pages), and the backends to run over."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import settings

from ufsgmem import hugepages as hugepages_lib
from ufsgmem.mounts import unmount
from ufsgmem.fuse.server import read_pid
from ufsgmem.mounts import ufsgmem_mounts
from ufsgmem.syscalls import pid_alive

from fusefix import Gmem, fuse_available, mounted

# Hypothesis draws the same examples on every machine, so a property test that passes here passes in CI,
# and a failure seen anywhere is seen again by rerunning it (Hypothesis derandomizes by itself when it sees
# a CI variable; this makes developers' runs the same as CI's). HYPOTHESIS_PROFILE=explore draws fresh
# random examples, for hunting bugs on purpose.
settings.register_profile("deterministic", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

SZ_2M = 2 << 20
SZ_1G = 1 << 30


@contextlib.contextmanager
def reserved_hugepages(size: int, count: int):
    """Add ``count`` huge pages of ``size`` to the pool, and take exactly those away again afterwards.

    Skips (with the reason) only where the machine truly cannot: no sysfs knob, not root, or the kernel
    could not find the memory even after compaction (see :mod:`ufsgmem.hugepages`).
    """
    reason = hugepages_lib.unavailable_reason(size)
    if reason:
        pytest.skip(reason)
    with hugepages_lib.reserved(size, count) as got:
        if got < count:
            pytest.skip(f"the kernel gave {got} of {count} {size >> 20} MiB huge pages (memory fragmented)")
        yield


@pytest.fixture
def hugepages():
    """``with hugepages(SZ_2M, 4): ...`` reserves pages for the block and gives them back after."""
    return reserved_hugepages


# --- the suite leaves the machine as it found it ------------------------------------------------------
# Each fixture cleans up after itself; this checks the sum at the end of the run, so a test that forgets
# (or a cleanup that fails quietly) turns the run red instead of leaving a mount, a server or reserved
# huge pages on a CI machine. What it finds is cleaned up too (mounts through their server's pid, huge
# page pools put back), then reported. Two suites running at once on one machine must not judge (or
# unmount) each other: a mount counts as this run's when its server carries this run's tag in its
# environment, and the machine-wide figures (huge pages, the THP knob) are only compared when no other
# run was registered meanwhile.
THP_KNOB = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
RUN_TAG = "UFSGMEM_TEST_RUN"
RUNS_DIR = "/run/ufsgmem/test-runs"


def _started_by_this_run(mountpoint: str) -> bool:
    pid = read_pid(mountpoint)
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{RUN_TAG}={os.getpid()}".encode() in f.read().split(b"\0")
    except (OSError, TypeError):
        return False  # no server left: whose it was cannot be told


def _server_gone(mountpoint: str) -> bool:
    pid = read_pid(mountpoint)
    return pid is None or not pid_alive(pid)


def _other_runs() -> list[int]:
    with contextlib.suppress(OSError):
        return [int(n) for n in os.listdir(RUNS_DIR) if int(n) != os.getpid() and pid_alive(int(n))]
    return []


def _machine_wide() -> dict:
    state = {}
    for size in (SZ_2M, SZ_1G):
        if hugepages_lib.unavailable_reason(size) is None:
            state[f"{size >> 20} MiB huge pages"] = hugepages_lib.read(size)
    if os.path.exists(THP_KNOB):
        with open(THP_KNOB) as f:
            state["shmem THP"] = f.read().strip()
    return state


def _restore_pools(before: dict, after: dict) -> None:
    for size in (SZ_2M, SZ_1G):
        key = f"{size >> 20} MiB huge pages"
        if key in before and key in after and after[key] != before[key]:
            with contextlib.suppress(OSError):
                if after[key] > before[key]:
                    hugepages_lib.shrink(size, after[key] - before[key])
                else:
                    hugepages_lib.grow(size, before[key] - after[key])


def pytest_sessionstart(session):
    os.environ[RUN_TAG] = str(os.getpid())  # inherited by every server this run starts, via any path
    with contextlib.suppress(OSError):
        os.makedirs(RUNS_DIR, exist_ok=True)
        open(os.path.join(RUNS_DIR, str(os.getpid())), "w").close()
    session.config.stash[_STATE] = (ufsgmem_mounts(), _machine_wide(), _other_runs())


def pytest_sessionfinish(session, exitstatus):
    if _STATE not in session.config.stash:
        return
    mounts_before, wide_before, others_before = session.config.stash[_STATE]
    alone = not others_before and not _other_runs()
    left = []
    for path in sorted(ufsgmem_mounts() - mounts_before):
        # ours, or stale (its server gone) while no other run could own it; never a live mount someone
        # else made meanwhile (a bench, a user's own mount on a developer's machine)
        if _started_by_this_run(path) or (alone and _server_gone(path)):
            left.append(f"still mounted: {path}")
            with contextlib.suppress(OSError):
                unmount(path, timeout=10)
    if alone:
        wide_after = _machine_wide()
        left += [f"{key}: {wide_before.get(key)!r} before the run, {wide_after.get(key)!r} after"
                 for key in sorted(wide_before.keys() | wide_after.keys())
                 if wide_before.get(key) != wide_after.get(key)]
        _restore_pools(wide_before, wide_after)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(RUNS_DIR, str(os.getpid())))
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        reporter.write_sep("!", "the test run left the machine changed (now cleaned up)", red=True)
        for line in left:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


_STATE = pytest.StashKey[tuple]()


# --- a real mount for a module, and files on it (fusefix.py) --------------------------------------------
@pytest.fixture(scope="module")
def fuse_mount():
    reason = fuse_available()
    if reason:
        pytest.skip(f"FUSE: {reason}")
    with mounted() as mount:
        yield mount


@pytest.fixture
def gmem(fuse_mount, request):
    """``gmem(size, flags="mmap|init_shared", **options)`` -> Gmem; destroyed after the test."""
    made = []
    counter = iter(range(1 << 30))

    def make(size: int, flags: str = "mmap|init_shared", **options) -> Gmem:
        name = f"t{os.getpid()}_{request.node.name[:24]}_{next(counter)}".replace("[", "_").replace("]", "_")
        name = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name)[:60]
        extra = "".join(f" {k}={v}" for k, v in options.items())
        fuse_mount.ctl(f"create {name} size={size} flags={flags}{extra}")
        made.append(name)
        return Gmem(fuse_mount, name, size)

    yield make
    for name in made:
        with contextlib.suppress(OSError):
            fuse_mount.ctl(f"destroy {name}")
