"""ufsgmem.client over a real mount: create/destroy, conversions, pins, punch, guest view, numpy views,
and errors carrying the kernel's errno and error_offset."""

from __future__ import annotations

import errno
import itertools
import signal

import numpy as np
import pytest

from clientfix import child_touch, mounted
from ufsgmem.client import Mount
from ufsgmem.protocol import parse_flags, parse_runs, Result
from ufsgmem.errors import GuestMemfdError
from ufsgmem.snapshot import Snapshot
from ufsgmem.uapi import GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTE_PRIVATE

pytestmark = pytest.mark.fuse

PAGE = 4096
MMAP_SHARED = GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED
_names = (f"c{i}" for i in itertools.count())


@pytest.fixture(scope="module")
def mount(tmp_path_factory):
    with mounted(str(tmp_path_factory.mktemp("client") / "mnt")) as mnt, Mount(mnt) as m:
        yield m


@pytest.fixture
def gmem(mount):
    """A fresh 16-page MMAP|INIT_SHARED file per test, destroyed afterwards."""
    name = next(_names)
    f = mount.create(name, 16 * PAGE, MMAP_SHARED)
    yield f
    f.close()
    mount.destroy(name)


# --- unit parts (no mount) ------------------------------------------------------------------------------
def test_parse_flags_accepts_names_and_numbers():
    assert parse_flags("mmap,init_shared") == parse_flags("mmap|init_shared") == parse_flags("0x3") == 3
    assert parse_flags(None) == parse_flags("0") == 0
    with pytest.raises(ValueError, match="unknown flag"):
        parse_flags("mmap,bogus")


def test_result_text_is_parsed():
    r = Result.parse("error EAGAIN error_offset=0x3000 -- page 0x3000 is pinned; size=2 unpin it\n")
    assert not r.ok and r.fields == {"errno": "EAGAIN", "error_offset": "0x3000"}
    assert r.int("error_offset") == 0x3000 and r.message == "page 0x3000 is pinned; size=2 unpin it"
    assert parse_runs("ok 0x0+0x1000=private 0x1000+0x2000=shared\n") == [(0, 0x1000, 8), (0x1000, 0x2000, 0)]


# --- create / destroy -----------------------------------------------------------------------------------
def test_create_shows_files_and_status(mount, gmem):
    assert gmem.name in mount.names()
    st = gmem.status()
    assert (st["size"], st["flags"], st["folio_size"], st["page_size"]) == (16 * PAGE, MMAP_SHARED, PAGE, PAGE)
    assert st["private_bytes"] == 0 and st["shared_bytes"] == 16 * PAGE
    assert gmem.size == 16 * PAGE


@pytest.mark.parametrize("size, flags, why", [
    (0, 0, "size 0"), (PAGE - 1, 0, "unaligned size"), (PAGE + 1, 0, "unaligned size"),
    (PAGE, 1 << 2, "unknown flag bit"), (PAGE, 1 << 63, "unknown flag bit"),
])
def test_create_rejects_what_the_kernel_rejects(mount, size, flags, why):
    with pytest.raises(OSError) as exc:
        mount.create("bad", size, flags)
    assert exc.value.errno == errno.EINVAL, why
    assert "bad" not in mount.names(), "a refused create must leave nothing behind"


def test_create_existing_name_is_eexist(mount, gmem):
    with pytest.raises(OSError) as exc:
        mount.create(gmem.name, PAGE, 0)
    assert exc.value.errno == errno.EEXIST


def test_create_name_too_long_is_einval(mount):
    with pytest.raises(GuestMemfdError) as exc:
        mount.create("n" * 65, PAGE, 0)
    assert exc.value.errno == errno.EINVAL


def test_destroy_missing_is_enoent(mount):
    with pytest.raises(OSError) as exc:
        mount.destroy("no-such-file")
    assert exc.value.errno == errno.ENOENT


def test_destroy_removes_the_name(mount):
    f = mount.create("gone", PAGE, MMAP_SHARED)
    f.close()
    mount.destroy("gone")
    assert "gone" not in mount.names()


# --- mappings and numpy views ---------------------------------------------------------------------------
def test_numpy_view_is_coherent_with_the_guest(gmem):
    with gmem.map() as m:
        a = m.array()
        a[:PAGE] = 0x5A
        assert gmem.guest_read(0, 4) == b"\x5a" * 4, "a host write must be seen by a guest read"
        gmem.guest_write(PAGE, b"\xc3" * PAGE)
        assert (a[PAGE:2 * PAGE] == 0xC3).all(), "a guest write must be seen by a mapping that exists"
        u64 = m.array(np.uint64, offset=PAGE, count=2)
        assert u64[0] == 0xC3C3C3C3C3C3C3C3
        del a, u64


