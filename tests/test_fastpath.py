"""The compiled hot path (ufsgmem/fuse/fastpath.c) on real mounts: it serves P3's steps (fill, write-back,
the conversion ioctl both ways) and fallocate(2), and every case it leaves to Python gets today's answer.

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
from ufsgmem.syscalls import fallocate
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTE_PRIVATE, \
    KVM_SET_MEMORY_ATTRIBUTES2

pytestmark = requires_fuse
PS = 4096
KINDS = ("read", "write", "ioctl", "fallocate")


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


# --- fallocate(2) ---------------------------------------------------------------------------------------
ALLOCATE, PUNCH = FALLOC_FL_KEEP_SIZE, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def falloc(fd: int, mode: int, offset: int, length: int) -> int:
    """fallocate(2) on a mem descriptor: 0 or the errno."""
    try:
        fallocate(fd, mode, offset, length)
    except OSError as exc:
        return exc.errno
    return 0


#: A sequence of fallocates (mode, offset, length) and the errno each gets: allocations over pages some
#: fill charged already, punches of allocated, cached and untouched pages, past EOF, and refusals. The
#: first punch of cached pages is Python's (it opens the write-back descriptor), the next ones C's.
SEQUENCE = (
    (ALLOCATE, 0, 8 * PS, 0),
    (PUNCH, 2 * PS, 3 * PS, 0),
    (ALLOCATE, 4 * PS, 8 * PS, 0),       # part allocated already
    (PUNCH, 14 * PS, 8 * PS, 0),         # runs past EOF: punches up to it
    (PUNCH, 16 * PS, PS, 0),             # at EOF: nothing to do
    (ALLOCATE, PS + 1, PS, errno.EINVAL),  # unaligned
    (ALLOCATE, 12 * PS, 8 * PS, errno.EINVAL),  # past EOF
    (0, 0, PS, errno.EOPNOTSUPP),        # no KEEP_SIZE
    (FALLOC_FL_PUNCH_HOLE, 0, PS, errno.EOPNOTSUPP),  # these three the VFS refuses: no request
    (PUNCH, -PS, PS, errno.EINVAL),
    (ALLOCATE, 0, 0, errno.EINVAL),
    (PUNCH, 0, 16 * PS, 0),
    (ALLOCATE, 3 * PS, 2 * PS, 0),
)


def run_sequence(g: Gmem) -> tuple[dict, list[int], bytes]:
    """SEQUENCE on ``g`` with a mapping that fills pages 0-5 (some written) before it starts and reads
    them all at the end: the file's status, each call's errno, and what the mapping reads."""
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        m[0:4] = b"zero"
        m[5 * PS:5 * PS + 4] = b"five"
        assert m[3 * PS] == 0
        answers = [falloc(fd, mode, offset, length) for mode, offset, length, _ in SEQUENCE]
        content = m[:]
    finally:
        m.close()
        os.close(fd)
    status = g.status()
    for key in ("hot_path", "name", "mount_memory", "owner_bounds", "backend_info", "page_cache_bytes_max"):
        status.pop(key)
    return status, answers, content


def test_fallocate_is_served_compiled_as_python_serves_it(gmem):
    """Allocations, punches and refusals are answered from C, and leave the file exactly as Python would:
    the same errnos, allocation, counters, memory charge and content (a --hot-path python mount runs the
    same sequence)."""
    g = gmem(16 * PS)
    before = counts(g)
    status, answers, content = run_sequence(g)
    d = delta(before, counts(g))
    assert answers == [want for *_, want in SEQUENCE]
    requests = len(SEQUENCE) - 3
    assert d["fallocate"] == {"compiled": requests - 1, "python": 1}, d
    with mounted(hot_path="python") as mount:
        mount.ctl(f"create slow size={16 * PS} flags=mmap|init_shared")
        slow = Gmem(mount, "slow", 16 * PS)
        py_before = counts(slow)
        py_status, py_answers, py_content = run_sequence(slow)
        py_d = delta(py_before, counts(slow))
        mount.ctl("destroy slow")
    assert py_d["fallocate"] == {"compiled": 0, "python": requests}, py_d
    assert answers == py_answers
    assert content == py_content
    assert status == py_status
    assert status["punches"] == 3 and status["allocated_bytes"] == 2 * PS, status


def test_fallocate_past_max_memory_is_enomem_from_c():
    with mounted(max_memory=4 * PS) as mount:
        mount.ctl(f"create capped size={8 * PS} flags=mmap|init_shared")
        g = Gmem(mount, "capped", 8 * PS)
        fd = os.open(g.path("mem"), os.O_RDWR)
        try:
            before = counts(g)
            assert falloc(fd, ALLOCATE, 0, 3 * PS) == 0
            assert falloc(fd, ALLOCATE, 2 * PS, 4 * PS) == errno.ENOMEM  # 3 more pages: one too many
            refused = g.status()
            assert falloc(fd, ALLOCATE, 0, 4 * PS) == 0                  # the one left fits
            assert falloc(fd, PUNCH, 0, 8 * PS) == 0                     # and all goes back
            d = delta(before, counts(g))
            after = g.status()
        finally:
            os.close(fd)
            mount.ctl("destroy capped")
    assert d["fallocate"] == {"compiled": 4, "python": 0}, d
    assert refused["allocated_bytes"] == 3 * PS and refused["committed_bytes"] == 3 * PS, refused
    assert refused["mount_memory"]["committed"] == 3 * PS
    assert after["allocated_bytes"] == 0 and after["committed_bytes"] == 0
    assert after["mount_memory"]["committed"] == 0


def test_punch_of_a_mapped_dirty_page_reads_zeros_and_keeps_the_rest(gmem):
    """A punch from C of a page a mapping dirtied: the page reads zeros afterwards (in this mapping and
    another process's), the pages around it keep their data, and the punch revoked what was cached."""
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    m = map_mem(g)
    try:
        round_trips(g, m, fd, 2)  # the first opens the write-back descriptor, in Python
        for i in range(4):
            m[i * PS:(i + 1) * PS] = bytes([0x41 + i]) * PS
        assert in_child(lambda: m.__setitem__(slice(PS + 8, PS + 12), b"kid!")) == 0
        before = counts(g)
        revoked = g.status()["revoked_bytes"]
        assert falloc(fd, PUNCH, PS, PS) == 0
        d = delta(before, counts(g))
        assert m[PS:2 * PS] == bytes(PS)
        assert in_child(lambda: os._exit(0 if m[PS:2 * PS] == bytes(PS) else 1)) == 0
        for i in (0, 2, 3):
            assert m[i * PS:(i + 1) * PS] == bytes([0x41 + i]) * PS
            assert g.guest_read(i * PS, 8) == bytes([0x41 + i]) * 8
        status = g.status()
    finally:
        m.close()
        os.close(fd)
    assert d["fallocate"] == {"compiled": 1, "python": 0}, d
    assert status["revoked_bytes"] == revoked + PS and status["allocated_bytes"] == 3 * PS, status


def test_fallocate_cases_left_to_python(gmem):
    """A read-only handle (the VFS would refuse it: Python answers whatever reaches it), a backend that
    allocates on its own terms (sim), a punch of cached pages before the write-back descriptor exists."""
    g = gmem(4 * PS, backend="sim")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        before = counts(g)
        assert falloc(fd, ALLOCATE, 0, 4 * PS) == 0
        assert falloc(fd, PUNCH, 0, PS) == 0
        assert falloc(fd, ALLOCATE, 1, PS) == errno.EINVAL
        d = delta(before, counts(g))
    finally:
        os.close(fd)
    assert d["fallocate"] == {"compiled": 0, "python": 3}, d
    g = gmem(4 * PS)
    m = map_mem(g)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        m[0:4] = b"data"   # filled (cached), never revoked: no write-back descriptor yet
        before = counts(g)
        assert falloc(fd, PUNCH, 0, PS) == 0
        d = delta(before, counts(g))
        assert m[0:4] == bytes(4)
    finally:
        m.close()
        os.close(fd)
    assert d["fallocate"] == {"compiled": 0, "python": 1}, d


def test_a_compiled_allocation_is_the_backends_own(gmem):
    """C allocates through the backend's own mapping, as MemfdBackend.allocate does, so what the backend
    reports of it (thp: the resident bytes of its mapping) is what a Python allocation shows."""
    g = gmem(4 << 20, backend="thp")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        before = counts(g)
        assert falloc(fd, ALLOCATE, 0, 2 << 20) == 0
        d = delta(before, counts(g))
        info = g.status()["backend_info"]
        assert falloc(fd, PUNCH, 0, 2 << 20) == 0
        punched = g.status()["backend_info"]
    finally:
        os.close(fd)
    assert d["fallocate"] == {"compiled": 1, "python": 0}, d
    assert info["resident_bytes"] == 2 << 20 and punched["resident_bytes"] == 0, (info, punched)
