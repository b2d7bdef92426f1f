"""NAME/mem through a real mount: the guest_memfd file rules (docs/design.md §2.4), SIGBUS in real processes.

Each accessing process is a fork of the test process: a host access the kernel answers with SIGBUS kills
the child, and the parent checks how it ended.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import json
import mmap
import os
import signal

import pytest

from fusefix import mounted, requires_fuse
from ufsgmem.address import Range
from ufsgmem.fuse.revoke import write_back
from ufsgmem.syscalls import fallocate
from ufsgmem.uapi import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, KVM_MEMORY_ATTRIBUTES2_STRUCT, \
    KVM_SET_MEMORY_ATTRIBUTES2

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096


def in_child(fn) -> int:
    """Run ``fn()`` in a forked child; return its exit code, or -signal if a signal killed it."""
    pid = os.fork()
    if pid == 0:
        faulthandler.disable()  # the SIGBUS is expected: no crash report
        try:
            fn()
        except BaseException:  # noqa: BLE001
            os._exit(3)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def map_mem(g, length=None, flags=mmap.MAP_SHARED):
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        return mmap.mmap(fd, length or g.size, flags)
    finally:
        os.close(fd)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]


def raw_map(path: str, length: int) -> int:
    """mmap(2) without Python's length check (a mapping may run past EOF); returns the address."""
    fd = os.open(path, os.O_RDWR)
    try:
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    return addr


def errno_of(fn) -> int | None:
    try:
        fn()
    except OSError as exc:
        return exc.errno
    return None


def test_file_rules(gmem):
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        st = os.fstat(fd)
        assert st.st_size == 4 * PS and st.st_blksize == PS
        assert errno_of(lambda: os.write(fd, b"x")) == errno.EINVAL, "write(2) on guest_memfd is EINVAL"
        assert errno_of(lambda: os.pread(fd, 1, 0)) == errno.ESPIPE
        assert errno_of(lambda: os.pwrite(fd, b"x", 0)) == errno.ESPIPE
        assert errno_of(lambda: os.lseek(fd, 0, os.SEEK_SET)) == errno.ESPIPE
        assert errno_of(lambda: os.ftruncate(fd, 4 * PS)) == errno.EINVAL, "setattr is always EINVAL"
        assert errno_of(lambda: os.ftruncate(fd, 0)) == errno.EINVAL
        assert errno_of(lambda: os.fchmod(fd, 0o644)) == errno.EINVAL
    finally:
        os.close(fd)
    assert errno_of(lambda: os.open(g.path("mem"), os.O_RDWR | os.O_TRUNC)) == errno.EINVAL
    assert os.stat(g.path("mem")).st_mode & 0o777 == 0o600


def test_every_file_has_its_own_inode(gmem):
    a, b = gmem(PS), gmem(2 * PS)
    assert os.stat(a.path()).st_ino != os.stat(b.path()).st_ino
    assert os.stat(b.path()).st_size == 2 * PS


def test_no_mmap_flag_faults_every_access_and_io_fails(gmem):
    """Without MMAP the kernel refuses mmap(2) itself (ENODEV). FUSE never sees mmap(2) and the mount lets
    direct-I/O files be mapped (FUSE_DIRECT_IO_ALLOW_MMAP is per connection), so the mapping succeeds
    here, but every access is SIGBUS (a documented deviation); read(2)/write(2) are EINVAL either way."""
    g = gmem(4 * PS, flags="init_shared")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        m = mmap.mmap(fd, 4 * PS, mmap.MAP_SHARED)
        assert in_child(lambda: m[0]) == -signal.SIGBUS
        assert in_child(lambda: m.__setitem__(3 * PS, 1)) == -signal.SIGBUS
        m.close()
        assert errno_of(lambda: os.read(fd, 1)) == errno.EINVAL
        assert errno_of(lambda: os.write(fd, b"x")) == errno.EINVAL
    finally:
        os.close(fd)


def test_shared_mapping_round_trip_and_punch(gmem):
    """S-test mmap_supported: memset 0xaa, punch page 0 (zeros there, 0xaa elsewhere), write it again."""
    g = gmem(4 * PS)
    m = map_mem(g)
    m[:] = b"\xaa" * g.size
    assert m[:] == b"\xaa" * g.size
    g.request(f"punch_hole offset=0 size={PS}")
    assert m[:PS] == bytes(PS) and m[PS:] == b"\xaa" * 3 * PS
    m[:PS] = b"\x55" * PS
    assert g.guest_read(0, PS) == b"\x55" * PS
    m.close()


def test_fault_past_eof_is_sigbus(gmem):
    """S-test fault_overflow: a mapping 4x the file; in-file bytes keep their value."""
    g = gmem(4 * PS)
    addr = raw_map(g.path("mem"), 16 * PS)
    assert in_child(lambda: ctypes.memset(addr, 0xAA, 16 * PS)) == -signal.SIGBUS
    assert in_child(lambda: ctypes.string_at(addr + g.size, 1)) == -signal.SIGBUS
    assert ctypes.string_at(addr, g.size) == b"\xaa" * g.size, "bytes inside the file keep the memset"


