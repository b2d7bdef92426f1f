"""The VMM developer's kit: ``ufsgmem.testing`` (one API, a ufsgmem file or the kernel's guest_memfd) and
its pytest plugin (entry point ``pytest11``).

The plugin is tested the way a user meets it: pytester writes a test file into a fresh directory and runs
pytest in a subprocess, which finds the plugin through its entry point only. The user's file is the example
of ``docs/testing-vmms.md`` itself. The implementations are tested directly, with the plugin's own fixtures.

No sleeps: every wait is bounded (pytester subprocesses by ``timeout=``, ``expect_sigbus`` children by
theirs), and every mount is checked gone afterwards.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import signal
import tempfile
from importlib.metadata import entry_points

import pytest

import ufsgmem.testing.plugin as plugin_module
from ufsgmem import hugepages
from ufsgmem.fuse.server import logfile_path
from ufsgmem.mounts import ufsgmem_mounts
from ufsgmem.syscalls import pid_alive
from ufsgmem.testing import (
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, PAGE_SIZE, PRIVATE, SHARED, GuestMemfdError, KernelGmemFd,
    expect_sigbus, fuse_unavailable_reason, header_constant, kernel_unavailable_reason, missing_feature,
    open_gmem,
)

pytest_plugins = ["pytester"]

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "testing-vmms.md")
SUBPROCESS_TIMEOUT = 180  # seconds; a run takes about two
SZ_2M = 2 << 20
FIXTURES = {"ufsgmem_mount", "ufsgmem_file", "ufsgmem_hugepages", "gmem_expect_sigbus", "gmem_target", "ufsgmem_run"}
KEEP_PUNCH = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE

requires_fuse = pytest.mark.skipif(fuse_unavailable_reason() is not None,
                                   reason=f"FUSE: {fuse_unavailable_reason()}")
requires_kvm = pytest.mark.skipif(kernel_unavailable_reason() is not None,
                                  reason=f"kernel guest_memfd: {kernel_unavailable_reason()}")


def run(pytester, *args):
    """pytest in a fresh process (the plugin comes from its entry point), bounded in time."""
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=SUBPROCESS_TIMEOUT)


def doc_example() -> str:
    """The example test of docs/testing-vmms.md, exactly as a user would copy it."""
    with open(DOC) as f:
        text = f.read()
    match = re.search(r"<!-- example: test_vmm_memory\.py -->\n```python\n(.*?)\n```\n", text, re.DOTALL)
    assert match, "docs/testing-vmms.md lost its example block"
    return match.group(1) + "\n"


def nr_hugepages(what: str = "nr_hugepages") -> int:
    return hugepages.read(SZ_2M, what)


def other_test_runs() -> list[int]:
    """Other live test runs registered by tests/conftest.py: the huge page pools are machine-wide, so
    their figures are only compared when this run is alone."""
    try:
        names = os.listdir("/run/ufsgmem/test-runs")
    except OSError:
        return []
    return [int(n) for n in names if n.isdigit() and int(n) != os.getpid() and pid_alive(int(n))]


def esc(text: str) -> str:
    """``text`` as a literal inside an fnmatch pattern."""
    return re.sub(r"([*?[])", r"[\1]", text)


# --- the plugin as installed -------------------------------------------------------------------------
def test_plugin_is_the_installed_pytest11_entry_point(pytestconfig):
    found = [ep for ep in entry_points(group="pytest11") if ep.name == "ufsgmem"]
    assert [ep.value for ep in found] == ["ufsgmem.testing.plugin"]
    assert pytestconfig.pluginmanager.get_plugin("ufsgmem") is plugin_module


def test_plugin_is_inert_until_asked_and_its_names_are_prefixed(pytester):
    pytester.makepyfile(test_plain="def test_plain(tmp_path):\n    assert tmp_path.exists()\n")
    mounts_before = ufsgmem_mounts()
    result = run(pytester, "--setup-show")
    result.assert_outcomes(passed=1)
    assert not re.search(r"\b(ufsgmem|gmem)_\w+", result.stdout.str()), "a plugin fixture ran unasked"
    result.stdout.fnmatch_lines(["plugins: *ufsgmem-0.1.0*"])  # found by a fresh process, via the entry point
    assert not {m for m in ufsgmem_mounts() - mounts_before if "ufsgmem-pytest-" in m}

    listing = run(pytester, "--fixtures").stdout.str()
    names = set(re.findall(r"^(\w+)(?: \[\w+ scope\])? -- \S*ufsgmem/testing/plugin\.py:\d+$", listing, re.M))
    assert names == FIXTURES
    assert all(name.startswith(("ufsgmem_", "gmem_")) for name in names)


def test_targets_are_chosen_by_marker_or_by_indirect_parametrisation(pytester):
    pytester.makepyfile(test_pick="""
        import pytest

        def test_all(gmem_target):
            pass

        @pytest.mark.gmem_targets("kernel", "ufsgmem")
        def test_two(gmem_target):
            pass

        @pytest.mark.parametrize("gmem_target", ["ufsgmem-no-inplace"], indirect=True)
        def test_own(gmem_target):
            pass
    """)
    result = run(pytester, "--collect-only", "-q")
    result.stdout.fnmatch_lines([
        "test_pick.py::test_all[[]ufsgmem[]]", "test_pick.py::test_all[[]ufsgmem-no-inplace[]]",
        "test_pick.py::test_all[[]kernel[]]", "test_pick.py::test_two[[]kernel[]]",
        "test_pick.py::test_two[[]ufsgmem[]]", "test_pick.py::test_own[[]ufsgmem-no-inplace[]]",
        "6 tests collected*",
    ])

    pytester.makepyfile(test_pick="""
        import pytest

        @pytest.mark.gmem_targets("qemu")
        def test_bad(gmem_target):
            pass
    """)
    result = run(pytester, "--collect-only", "-q")
    assert result.ret != 0
    assert "gmem_targets['qemu']: unknown target; use ufsgmem, ufsgmem-no-inplace, kernel" in result.stdout.str()


# --- a user's suite: passes on ufsgmem, skips precisely on the kernel ----------------------------------
@requires_fuse
def test_the_documented_user_suite_runs_on_every_target(pytester):
    pytester.makepyfile(test_vmm_memory=doc_example())
    result = run(pytester, "-v", "-rs")

    kernel = kernel_unavailable_reason()
    kernel_converts = kernel is None and missing_feature("kernel", "conversion") is None
    expected = {
        "test_discard_zeroes_only_the_range": {
            "ufsgmem": "PASSED", "ufsgmem-no-inplace": "PASSED", "kernel": "SKIPPED" if kernel else "PASSED"},
        "test_private_page_is_revoked_and_keeps_its_content": {
            "ufsgmem": "PASSED", "ufsgmem-no-inplace": "SKIPPED",
            "kernel": "PASSED" if kernel_converts else "SKIPPED"},
        "test_pinned_page_blocks_conversion_until_released": {
            "ufsgmem": "PASSED", "ufsgmem-no-inplace": "SKIPPED", "kernel": "SKIPPED"},
        "test_reports_missing_in_place_conversion": {
            "ufsgmem-no-inplace": "PASSED", "kernel": "SKIPPED" if kernel or kernel_converts else "PASSED"},
    }
    outcomes = [v for per_test in expected.values() for v in per_test.values()]
    result.assert_outcomes(passed=outcomes.count("PASSED"), skipped=outcomes.count("SKIPPED"))
    for test, per_target in expected.items():
        for target, outcome in per_target.items():
            result.stdout.fnmatch_lines([f"test_vmm_memory.py::{test}[[]{target}[]] {outcome}*"])

    # the skip reasons name the target and what it said
    result.stdout.fnmatch_lines(["SKIPPED [[]*[]] test_vmm_memory.py:*: ufsgmem-no-inplace: no conversion: "
                                 "KVM_SET_MEMORY_ATTRIBUTES2 on the guest_memfd is ENOTTY: this target plays "
                                 "a kernel booted with kvm.gmem_in_place_conversion=0"])
    if kernel:
        result.stdout.fnmatch_lines([f"SKIPPED [[]*[]] test_vmm_memory.py:*: kernel: {esc(kernel)}"])
    else:
        result.stdout.fnmatch_lines(["SKIPPED [[]*[]] test_vmm_memory.py:*: kernel: *no pin: *needs a device*"])
        if not kernel_converts:
            reason = missing_feature("kernel", "conversion")
            result.stdout.fnmatch_lines([f"SKIPPED [[]*[]] test_vmm_memory.py:*: kernel: no conversion: {esc(reason)}"])
            if "ENOTTY" in reason:  # this machine: 6.18
                assert "KVM_SET_MEMORY_ATTRIBUTES2 on a guest_memfd is ENOTTY" in reason


# --- the fixtures clean up, even after a failure -------------------------------------------------------
CLEANUP_SUITE = """
import json, os
import pytest

