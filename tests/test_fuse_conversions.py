"""The v8 conversion behaviours (docs/design.md §7.6.2) through a real mount, with NAME/guest as the vCPU.

The helpers mirror the kernel selftest's contract: ``check_private`` (host accesses SIGBUS, the guest
reads the old value and writes a new one) and ``check_shared`` (host and guest see each other's writes).
Host accesses that must SIGBUS run in forked children.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal

import pytest

from fusefix import requires_fuse
from test_fuse_mem import in_child, map_mem

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096


class Vm:
    """One guest_memfd with a host mapping in this process and the guest file as the vCPU."""

    def __init__(self, g):
        self.g = g
        self.map = map_mem(g)

    def host_read(self, pg: int) -> int:
        return self.map[pg * PS]

    def host_write(self, pg: int, value: int) -> None:
        self.map[pg * PS] = value

    def guest_read(self, pg: int) -> int:
        return self.g.guest_read(pg * PS, 1)[0]

    def guest_write(self, pg: int, value: int) -> None:
        self.g.guest_write(pg * PS, bytes([value]))

    def check_private(self, pg: int, start: int, w: int) -> None:
        assert in_child(lambda: self.host_write(pg, w)) == -signal.SIGBUS, f"host write of private page {pg}"
        assert self.guest_read(pg) == start
        self.guest_write(pg, w)
        assert in_child(lambda: self.host_read(pg)) == -signal.SIGBUS, f"host read of private page {pg}"

    def check_shared(self, pg: int, start: int, hw: int, w: int) -> None:
        assert self.host_read(pg) == start
        self.host_write(pg, hw)
        assert self.guest_read(pg) == hw
        self.guest_write(pg, w)
        assert self.host_read(pg) == w, "a guest write must reach a mapping that already exists"

    def to_private(self, pg: int, npages: int = 1) -> None:
        self.g.convert(pg * PS, npages * PS, private=True)

    def to_shared(self, pg: int, npages: int = 1) -> None:
        self.g.convert(pg * PS, npages * PS, private=False)


def test_init_private(gmem):
    vm = Vm(gmem(PS, flags="mmap"))
    vm.check_private(0, 0, ord("A"))
    vm.to_shared(0)
    vm.check_shared(0, ord("A"), ord("B"), ord("C"))
    vm.to_private(0)
    vm.check_private(0, ord("C"), ord("D"))


def test_init_shared(gmem):
    vm = Vm(gmem(PS))
    vm.check_shared(0, 0, ord("A"), ord("B"))
    vm.to_private(0)
    vm.check_private(0, ord("B"), ord("C"))
    vm.to_shared(0)
    vm.check_shared(0, ord("C"), ord("D"), ord("E"))


@pytest.mark.parametrize("test_page", [3, 2, 1, 0])
def test_indexing(gmem, test_page):
    vm = Vm(gmem(4 * PS))
    for pg in range(4):
        vm.check_shared(pg, 0, ord("A"), ord("B"))
    vm.to_private(test_page)
    for pg in reversed(range(4)):
        if pg == test_page:
            vm.check_private(pg, ord("B"), ord("C"))
        else:
            vm.check_shared(pg, ord("B"), ord("C"), ord("D"))
    vm.to_shared(test_page)
    vm.check_shared(test_page, ord("C"), ord("D"), ord("E"))


def test_before_allocation_shared(gmem):
    vm = Vm(gmem(PS))
    vm.to_private(0)
    vm.check_private(0, 0, ord("A"))


def test_before_allocation_private(gmem):
    vm = Vm(gmem(PS, flags="mmap"))
    vm.to_shared(0)
    vm.check_shared(0, 0, ord("A"), ord("B"))


@pytest.mark.parametrize("test_page", [0, 4, 7])
def test_unallocated_folios(gmem, test_page):
    vm = Vm(gmem(8 * PS))
    vm.host_write(test_page, ord("A"))
    vm.host_write(4, ord("A"))
    vm.to_private(0, 8)
    for pg in range(8):
        vm.check_private(pg, ord("A") if pg in (test_page, 4) else 0, ord("B"))
    for pg in range(8):
        vm.to_shared(pg)
        vm.check_shared(pg, ord("B"), ord("C"), ord("D"))


def test_truncate(gmem):
    vm = Vm(gmem(PS))
    vm.check_shared(0, 0, ord("A"), ord("B"))
    vm.g.request(f"punch_hole offset=0 size={PS}")
    vm.check_shared(0, 0, ord("C"), ord("D"))  # zero, and still shared
    vm.to_private(0)
    vm.check_private(0, ord("D"), ord("E"))  # the guest sees the host's data
    vm.g.request(f"punch_hole offset=0 size={PS}")
    vm.check_private(0, 0, ord("F"))  # punch leaves it private and zero


def test_forked_accesses(gmem):
    """The child maps and uses the page; the parent converts it; the child's accesses now SIGBUS."""
    g = gmem(PS)
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        import faulthandler
        faulthandler.disable()
        m = map_mem(g)
        m[0] = ord("A")
        os.write(to_parent_w, b"r")
        os.read(to_child_r, 1)
        m[0]  # must raise SIGBUS: the mapping was revoked in this process too
        os._exit(0)
    assert os.read(to_parent_r, 1) == b"r"
    g.convert(0, PS, private=True)
    os.write(to_child_w, b"c")
    _, status = os.waitpid(pid, 0)
    for fd in (to_child_r, to_child_w, to_parent_r, to_parent_w):
        os.close(fd)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS
    assert g.guest_read(0, 1) == b"A", "the child's dirty byte was written back before the flip"