def test_fault_private_is_sigbus(gmem):
    """S-test fault_private: without init_shared every host access is SIGBUS."""
    g = gmem(4 * PS, flags="mmap")
    m = map_mem(g)
    assert in_child(lambda: m[0]) == -signal.SIGBUS
    assert in_child(lambda: m.__setitem__(slice(0, 1), b"x")) == -signal.SIGBUS
    m.close()


def test_shared_neighbours_of_a_private_page_stay_accessible(gmem):
    g = gmem(8 * PS)
    m = map_mem(g)
    m[:] = bytes(range(256)) * (g.size // 256)
    g.convert(3 * PS, PS, private=True)
    for page in (0, 1, 2, 4, 5, 7):  # reads and writes of every shared page still work
        assert in_child(lambda: m.__setitem__(slice(page * PS, page * PS + 1), b"z")) == 0
        assert m[page * PS] == ord("z")
    assert in_child(lambda: m[3 * PS]) == -signal.SIGBUS
    assert in_child(lambda: m[4 * PS - 1]) == -signal.SIGBUS
    # a fresh mapping covering the private page reads its shared neighbours too
    m2 = map_mem(g)
    assert m2[2 * PS:3 * PS] == m[2 * PS:3 * PS] and m2[4 * PS] == ord("z")
    m.close()
    m2.close()


def test_read_and_write_syscalls_are_einval_and_change_nothing(gmem):
    """guest_memfd has no read() or write(): EINVAL, for shared and private pages alike, and a refused
    write changes no byte a mapping sees, even over a page dirty in that mapping."""
    g = gmem(2 * PS)
    m = map_mem(g)
    m[:] = b"\x11" * 2 * PS  # dirty in this mapping, not yet written back
    g.convert(PS, PS, private=True)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        assert errno_of(lambda: os.read(fd, PS)) == errno.EINVAL
        assert errno_of(lambda: os.write(fd, b"\x99" * 8)) == errno.EINVAL
        assert errno_of(lambda: os.pread(fd, PS, 0)) == errno.ESPIPE
        assert errno_of(lambda: os.pwrite(fd, b"\x99", 0)) == errno.ESPIPE
    finally:
        os.close(fd)
    assert m[:PS] == b"\x11" * PS, "the refused write reached the mapping"
    assert g.guest_read(0, 2 * PS) == b"\x11" * 2 * PS, "the dirty page or the private one was lost"
    m.close()


def test_map_private_deviation_never_reads_private_bytes(gmem):
    """Deviation (documented): FUSE cannot refuse MAP_PRIVATE; its private pages still SIGBUS."""
    g = gmem(2 * PS)
    g.convert(PS, PS, private=True)
    g.guest_write(PS, b"secret")
    m = map_mem(g, flags=mmap.MAP_PRIVATE)
    assert in_child(lambda: m[PS]) == -signal.SIGBUS
    m.close()


def test_no_path_reads_private_bytes(gmem):
    """Design §6: read, splice, sendfile, copy_file_range, status: none returns a private byte (nor a
    shared one: guest_memfd has no read)."""
    g = gmem(2 * PS)
    g.convert(0, PS, private=True)
    g.guest_write(0, b"SECRET" * 600)
    fd = os.open(g.path("mem"), os.O_RDONLY)
    out_r, out_w = os.pipe()
    sink = os.open("/dev/null", os.O_WRONLY)
    try:
        attempts = {
            "read": lambda: os.read(fd, PS),
            "splice": lambda: os.splice(fd, out_w, PS),
            "sendfile": lambda: os.sendfile(sink, fd, None, PS),
            "sendfile at 0": lambda: os.sendfile(sink, fd, 0, PS),
            "copy_file_range": lambda: os.copy_file_range(fd, sink, PS, 0, 0),
        }
        for name, attempt in attempts.items():
            assert errno_of(attempt) is not None, f"{name} of a private page succeeded"
    finally:
        for f in (fd, out_r, out_w, sink):
            os.close(f)
    with open(g.path("status"), "rb") as f:
        assert b"SECRET" not in f.read()


def test_fallocate_syscall_allocates_and_punches(gmem):
    """fallocate(2) on mem with guest_memfd's table: KEEP_SIZE allocates, KEEP_SIZE|PUNCH_HOLE punches
    (zeroes in every mapping, neighbours kept, attribute kept), every other mode EOPNOTSUPP."""
    g = gmem(4 * PS)
    m = map_mem(g)
    m[:] = b"\xab" * 4 * PS
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4 * PS)
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, PS, PS)
        assert m[PS:2 * PS] == bytes(PS) and m[:PS] == b"\xab" * PS and m[2 * PS:] == b"\xab" * 2 * PS
        for mode in (0, FALLOC_FL_KEEP_SIZE | 0x10):  # allocate without KEEP_SIZE, ZERO_RANGE
            assert errno_of(lambda: fallocate(fd, mode, 0, PS)) == errno.EOPNOTSUPP
        assert errno_of(lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE, 4 * PS, PS)) == errno.EINVAL
        assert errno_of(lambda: fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 1, PS)) == errno.EINVAL
        fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 4 * PS, PS)  # past EOF: a no-op success
    finally:
        os.close(fd)
    ro = os.open(g.path("mem"), os.O_RDONLY)
    try:
        assert errno_of(lambda: fallocate(ro, FALLOC_FL_KEEP_SIZE, 0, PS)) == errno.EBADF
    finally:
        os.close(ro)
    assert g.status()["shared_bytes"] == 4 * PS
    m.close()


