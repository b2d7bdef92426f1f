"""NAME/mem through a real mount: the guest_memfd file rules (design §2.4), SIGBUS in real processes.

Each accessing process is a fork of the test process: a host access the kernel answers with SIGBUS kills
the child, and the parent checks how it ended.
"""

from __future__ import annotations

import ctypes
import errno
import faulthandler
import mmap
import os
import signal

import pytest

from fusefix import fuse_mount, gmem, requires_fuse  # noqa: F401 (fixtures)
from ufsgmem.address import Range
from ufsgmem.fuse.revoke import write_back

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


def test_no_mmap_flag_is_enodev_and_io_fails(gmem):
    g = gmem(4 * PS, flags="init_shared")
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        for length in (PS, 4 * PS):
            assert errno_of(lambda: mmap.mmap(fd, length, mmap.MAP_SHARED)) == errno.ENODEV
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


def test_read_syscall_deviation(gmem):
    """Deviation (documented): read(2) of shared pages succeeds; of private pages it fails with EIO."""
    g = gmem(2 * PS)
    g.guest_write(0, b"shared")
    g.convert(PS, PS, private=True)
    g.guest_write(PS, b"secret")
    fd = os.open(g.path("mem"), os.O_RDONLY)
    try:
        assert os.read(fd, 6) == b"shared"
        # the read stops at the private page (a short count), and reading on into it is EIO
        assert os.read(fd, PS) == bytes(PS - 6)
        assert errno_of(lambda: os.read(fd, PS)) == errno.EIO
    finally:
        os.close(fd)


def test_map_private_deviation_never_reads_private_bytes(gmem):
    """Deviation (documented): FUSE cannot refuse MAP_PRIVATE; its private pages still SIGBUS."""
    g = gmem(2 * PS)
    g.convert(PS, PS, private=True)
    g.guest_write(PS, b"secret")
    m = map_mem(g, flags=mmap.MAP_PRIVATE)
    assert in_child(lambda: m[PS]) == -signal.SIGBUS
    m.close()


def test_no_path_reads_private_bytes(gmem):
    """Design §6: read, splice, sendfile, copy_file_range, status: none returns a private byte."""
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


def test_fallocate_deviation(gmem):
    """Deviation (documented): fallocate(2) on mem is EINVAL for every mode (the write(2) trap fires in
    the VFS first; pyfuse3 has no fallocate handler anyway). allocate/punch_hole go through ctl."""
    g = gmem(2 * PS)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        for mode in (0, 1, 3):
            assert libc.fallocate(fd, mode, 0, PS) == -1 and ctypes.get_errno() == errno.EINVAL
    finally:
        os.close(fd)


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
