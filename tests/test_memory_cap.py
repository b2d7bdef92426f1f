"""Memory bounds of a mount (issue 9): readahead allocates nothing, and ``--max-memory`` is a real cap.

* Reading one byte of a mapping fills the page cache with a whole readahead window. Those pages are served
  as zeros without allocating backend memory (the kernel's guest_memfd has no readahead and allocates only
  at a fault); pages the mapping then writes are allocated when their write-back arrives, and no others.
  Before, reading one byte allocated the whole window (up to 4 MiB).
* Under ``ufsgmem mount --max-memory`` the request that needs memory past the cap fails: a fault gets
  SIGBUS (its fill is ENOMEM), ``allocate``, a guest write and a preallocating ``create`` get ENOMEM with a
  message, and nothing of a refused request changes. Every byte a mapping wrote before the cap is kept
  (a write-back is never refused), the server lives on, and punching a range gives its memory back.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys

import pytest

from fusefix import Gmem, mounted, requires_fuse
from ufsgmem.fuse.server import BDI_TUNING

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096
MiB = 1 << 20
#: How far a mapping's readahead may run ahead of its writer: the kernel starts the next window when the
#: writer reaches the first page of the last one, so up to two read-ahead windows of the mount's bdi.
AHEAD = 2 * (BDI_TUNING["read_ahead_kb"] << 10)


def test_reading_one_byte_allocates_nothing(gmem):
    g = gmem(64 * MiB)
    fd = os.open(g.path("mem"), os.O_RDWR)
    try:
        with mmap.mmap(fd, g.size) as m:
            assert m[5 * MiB] == 0
            st = g.status()
            assert st["page_cache_bytes_max"] >= PS, "the read was served through the page cache"
            assert st["allocated_bytes"] == 0 and st["backend_bytes"] == 0, st
            m[5 * MiB] = 7
            assert g.guest_read(5 * MiB, 2) == b"\x07\x00"  # the dirty page is written back first
            st = g.status()
            assert st["allocated_bytes"] == PS and st["backend_bytes"] == PS, st
    finally:
        os.close(fd)


WRITER = """
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
size = int(sys.argv[2])
m = mmap.mmap(fd, size)
for page in range(size // 4096):
    m[page * 4096:page * 4096 + 8] = (page + 1).to_bytes(8, "little")  # SIGBUS ends us at the cap
    os.write(1, b"%d\\n" % page)
"""


def write_until_refused(g: Gmem) -> list[int]:
    """Pages a child process wrote (one mapping, in order) before a fault was refused with SIGBUS."""
    child = subprocess.run([sys.executable, "-c", WRITER, g.path("mem"), str(g.size)], capture_output=True,
                           timeout=120)
    assert child.returncode == -signal.SIGBUS, (child.returncode, child.stderr.decode()[-2000:])
    return [int(n) for n in child.stdout.split()]


def refused(fn) -> OSError:
    with pytest.raises(OSError) as info:
        fn()
    return info.value


def test_max_memory_refuses_the_request_that_needs_more():
    cap = 32 * MiB
    with mounted(max_memory=cap) as mount:
        mount.ctl(f"create vm size={64 * MiB} flags=mmap|init_shared")
        g = Gmem(mount, "vm", 64 * MiB)
        written = write_until_refused(g)
        assert written == list(range(len(written))), "pages were written in order, each acknowledged"
        # what readahead filled ahead of the writer is committed too, so the writer may stop short of the cap
        assert cap - AHEAD <= len(written) * PS <= cap, len(written) * PS
        st = g.status()
        assert st["committed_bytes"] <= cap and st["mount_memory"] == {"max": cap, "committed": st["committed_bytes"]}

        # refused, with a reason, and nothing changed
        allocated = st["allocated_bytes"]
        exc = refused(lambda: g.request(f"allocate offset={32 * MiB:#x} size={8 * MiB:#x}"))
        assert exc.errno == errno.ENOMEM
        exc = refused(lambda: g.guest_write(40 * MiB, b"x"))
        assert exc.errno == errno.ENOMEM
        exc = refused(lambda: mount.ctl(f"create big size={64 * MiB} backend=sim page_size=2M"))
        assert exc.errno == errno.ENOMEM, "a preallocating create past the cap"
        assert not os.path.exists(os.path.join(mount.path, "big"))
        exc = refused(lambda: g.guest_read(40 * MiB, 1))
        assert exc.errno == errno.ENOMEM, "a vCPU's first touch allocates, as a guest fault does"
        st = g.status()
        assert st["allocated_bytes"] >= allocated and st["committed_bytes"] <= cap

        # every acknowledged write is there (the guest read writes the dirty pages back first)
        data = g.guest_read(0, len(written) * PS)
        for page in written:
            assert data[page * PS:page * PS + 8] == (page + 1).to_bytes(8, "little"), f"page {page} lost"
        assert g.status()["committed_bytes"] <= cap, "write-backs of charged pages need nothing more"

        # punching gives the memory back: the next writer gets as far again
        g.request(f"punch_hole offset=0 size={64 * MiB:#x}")
        st = g.status()
        assert st["committed_bytes"] == 0 and st["mount_memory"]["committed"] == 0, st
        assert abs(len(write_until_refused(g)) - len(written)) * PS <= AHEAD


def test_max_memory_is_given_back_when_a_file_goes():
    cap = 4 * MiB
    with mounted(max_memory=cap) as mount:
        mount.ctl(f"create a size={16 * MiB} flags=mmap|init_shared")
        a = Gmem(mount, "a", 16 * MiB)
        a.request(f"allocate offset=0 size={4 * MiB:#x}")
        mount.ctl(f"create b size={16 * MiB} flags=mmap|init_shared")
        b = Gmem(mount, "b", 16 * MiB)
        assert refused(lambda: b.request(f"allocate offset=0 size={PS:#x}")).errno == errno.ENOMEM
        assert b.status()["mount_memory"]["committed"] == cap
        mount.ctl("destroy a")
        b.request(f"allocate offset=0 size={4 * MiB:#x}")
        assert b.status()["mount_memory"] == {"max": cap, "committed": cap}


def test_max_memory_messages():
    out = subprocess.run([sys.executable, "-m", "ufsgmem", "mount", "/nonexistent", "--max-memory", "lots"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not a size" in out.stderr, out.stderr
    with mounted(max_memory=MiB) as mount:
        mount.ctl(f"create c size={4 * MiB} flags=mmap|init_shared")
        fd = os.open(os.path.join(mount.path, "c", "ctl"), os.O_RDWR)
        try:
            with pytest.raises(OSError):
                os.write(fd, f"allocate offset=0 size={2 * MiB:#x}".encode())
            reason = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        assert "ENOMEM" in reason and "--max-memory" in reason and "0 of 1M committed" in reason, reason


def test_a_preallocating_create_past_the_cap_takes_no_huge_page(hugepages):
    """hugetlb preallocates at create: past the cap the create is ENOMEM *before* it asks the pool (the
    pool holds 8 MiB here, so a create that tried would fail for the pool, and say so), and one that fits
    is charged in full at once."""
    with hugepages(2 * MiB, 4), mounted(max_memory=8 * MiB) as mount:
        fd = os.open(os.path.join(mount.path, "ctl"), os.O_RDWR)
        try:
            with pytest.raises(OSError) as info:
                os.write(fd, f"create big size={16 * MiB} flags=mmap backend=hugetlb page_size=2M".encode())
            reason = os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        assert info.value.errno == errno.ENOMEM and "--max-memory" in reason, reason
        mount.ctl(f"create fits size={8 * MiB} flags=mmap backend=hugetlb page_size=2M")
        st = Gmem(mount, "fits", 8 * MiB).status()
        assert st["committed_bytes"] == 8 * MiB and st["mount_memory"]["committed"] == 8 * MiB
        mount.ctl("destroy fits")


def test_a_huge_folio_is_committed_whole(gmem, hugepages):
    """The budget counts folios: one byte read from a punched 2 MiB hugetlb folio commits the whole folio
    (its write-back will take a whole huge page), while nothing is allocated until that write-back."""
    with hugepages(2 * MiB, 4):
        g = gmem(8 * MiB, flags="mmap", backend="hugetlb", page_size="2M")
        g.convert(0, g.size, private=False)
        g.request(f"punch_hole offset={2 * MiB:#x} size={2 * MiB:#x}")
        assert g.status()["committed_bytes"] == 6 * MiB
        fd = os.open(g.path("mem"), os.O_RDWR)
        try:
            with mmap.mmap(fd, g.size) as m:
                m.madvise(mmap.MADV_RANDOM)  # no readahead: exactly one page is filled
                assert m[3 * MiB] == 0
                st = g.status()
                assert st["allocated_bytes"] == 6 * MiB and st["committed_bytes"] == 8 * MiB, st
                m[3 * MiB] = 1
                assert g.guest_read(3 * MiB, 1) == b"\x01"  # written back: the huge page comes back whole
                st = g.status()
                assert st["allocated_bytes"] == 8 * MiB and st["committed_bytes"] == 8 * MiB, st
        finally:
            os.close(fd)
            g.mount.ctl(f"destroy {g.name}")  # its huge pages go back before the pool shrinks


def test_a_pin_is_charged_like_allocate():
    """Issue 17, finding 3: under an 8 MiB cap, ``pin`` of 512 MiB succeeded and committed it all while the
    mount's count stayed 0; after unpin and a punch the count was -512 MiB, and the cap stopped working.
    A pin allocates what it faults in, so it is charged like ``allocate``: past the cap ENOMEM with the
    reason and nothing changed (no pin, no allocation); within it the count follows, and goes back to 0."""
    cap = 8 * MiB
    with mounted(max_memory=cap) as mount:
        mount.ctl(f"create vm size={512 * MiB} flags=mmap|init_shared")
        g = Gmem(mount, "vm", 512 * MiB)
        exc = refused(lambda: g.request(f"pin offset=0 size={512 * MiB:#x}"))
        assert exc.errno == errno.ENOMEM, exc
        st = g.status()
        assert (st["allocated_bytes"], st["pinned_bytes"], st["committed_bytes"]) == (0, 0, 0), st
        assert st["mount_memory"] == {"max": cap, "committed": 0}

        g.request(f"pin offset=0 size={4 * MiB:#x}")
        st = g.status()
        assert st["allocated_bytes"] == st["committed_bytes"] == 4 * MiB and st["pinned_bytes"] == 4 * MiB, st
        assert st["mount_memory"]["committed"] == 4 * MiB
        assert refused(lambda: g.request(f"pin offset={4 * MiB:#x} size={8 * MiB:#x}")).errno == errno.ENOMEM
        assert refused(lambda: g.request(f"allocate offset={8 * MiB:#x} size={8 * MiB:#x}")).errno == errno.ENOMEM

        g.request(f"unpin offset=0 size={4 * MiB:#x}")
        g.request(f"punch_hole offset=0 size={512 * MiB:#x}")
        st = g.status()
        assert st["committed_bytes"] == 0 and st["mount_memory"] == {"max": cap, "committed": 0}, st
        # and the cap still holds
        assert refused(lambda: g.request(f"allocate offset=0 size={16 * MiB:#x}")).errno == errno.ENOMEM
        g.request(f"allocate offset=0 size={cap:#x}")