RECORD = os.environ["UFSGMEM_PLUGIN_RECORD"]


def record(**fields):
    with open(RECORD, "a") as f:
        f.write(json.dumps(fields) + "\\n")


def nr_2m():
    with open("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") as f:
        return int(f.read())


def test_fails_while_holding_everything(ufsgmem_mount, ufsgmem_file, ufsgmem_hugepages):
    before = nr_2m()
    assert ufsgmem_hugepages("2M", 2) == 2
    gmem = ufsgmem_file("4M", "mmap", backend="hugetlb", page_size="2M")
    mem = gmem.mmap()
    gmem.convert(0, "4M", "shared")
    view = mem.array  # still referenced by the failure's traceback: the mapping cannot be closed
    view[:] = 7
    record(test="fails", mount=ufsgmem_mount.path, pid=ufsgmem_mount.pid, before=before, during=nr_2m(),
           page_size=gmem.status()["page_size"], first=int(view[0]))
    assert False, "failing on purpose: the fixtures must clean up anyway"


@pytest.mark.gmem_targets("ufsgmem", "ufsgmem-no-inplace")
def test_shares_the_session_mount(gmem_target, ufsgmem_mount):
    with gmem_target.open("64K", "mmap|init_shared") as gmem:
        record(test="shares", target=str(gmem_target), mount=gmem_target.mount.path, pid=ufsgmem_mount.pid,
               status_target=gmem.status()["target"])