def test_closing_a_mapping_with_a_live_view_is_refused(gmem):
    m = gmem.map()
    a = m.array()
    with pytest.raises(BufferError, match="drop it"):
        m.close()
    del a
    m.close()


def test_map_without_mmap_flag_is_enodev(mount):
    f = mount.create("nommap", PAGE, GUEST_MEMFD_FLAG_INIT_SHARED)
    try:
        with pytest.raises(OSError) as exc:
            f.map()
        assert exc.value.errno == errno.ENODEV
    finally:
        f.close()
        mount.destroy("nommap")


# --- conversion -----------------------------------------------------------------------------------------
def test_convert_revokes_and_preserves_content(gmem):
    with gmem.map() as m:
        a = m.array()
        a[:] = np.repeat(np.arange(16, dtype=np.uint8) + 1, PAGE)
        gmem.convert(PAGE, PAGE, to="private")
        assert child_touch(a, PAGE) == signal.SIGBUS, "a host read of a private page must raise SIGBUS"
        assert child_touch(a, PAGE, write=True) == signal.SIGBUS, "so must a host write"
        assert child_touch(a, 0) is None and child_touch(a, 2 * PAGE) is None, \
            "the shared neighbours of a private page stay accessible"
        assert gmem.guest_read(PAGE, 2) == b"\x02\x02", "the guest sees the private page's content"
        assert gmem.get_attributes() == [(0, PAGE, 0), (PAGE, PAGE, KVM_MEMORY_ATTRIBUTE_PRIVATE),
                                         (2 * PAGE, 14 * PAGE, 0)]
        gmem.convert(PAGE, PAGE, to="shared")
        assert (a[PAGE:2 * PAGE] == 2).all(), "content survives private -> shared"
        del a


def test_noop_conversion_succeeds_even_when_pinned(gmem):
    gmem.pin(0, PAGE)
    try:
        gmem.convert(0, PAGE, to="shared")
    finally:
        gmem.unpin(0, PAGE)


def test_pin_gives_eagain_with_error_offset(gmem):
    gmem.pin(5 * PAGE, 2 * PAGE)
    with pytest.raises(GuestMemfdError) as exc:
        gmem.convert(0, 8 * PAGE, to="private")
    assert exc.value.errno == errno.EAGAIN
    assert exc.value.error_offset == 5 * PAGE, "error_offset names the first pinned page"
    assert gmem.status()["private_bytes"] == 0, "a refused conversion changes nothing"
    gmem.unpin(5 * PAGE, 2 * PAGE)
    gmem.convert(0, 8 * PAGE, to="private")
    assert gmem.status()["private_bytes"] == 8 * PAGE


@pytest.mark.parametrize("offset, size, attributes, flags, why", [
    (1, PAGE, 8, 0, "unaligned offset"), (0, PAGE + 1, 8, 0, "unaligned size"), (0, 0, 8, 0, "empty range"),
    (0, 17 * PAGE, 8, 0, "past EOF"), (16 * PAGE, PAGE, 8, 0, "offset at EOF"), (0, PAGE, 1, 0, "unknown attribute"),
    (0, PAGE, 8, 1, "flags must be 0"), ((1 << 64) - PAGE, 2 * PAGE, 8, 0, "wrapping range"),
])
def test_bad_conversions_are_einval_and_change_nothing(gmem, offset, size, attributes, flags, why):
    with pytest.raises(GuestMemfdError) as exc:
        gmem.set_memory_attributes(offset, size, attributes, flags)
    assert exc.value.errno == errno.EINVAL, why
    assert exc.value.error_offset is None, "EINVAL carries no error_offset"
    assert gmem.get_attributes() == [(0, 16 * PAGE, 0)]


# --- fallocate ------------------------------------------------------------------------------------------
def test_punch_hole_zeroes_and_keeps_the_attribute(gmem):
    with gmem.map() as m:
        a = m.array()
        a[:] = 0x77
        gmem.punch_hole(2 * PAGE, PAGE)
        assert (a[2 * PAGE:3 * PAGE] == 0).all() and (a[3 * PAGE:4 * PAGE] == 0x77).all()
        del a
    assert gmem.get_attributes() == [(0, 16 * PAGE, 0)]


