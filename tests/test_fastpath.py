"""The compiled hot path (ufsgmem/fuse/fastpath.c) on real mounts: it serves P3's steps (fill, write-back,
the conversion ioctl both ways), and every case it leaves to Python gets today's answer.

The mount's ``status`` counts mem's requests by who served them (``hot_path``); the counts are per mount
and the module's tests share one, so each test compares counts before and after its own requests (the
kernel may write back another test's dirty pages meanwhile: a test counts only what it alone causes).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal

import pytest

from fusefix import Gmem, mounted, requires_fuse
from test_fuse_mem import in_child, map_mem
from ufsgmem.protocol import attributes2, error_offset_of
from ufsgmem.uapi import KVM_MEMORY_ATTRIBUTE_PRIVATE, KVM_SET_MEMORY_ATTRIBUTES2

pytestmark = requires_fuse
PS = 4096
KINDS = ("read", "write", "ioctl")


def counts(g: Gmem) -> dict:
    return g.status()["hot_path"]


def delta(before: dict, after: dict) -> dict:
    return {k: {who: after[k][who] - before[k][who] for who in ("compiled", "python")} for k in KINDS}


def convert(fd: int, offset: int, size: int, private: bool) -> tuple[int, bytearray]:
    """ioctl(KVM_SET_MEMORY_ATTRIBUTES2) on a mem descriptor: (0 or errno, the struct as copied back)."""
    arg = bytearray(attributes2(offset, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0))
    try:
        fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True)
    except OSError as exc:
        return exc.errno, arg
    return 0, arg


def round_trips(g: Gmem, m: mmap.mmap, fd: int, n: int, page: int = 0) -> None:
    """P3's steps n times: the page written through the mapping (fill, then write-back when it is
    revoked), shared→private, shared again, and the content checked after each."""
    for i in range(n):
        value = bytes([(i % 250) + 1]) * 8
        m[page * PS:page * PS + 8] = value
        assert convert(fd, page * PS, PS, private=True)[0] == 0
        assert g.guest_read(page * PS, 8) == value  # the write-back reached the backend
        assert convert(fd, page * PS, PS, private=False)[0] == 0
        assert m[page * PS:page * PS + 8] == value  # filled again


def test_p3_round_trips_are_served_compiled(gmem):
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        round_trips(g, m, fd, 2)  # the first allocates and opens the write-back descriptor, in Python
        before = counts(g)
        round_trips(g, m, fd, 5)
        after = counts(g)
    finally:
        m.close()
        os.close(fd)
    assert after["mode"] == "compiled" and after["compiled_serving"]
    d = delta(before, after)
    assert d["ioctl"] == {"compiled": 10, "python": 0}, d
    # Each revocation writes the page back (the kernel may write other tests' pages back meanwhile, so
    # Python's write count is not this test's alone); fills are this file's only (how many, readahead
    # decides), and none reached Python.
    assert d["write"]["compiled"] >= 5 and d["read"]["compiled"] >= 1 and d["read"]["python"] == 0, d


def test_a_page_revoked_while_another_process_holds_it_dirty(gmem):
    """P3 proper: a child maps the page and dirties it; the parent converts through the ioctl; the child's
    data survived, and its next access to the private page is SIGBUS."""
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        round_trips(g, m, fd, 2, page=1)
        before = counts(g)
        for i in range(3):
            assert in_child(lambda: m.__setitem__(slice(PS, PS + 4), b"ch%02d" % i)) == 0
            assert convert(fd, PS, PS, private=True)[0] == 0
            assert g.guest_read(PS, 4) == b"ch%02d" % i
            assert in_child(lambda: m[PS]) == -signal.SIGBUS
            assert convert(fd, PS, PS, private=False)[0] == 0
        d = delta(before, counts(g))
    finally:
        m.close()
        os.close(fd)
    assert d["ioctl"]["compiled"] == 6 and d["ioctl"]["python"] == 0, d
    assert d["read"]["compiled"] >= 3, d  # including the private page's fill: EIO from C


def test_read_and_write_syscalls_are_einval_from_python(gmem):
    g = gmem(PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        before = counts(g)
        with pytest.raises(OSError) as read:
            os.read(fd, PS)
        with pytest.raises(OSError) as write:
            os.write(fd, b"x" * PS)
        d = delta(before, counts(g))
    finally:
        os.close(fd)
    assert read.value.errno == errno.EINVAL and write.value.errno == errno.EINVAL
    assert d["read"] == {"compiled": 0, "python": 1} and d["write"] == {"compiled": 0, "python": 1}, d


def test_a_never_allocated_page_fills_with_zeros_and_is_charged(gmem):
    g = gmem(4 * PS)
    m = map_mem(g)
    try:
        before = counts(g)
        assert m[2 * PS:3 * PS] == bytes(PS)
        d = delta(before, counts(g))
        status = g.status()
    finally:
        m.close()
    assert d["read"]["compiled"] >= 1, d  # zeros from C, charged in C
    assert status["committed_bytes"] >= PS and status["backend_bytes"] == 0
    assert status["mount_memory"]["committed"] >= status["committed_bytes"]


def test_pinned_page_is_eagain_with_error_offset(gmem):
    g = gmem(4 * PS)
    g.request(f"pin offset={2 * PS} size={PS}")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        before = counts(g)
        err, arg = convert(fd, 0, 4 * PS, private=True)
        d = delta(before, counts(g))
    finally:
        os.close(fd)
    assert err == errno.EAGAIN and error_offset_of(arg) == 2 * PS
    assert d["ioctl"] == {"compiled": 1, "python": 0}, d
    assert g.status()["conversions"]["eagain"] == 1


def test_malformed_conversion_is_einval_and_changes_nothing(gmem):
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        assert convert(fd, 1, PS, private=True)[0] == errno.EINVAL
        assert convert(fd, 0, 8 * PS, private=True)[0] == errno.EINVAL
    finally:
        os.close(fd)
    assert g.status()["conversions"]["to_private"] == 0


def test_read_only_handle_is_ebadf_from_python(gmem):
    g = gmem(PS)
    fd = os.open(g.path("mem"), os.O_RDONLY)
    try:
        before = counts(g)
        assert convert(fd, 0, PS, private=True)[0] == errno.EBADF
        d = delta(before, counts(g))
    finally:
        os.close(fd)
    assert d["ioctl"] == {"compiled": 0, "python": 1}, d


def test_sim_backend_is_served_by_python(gmem):
    g = gmem(4 * PS, backend="sim")
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        round_trips(g, m, fd, 2)
        before = counts(g)
        round_trips(g, m, fd, 2)
        d = delta(before, counts(g))
    finally:
        m.close()
        os.close(fd)
    # No memory of its own for C: fills and write-backs go to Python; conversions of cached pages need
    # the write-back descriptor, which Python opened, so C converts.
    assert d["read"]["compiled"] == 0 and d["read"]["python"] >= 2, d
    assert d["write"]["compiled"] == 0 and d["write"]["python"] >= 2, d


def test_max_memory_refuses_a_fill_with_sigbus():
    with mounted(max_memory=2 * PS) as mount:
        mount.ctl(f"create capped size={8 * PS} flags=mmap|init_shared")
        g = Gmem(mount, "capped", 8 * PS)
        m = map_mem(g)
        try:
            assert in_child(lambda: [m[i * PS] for i in range(2)]) == 0
            assert in_child(lambda: m[5 * PS]) == -signal.SIGBUS
        finally:
            m.close()
            mount.ctl("destroy capped")


def test_hot_path_python_serves_everything_in_python():
    with mounted(hot_path="python") as mount:
        mount.ctl(f"create slow size={4 * PS} flags=mmap|init_shared")
        g = Gmem(mount, "slow", 4 * PS)
        fd = os.open(g.path("mem"), os.O_RDWR)
        m = map_mem(g)
        try:
            round_trips(g, m, fd, 3)
            hot = counts(g)
        finally:
            m.close()
            os.close(fd)
            mount.ctl("destroy slow")
    assert hot["mode"] == "python" and not hot["compiled_serving"]
    assert all(hot[k]["compiled"] == 0 for k in KINDS), hot
    assert hot["ioctl"]["python"] == 6 and hot["read"]["python"] >= 3 and hot["write"]["python"] >= 3, hot


def test_destroyed_file_still_mapped_keeps_working(gmem):
    """The memory C maps lives as long as the file: destroyed while mapped, it still fills and writes back
    (the server frees it at the last munmap)."""
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        round_trips(g, m, fd, 2)
        g.mount.ctl(f"destroy {g.name}")
        m[0:4] = b"left"
        assert convert(fd, 0, PS, private=True)[0] == 0
        assert convert(fd, 0, PS, private=False)[0] == 0
        assert m[0:4] == b"left"
    finally:
        m.close()
        os.close(fd)


def test_fills_during_a_punch_see_old_data_or_zeros(gmem):
    """A punch while another process keeps faulting the range: a fill that meets the pending punch is
    Python's (zeros, what the range holds once it commits), the others C's; none is refused, and once the
    punch returns every page reads zeros."""
    from test_fuse_mem import fallocate
    from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
    pages = 1024
    g = gmem(pages * PS)
    m = map_mem(g)
    m[:] = b"\x5a" * (pages * PS)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # fault every page again and again until the parent closes the pipe
        os.close(write_end)
        os.set_blocking(read_end, False)
        bad = 0
        while True:
            for i in range(0, pages, 7):
                if m[i * PS] not in (0, 0x5A):
                    bad += 1
            try:
                if os.read(read_end, 1) == b"":
                    break
            except BlockingIOError:
                pass
        os._exit(1 if bad else 0)
    os.close(read_end)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        for _ in range(5):
            fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, pages * PS)
            m[::PS] = b"\x5a" * pages
    finally:
        os.close(fd)
        os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, pages * PS)
    finally:
        os.close(fd)
    assert m[:] == bytes(pages * PS)
    m.close()