"""


@requires_fuse
def test_fixtures_clean_up_mount_files_and_huge_pages_even_on_failure(pytester, monkeypatch):
    reason = hugepages.unavailable_reason(SZ_2M)
    if reason:
        pytest.skip(reason)
    record_path = pytester.path / "record.jsonl"
    monkeypatch.setenv("UFSGMEM_PLUGIN_RECORD", str(record_path))
    pytester.makepyfile(test_cleanup=CLEANUP_SUITE)
    alone = not other_test_runs()
    pool_before, surplus_before = nr_hugepages(), nr_hugepages("surplus_hugepages")

    result = run(pytester, "-v")

    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines(["*failing on purpose: the fixtures must clean up anyway*"])
    records = [json.loads(line) for line in record_path.read_text().splitlines()]
    fails = next(r for r in records if r["test"] == "fails")
    assert fails["page_size"] == SZ_2M and fails["first"] == 7
    shares = [r for r in records if r["test"] == "shares"]
    assert sorted(r["status_target"] for r in shares) == ["ufsgmem", "ufsgmem-no-inplace"]
    assert {(r["mount"], r["pid"]) for r in records} == {(fails["mount"], fails["pid"])}, \
        "the session mount was started more than once"

    assert fails["mount"] not in ufsgmem_mounts(), "the session mount was left mounted"
    assert not os.path.exists(fails["mount"]), "the mount point directory was left behind"
    assert not pid_alive(fails["pid"]), "the server process was left running"
    assert not os.path.exists(logfile_path(fails["mount"])), "the server's uneventful log was left behind"
    if alone and not other_test_runs():  # the pools are machine-wide: compare only when nobody else ran
        assert fails["during"] == fails["before"] + 2
        assert nr_hugepages() == pool_before, "reserved huge pages were not given back"
        assert nr_hugepages("surplus_hugepages") == surplus_before


# --- expect_sigbus -------------------------------------------------------------------------------------
def test_expect_sigbus_detects_a_real_sigbus_and_its_absence(tmp_path):
    path = tmp_path / "file"
    path.write_bytes(b"\x11" * PAGE_SIZE)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), PAGE_SIZE, mmap.MAP_SHARED)
        try:
            alive = expect_sigbus(lambda: mapping[0])
            assert not alive and alive.value == 0x11 and alive.exit_code == 0 and alive.signal is None
            os.ftruncate(f.fileno(), 0)  # the mapped page is now past the end of the file
            dead = expect_sigbus(lambda: mapping[0])
            assert dead and dead.sigbus and dead.signal == signal.SIGBUS and dead.value is None
            assert str(dead) == "killed by SIGBUS"
        finally:
            mapping.close()


def test_expect_sigbus_reports_every_other_ending():
    shared = mmap.mmap(-1, PAGE_SIZE)  # anonymous MAP_SHARED: the child's write is seen here

    def write_then(value):
        shared[0] = value
        return value * 2

    outcome = expect_sigbus(write_then, 21)
    assert not outcome and outcome.value == 42 and shared[0] == 21

    raised = expect_sigbus(lambda: 1 // 0)
    assert not raised and raised.exit_code == 1 and raised.error.startswith("ZeroDivisionError")

    killed = expect_sigbus(lambda: os.kill(os.getpid(), signal.SIGKILL))
    assert not killed and killed.signal == signal.SIGKILL

    bus = expect_sigbus(lambda: os.kill(os.getpid(), signal.SIGBUS))
    assert bus and bus.signal == signal.SIGBUS

    unpicklable = expect_sigbus(lambda: (lambda: None))
    assert unpicklable.exit_code == 0 and unpicklable.value.startswith("<function")

    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TimeoutError, match="did not finish within 0.2 s; killed"):
            expect_sigbus(os.read, read_end, 1, timeout=0.2)  # blocks for ever: nothing is ever written
    finally:
        os.close(read_end)
        os.close(write_end)
    shared.close()


# --- the ufsgmem implementation ------------------------------------------------------------------------
@requires_fuse
def test_ufsgmem_conversion_eagain_error_offset_and_content(ufsgmem_file, gmem_expect_sigbus):
    gmem = ufsgmem_file(4 * PAGE_SIZE, "mmap|init_shared")
    assert gmem.target == "ufsgmem" and gmem.status()["target"] == "ufsgmem"
    assert os.get_inheritable(gmem.fileno())  # like the kernel's fd: no FD_CLOEXEC
    with gmem.mmap() as mem:
        for page in range(4):
            mem.array[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = 0x10 + page
        gmem.pin(2 * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(GuestMemfdError) as busy:
            gmem.set_memory_attributes(0, 4 * PAGE_SIZE, PRIVATE)
        assert busy.value.errno == errno.EAGAIN and busy.value.error_offset == 2 * PAGE_SIZE
        assert "error_offset 0x2000" in str(busy.value)
        status = gmem.status()
        assert status["private_bytes"] == 0 and status["pinned_bytes"] == PAGE_SIZE
        gmem.set_memory_attributes(2 * PAGE_SIZE, PAGE_SIZE, SHARED)  # a no-op on a pinned page succeeds

        gmem.unpin(2 * PAGE_SIZE, PAGE_SIZE)
        gmem.set_memory_attributes(0, 4 * PAGE_SIZE, PRIVATE)
        assert gmem.status()["private_bytes"] == 4 * PAGE_SIZE
        assert gmem_expect_sigbus(lambda: mem.array[3 * PAGE_SIZE])
        with pytest.raises(GuestMemfdError) as private_pin:
            gmem.pin(PAGE_SIZE, PAGE_SIZE)
        assert private_pin.value.errno == errno.EFAULT and private_pin.value.error_offset == PAGE_SIZE
        assert gmem.guest_read(PAGE_SIZE, 2) == b"\x11\x11"  # the guest still sees private content

        gmem.convert(0, 4 * PAGE_SIZE, "shared")
        assert [int(mem.array[page * PAGE_SIZE]) for page in range(4)] == [0x10, 0x11, 0x12, 0x13]

        with pytest.raises(GuestMemfdError) as bad:
            gmem.set_memory_attributes(PAGE_SIZE // 2, PAGE_SIZE, PRIVATE)
        assert bad.value.errno == errno.EINVAL and bad.value.error_offset is None


@requires_fuse
def test_ufsgmem_no_inplace_target_is_enotty_and_still_punches(ufsgmem_file, ufsgmem_mount):
    gmem = ufsgmem_file(4 * PAGE_SIZE, "mmap|init_shared", in_place_conversion=False)
    assert gmem.target == "ufsgmem-no-inplace" and gmem.status()["in_place_conversion"] is False
    with pytest.raises(GuestMemfdError) as refused:
        gmem.set_memory_attributes(0, PAGE_SIZE, PRIVATE)
    assert refused.value.errno == errno.ENOTTY and refused.value.error_offset is None
    assert "kvm.gmem_in_place_conversion=0" in str(refused.value)
    with gmem.mmap() as mem:
        mem.array[:] = 0x77
        gmem.fallocate(KEEP_PUNCH, 0, PAGE_SIZE)
        assert int(mem.array[0]) == 0 and int(mem.array[PAGE_SIZE]) == 0x77

    with open_gmem("ufsgmem-no-inplace", PAGE_SIZE, 0, mount=ufsgmem_mount) as other:
        with pytest.raises(GuestMemfdError) as again:
            other.convert(0, PAGE_SIZE, "shared")
        assert again.value.errno == errno.ENOTTY
    assert not os.path.exists(other.dir), "close() must destroy the name"


# --- the kernel implementation -------------------------------------------------------------------------
@requires_kvm
def test_kernel_target_is_the_real_guest_memfd(gmem_expect_sigbus):
    with KernelGmemFd(4 * PAGE_SIZE, "mmap|init_shared") as gmem:
        status = gmem.status()
        assert status["target"] == "kernel" and status["size"] == 4 * PAGE_SIZE
        assert status["supported_flags"] & 0x3 == 0x3 and status["page_size"] == PAGE_SIZE
        with gmem.mmap() as mem:
            mem.array[:] = 0xAA
            gmem.punch_hole(PAGE_SIZE, PAGE_SIZE)
            assert int(mem.array[PAGE_SIZE]) == 0 and int(mem.array[0]) == 0xAA

        reason = missing_feature("kernel", "conversion")
        if reason is None:
            gmem.set_memory_attributes(0, PAGE_SIZE, SHARED)  # a no-op where the kernel converts
        else:
            with pytest.raises(GuestMemfdError) as refused:
                gmem.set_memory_attributes(0, PAGE_SIZE, PRIVATE)
            assert refused.value.error_offset is None
            if "ENOTTY" in reason:
                assert refused.value.errno == errno.ENOTTY

        for call in (lambda: gmem.pin(0, PAGE_SIZE), lambda: gmem.unpin(0, PAGE_SIZE),
                     lambda: gmem.guest_read(0, 1)):
            with pytest.raises(GuestMemfdError) as unsupported:
                call()
            assert unsupported.value.errno == errno.EOPNOTSUPP and "ufsgmem-only" in str(unsupported.value)

    with KernelGmemFd(PAGE_SIZE, "mmap") as private, private.mmap() as mem:  # no INIT_SHARED: all private
        assert gmem_expect_sigbus(lambda: mem.array[0])


# --- the same rules on every target --------------------------------------------------------------------
def test_file_rules_agree_on_every_target(gmem_target, gmem_expect_sigbus):
    for size, flags in ((PAGE_SIZE + 1, "mmap"), (PAGE_SIZE, 1 << 5)):
        with pytest.raises(GuestMemfdError) as refused:
            gmem_target.open(size, flags)
        assert refused.value.errno == errno.EINVAL, (size, flags)

    with pytest.raises(GuestMemfdError) as unmappable:
        gmem_target.open(PAGE_SIZE, 0).mmap()
    assert unmappable.value.errno == errno.ENODEV

    gmem = gmem_target.open(4 * PAGE_SIZE, "mmap|init_shared")
    for mode, offset, size, err in ((0, 0, PAGE_SIZE, errno.EOPNOTSUPP),
                                    (FALLOC_FL_KEEP_SIZE, 1, PAGE_SIZE, errno.EINVAL),
                                    (FALLOC_FL_KEEP_SIZE, 4 * PAGE_SIZE, PAGE_SIZE, errno.EINVAL),
                                    (KEEP_PUNCH, 0, PAGE_SIZE - 1, errno.EINVAL)):
        with pytest.raises(GuestMemfdError) as bad:
            gmem.fallocate(mode, offset, size)
        assert bad.value.errno == err, (mode, offset, size)
    gmem.punch_hole(4 * PAGE_SIZE, PAGE_SIZE)  # at EOF: a no-op success
    gmem.allocate(0, 4 * PAGE_SIZE)
    with gmem.mmap() as mem:
        mem.array[:] = 0x3C
        gmem.punch_hole(2 * PAGE_SIZE, PAGE_SIZE)
        assert [int(mem.array[p * PAGE_SIZE]) for p in range(4)] == [0x3C, 0x3C, 0, 0x3C]

    with gmem_target.open(PAGE_SIZE, "mmap") as private, private.mmap() as mem:
        assert gmem_expect_sigbus(lambda: mem.array[0])  # private at first: the host faults


def test_factory_refuses_what_a_target_cannot_do():
    with pytest.raises(ValueError, match="unknown guest_memfd target 'qemu'"):
        open_gmem("qemu", PAGE_SIZE, 0)
    with pytest.raises(ValueError, match="needs mount="):
        open_gmem("ufsgmem", PAGE_SIZE, 0)
    with pytest.raises(ValueError, match="in_place_conversion=False by definition"):
        open_gmem("ufsgmem-no-inplace", PAGE_SIZE, 0, mount="/nowhere", in_place_conversion=True)
    for option in ({"page_size": "2M"}, {"backend": "hugetlb"}, {"in_place_conversion": True}):
        with pytest.raises(GuestMemfdError) as refused:
            open_gmem("kernel", SZ_2M, 0, **option)
        assert refused.value.errno == errno.EOPNOTSUPP, option
    with pytest.raises(ValueError, match="unknown feature"):
        missing_feature("kernel", "teleport")
    with pytest.raises(ValueError, match="unknown guest_memfd flag"):
        open_gmem("kernel", PAGE_SIZE, "mmap|bogus")


def test_the_conversion_cap_comes_from_the_installed_header(tmp_path):
    header = tmp_path / "kvm.h"
    header.write_text("#define KVM_CAP_GUEST_MEMFD_FLAGS 244\n#define  KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES (250)\n")
    assert header_constant("KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES", str(header)) == 250
    assert header_constant("KVM_CAP_GUEST_MEMFD_FLAGS", str(header)) == 244
    assert header_constant("KVM_CAP_NOT_THERE", str(header)) is None
    assert header_constant("KVM_CAP_GUEST_MEMFD_FLAGS", str(tmp_path / "missing.h")) is None

    if kernel_unavailable_reason() is not None:
        return
    reason = missing_feature("kernel", "conversion", header=str(header))
    if reason is not None:  # the header defines the cap: KVM_CHECK_EXTENSION was asked, not the ioctl
        assert f"KVM_CHECK_EXTENSION(KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES = 250, from {header})" in reason
    plain = missing_feature("kernel", "conversion", header=str(tmp_path / "missing.h"))
    if plain is not None:
        assert "does not define KVM_CAP_GUEST_MEMFD_MEMORY_ATTRIBUTES, so the ioctl itself was asked" in plain


def test_no_mount_of_ours_outlives_a_mounted_block():
    if fuse_unavailable_reason():
        pytest.skip(f"FUSE: {fuse_unavailable_reason()}")
    from ufsgmem.testing import mounted

    with pytest.raises(RuntimeError, match="boom"):
        with mounted() as mnt:
            path, pid = mnt.path, mnt.pid
            assert path in ufsgmem_mounts()
            raise RuntimeError("boom")
    assert path not in ufsgmem_mounts() and not os.path.exists(path) and not pid_alive(pid)
    assert not os.path.exists(logfile_path(path))
    assert os.path.dirname(path) == tempfile.gettempdir()