def test_allocate_past_eof_is_einval(gmem):
    gmem.allocate(0, 16 * PAGE)
    with pytest.raises(GuestMemfdError) as exc:
        gmem.allocate(8 * PAGE, 9 * PAGE)
    assert exc.value.errno == errno.EINVAL


def test_unaligned_punch_is_einval(gmem):
    with pytest.raises(GuestMemfdError) as exc:
        gmem.punch_hole(1, PAGE)
    assert exc.value.errno == errno.EINVAL


# --- snapshot -------------------------------------------------------------------------------------------
def test_snapshot_follows_the_attributes(gmem):
    gmem.convert(4 * PAGE, 4 * PAGE, to="private")
    snap = gmem.snapshot()
    assert isinstance(snap, Snapshot) and snap.size == 16 * PAGE
    assert list(snap.attr_runs()) == [(0, 4 * PAGE, False), (4 * PAGE, 8 * PAGE, True), (8 * PAGE, 16 * PAGE, False)]


# --- binary create and huge pages -----------------------------------------------------------------------
def test_binary_create_request_and_read_back(mount):
    import os
    from ufsgmem.protocol import create_request
    raw = create_request("bin0", 8 * PAGE, MMAP_SHARED, "anon", 0)
    assert len(raw) == 168 and raw[:4] == b"UGM1"
    fd = os.open(f"{mount.path}/ctl", os.O_RDWR)
    try:
        assert os.write(fd, raw) == len(raw), "one write is one request"
        assert os.read(fd, 4096) == raw, "the read-back of a create is the request, byte for byte"
        with pytest.raises(OSError) as exc:
            os.write(fd, raw)
        assert exc.value.errno == errno.EEXIST
    finally:
        os.close(fd)
    f = mount.open("bin0")
    assert (f.status()["size"], f.status()["flags"]) == (8 * PAGE, MMAP_SHARED)
    f.close()
    mount.destroy("bin0")


def test_unknown_backend_message_lists_the_available_ones(mount):
    with pytest.raises(GuestMemfdError) as exc:
        mount.create("nb", PAGE, 0, backend="nope")
    assert exc.value.errno == errno.EINVAL and "available:" in str(exc.value) and "anon" in str(exc.value)


def test_hugetlb_file_through_the_client(mount, hugepages):
    SZ_2M = 2 << 20
    with pytest.raises(GuestMemfdError) as exc:
        mount.create("huge", 4 * SZ_2M, MMAP_SHARED, backend="hugetlb", page_size="2M")
    assert exc.value.errno == errno.EINVAL, "huge-page files start private: init_shared is refused"
    with hugepages(SZ_2M, 4):
        f = mount.create("huge", 4 * SZ_2M, GUEST_MEMFD_FLAG_MMAP, backend="hugetlb", page_size="2M")
        try:
            st = f.status()
            assert (st["backend"], st["page_size"], st["private_bytes"]) == ("hugetlb", SZ_2M, 4 * SZ_2M)
            f.convert(0, SZ_2M + PAGE, to="shared")
            with f.map(0, 2 * SZ_2M) as m:
                a = m.array()
                a[:SZ_2M + PAGE] = 9
                assert child_touch(a, SZ_2M + PAGE) == signal.SIGBUS
                del a
            assert f.status()["huge_folios"] == {"whole": 2, "split": 2}
        finally:
            f.close()
            mount.destroy("huge")


def test_hugetlb_pool_too_small_is_enomem_naming_the_shortfall(mount):
    with pytest.raises(GuestMemfdError) as exc:
        mount.create("toobig", 1 << 40, GUEST_MEMFD_FLAG_MMAP, backend="hugetlb", page_size="1G")
    assert exc.value.errno == errno.ENOMEM and "short by" in str(exc.value)


def test_a_failed_request_with_no_result_to_read_raises_its_errno():
    """The write fails (EPIPE: nobody reads the pipe) and there is no result to read back (the descriptor is
    write-only): the caller gets the write's errno, not an error of the client's own making."""
    import os

    from ufsgmem.client import text_request

    r, w = os.pipe()
    os.close(r)
    try:
        with pytest.raises(GuestMemfdError) as caught:
            text_request(w, "get_attributes")
        assert caught.value.errno == errno.EPIPE
    finally:
        os.close(w)