def read_result(g, request: str) -> tuple[int | None, str]:
    fd = os.open(g.path("ctl"), os.O_RDWR)
    try:
        try:
            os.write(fd, request.encode())
            err = None
        except OSError as exc:
            err = exc.errno
        return err, os.read(fd, 4096).decode()
    finally:
        os.close(fd)


@pytest.mark.parametrize("test_page", [0, 1, 2, 3])
def test_elevated_refcount(gmem, test_page):
    vm = Vm(gmem(4 * PS))
    for pg in range(4):
        vm.check_shared(pg, 0, ord("A"), ord("B"))
    vm.g.request(f"pin offset={test_page * PS} size={PS}")
    err, text = read_result(vm.g, f"set_memory_attributes offset=0 size={4 * PS} attributes=private")
    assert err == errno.EAGAIN and text.startswith(f"error EAGAIN error_offset={test_page * PS:#x}")
    for pg in range(4):
        err, text = read_result(vm.g, f"set_memory_attributes offset={pg * PS} size={PS} attributes=private")
        if pg == test_page:
            assert err == errno.EAGAIN and f"error_offset={pg * PS:#x}" in text
        else:
            assert err is None and text == "ok\n"
            vm.to_shared(pg)
    vm.g.request(f"unpin offset={test_page * PS} size={PS}")
    vm.to_private(0, 4)
    for pg in range(4):
        vm.check_private(pg, ord("B"), ord("C"))


def test_noop_conversion_on_a_pinned_page_succeeds(gmem):
    g = gmem(2 * PS)
    g.request(f"pin offset=0 size={PS}")
    g.convert(0, 2 * PS, private=False)
    assert g.status()["conversions"]["noop"] >= 1


# --- revocation is ranged, content is preserved ----------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def resident_pages(m: mmap.mmap) -> bytes:
    """mincore(2) of a whole mapping: one byte per page, bit 0 = in the page cache."""
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    vec = (ctypes.c_ubyte * (len(m) // PS))()
    assert _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(m)), vec) == 0
    return bytes(b & 1 for b in vec)