def test_fsync_fdatasync_and_msync_sync_are_einval(gmem):
    """guest_memfd has no fsync method; the dirty data still reaches the file (msync wrote it back first)."""
    g = gmem(4 * PS)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        m = mmap.mmap(fd, g.size, mmap.MAP_SHARED)
        m[:] = b"\x3c" * g.size
        assert errno_of(m.flush) == errno.EINVAL, "msync(MS_SYNC)"
        for _ in range(2):  # a second time too: an ENOSYS answer would make every later fsync succeed
            assert errno_of(lambda: os.fsync(fd)) == errno.EINVAL
            assert errno_of(lambda: os.fdatasync(fd)) == errno.EINVAL
        m[:PS] = b"\x3d" * PS
        # The server's bulk write-back before a revocation is sync_file_range, which never sends FUSE_FSYNC:
        # it must still work (on failure the server silently falls back to laundering page by page).
        assert write_back(fd, [Range(0, g.size)]) is True
        assert g.guest_read(0, PS) == b"\x3d" * PS
        m.close()
    finally:
        os.close(fd)
    assert g.guest_read(PS, 3 * PS) == b"\x3c" * 3 * PS
    for other in ("ctl", "guest", "status"):  # only mem refuses
        fd = os.open(g.path(other), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def test_prot_exec_is_eperm_on_a_noexec_mount(gmem, fuse_mount):
    g = gmem(PS)
    with open("/proc/self/mounts") as f:
        options = next(line.split()[3] for line in f if line.split()[1] == os.path.realpath(fuse_mount.path))
    assert "noexec" in options.split(",")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        exec_prot = mmap.PROT_READ | mmap.PROT_EXEC
        assert errno_of(lambda: mmap.mmap(fd, PS, mmap.MAP_SHARED, exec_prot)) == errno.EPERM
        mmap.mmap(fd, PS, mmap.MAP_SHARED, mmap.PROT_READ).close()
    finally:
        os.close(fd)


def set_attributes(fd: int, offset: int, size: int, attributes: int) -> int | None:
    """ioctl(KVM_SET_MEMORY_ATTRIBUTES2); the errno, or None on success."""
    import fcntl
    arg = bytearray(KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, attributes, 0, 0, *(0,) * 11))
    return errno_of(lambda: fcntl.ioctl(fd, KVM_SET_MEMORY_ATTRIBUTES2, arg, True))


def test_a_mount_can_play_a_kernel_without_in_place_conversion():
    """mount --no-in-place-conversion: the ioctl is ENOTTY (kvm.gmem_in_place_conversion=0), a file created
    with in_place_conversion=1 still converts, and status says which is which."""
    with mounted(in_place_conversion=False) as mount:
        mount.ctl(f"create old size={4 * PS} flags=mmap|init_shared")
        mount.ctl(f"create new size={4 * PS} flags=mmap|init_shared in_place_conversion=1")
        for name, expected in (("old", errno.ENOTTY), ("new", None)):
            fd = os.open(os.path.join(mount.path, name, "mem"), os.O_RDWR)
            try:
                assert set_attributes(fd, 0, PS, 8) == expected, name
            finally:
                os.close(fd)
            with open(os.path.join(mount.path, name, "status")) as f:
                assert json.load(f)["in_place_conversion"] is (expected is None)
        mount.ctl("destroy old")
        mount.ctl("destroy new")


def test_status_reports_the_page_cache_side(gmem):
    """Mapped memory costs twice (backend + FUSE page cache): status says how much of each, the page-cache
    figure as an upper bound that falls when a range is revoked. Pages read in but not yet written back
    hold no backend memory, and are committed all the same (their write-back will need it)."""
    g = gmem(64 * PS)
    assert g.status()["page_cache_bytes_max"] == 0
    m = map_mem(g)
    m[:16 * PS] = b"\x01" * 16 * PS
    st = g.status()
    assert st["page_cache_bytes_max"] >= 16 * PS and st["backend_bytes"] == 0
    assert st["committed_bytes"] == st["page_cache_bytes_max"]
    g.convert(0, 16 * PS, private=True)  # writes the dirty pages back: now the backend holds them
    after = g.status()
    assert after["page_cache_bytes_max"] <= st["page_cache_bytes_max"] - 16 * PS
    assert after["backend_bytes"] >= 16 * PS and after["allocated_bytes"] == 16 * PS
    assert after["committed_bytes"] == after["page_cache_bytes_max"] + 16 * PS
    assert bytes(g.guest_read(0, 16 * PS)) == b"\x01" * 16 * PS
    m.close()