@pytest.mark.slow
def test_revocation_is_ranged(gmem):
    """Converting one 4 KiB page of a 1 GiB file leaves another process's mapping of the rest resident."""
    size = 1 << 30
    g = gmem(size)
    victim = 12345
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        m = map_mem(g)
        m.madvise(mmap.MADV_POPULATE_WRITE if hasattr(mmap, "MADV_POPULATE_WRITE") else 23)
        os.write(res_w, resident_pages(m)[:0] + b"r")
        os.read(cmd_r, 1)
        vec = resident_pages(m)
        os.write(res_w, f"{vec.count(1)} {vec[victim]} {vec[victim - 1]} {vec[victim + 1]}".encode())
        os._exit(0)
    try:
        assert os.read(res_r, 1) == b"r"
        g.convert(victim * PS, PS, private=True)
        os.write(cmd_w, b"c")
        resident, at, before, after = map(int, os.read(res_r, 100).split())
    finally:
        os.waitpid(pid, 0)
        for fd in (cmd_r, cmd_w, res_r, res_w):
            os.close(fd)
    assert at == 0, "the converted page was revoked"
    assert before == after == 1, "its neighbours stay mapped"
    assert resident == size // PS - 1, "exactly one page left the page cache"


def test_dirty_data_survives_a_round_trip(gmem):
    """Dirty bytes written through a mapping in another process are there after private and back."""
    g = gmem(512 * PS)
    pattern = os.urandom(g.size)

    def dirty():
        m = map_mem(g)
        m[:] = pattern  # dirty pages, never msync'ed: the revocation must write them back

    pid = os.fork()
    if pid == 0:
        dirty()
        os.read(os.open("/dev/null", os.O_RDONLY), 0)
        os._exit(0)
    os.waitpid(pid, 0)
    g.convert(0, g.size, private=True)
    assert g.guest_read(0, g.size) == pattern
    g.convert(0, g.size, private=False)
    assert map_mem(g)[:] == pattern


def test_dirty_data_survives_conversion_while_still_mapped(gmem):
    g = gmem(512 * PS)
    m = map_mem(g)
    pattern = os.urandom(g.size)
    m[:] = pattern
    g.convert(PS, 100 * PS, private=True)
    assert g.guest_read(0, g.size) == pattern
    g.convert(PS, 100 * PS, private=False)
    assert m[:] == pattern


@pytest.mark.hugetlb
def test_hugetlb_file_through_the_mount(fuse_mount, hugepages):
    """A 2 MiB HugeTLB file: starts private, a 4 KiB conversion splits its folio, converting back merges."""
    SZ_2M = 2 << 20
    with hugepages(SZ_2M, 2):
        fuse_mount.ctl("create huge size=4M flags=mmap backend=hugetlb page_size=2M")
        try:
            from fusefix import Gmem
            g = Gmem(fuse_mount, "huge", 4 << 20)
            assert os.stat(g.path()).st_blksize == SZ_2M
            assert g.status()["huge_folios"] == {"whole": 2, "split": 0}
            g.convert(SZ_2M + PS, PS, private=False)
            assert g.status()["huge_folios"] == {"whole": 1, "split": 1}
            m = map_mem(g)
            m[SZ_2M + PS:SZ_2M + 2 * PS] = b"\x77" * PS
            assert in_child(lambda: m[SZ_2M]) == -signal.SIGBUS, "the rest of the folio stays private"
            g.convert(SZ_2M + PS, PS, private=True)
            assert g.status()["huge_folios"] == {"whole": 2, "split": 0}
            assert g.guest_read(SZ_2M + PS, PS) == b"\x77" * PS
            m.close()
        finally:
            fuse_mount.ctl("destroy huge")


def test_guest_and_host_writes_to_one_shared_page_both_survive(gmem):
    """A dirty host page is written back before a guest write to the same page, and the existing mapping
    then sees the guest's bytes next to its own."""
    g = gmem(2 * PS)
    m = map_mem(g)
    m[0:4] = b"host"  # dirty in the page cache, not written back yet
    g.guest_write(100, b"guest")
    assert m[0:4] == b"host" and m[100:105] == b"guest"
    m[200:204] = b"more"
    assert g.guest_read(0, 4) == b"host" and g.guest_read(200, 4) == b"more"
    assert g.guest_read(100, 5) == b"guest"
    m.close()
