"""The conversion path of the FUSE frontend without the kernel: ``Files`` over a real core, with an
invalidator that records (or fails) instead of talking to /dev/fuse. What the kernel does is covered by
the mount tests; these pin down the frontend's own rules, each of which a mount test could only catch by luck:

* fail closed: a revocation that fails leaves the attribute as it was and its pages still "possibly
  mapped", so the next conversion revokes them again (a private page must never stay mapped);
* a page-cache fill marks its pages before it answers, so a conversion that starts meanwhile revokes them;
* while a shared→private conversion revokes, fills of the range fail and write-backs are kept;
* the ioctl's replies: the struct is copied back only where the kernel copies it (EAGAIN), and the
  refusals (other commands, 32-bit callers, read-only fds, in-place conversion off) come first.
"""

from __future__ import annotations

import errno
import struct

import pytest

from ufsgmem import protocol
from ufsgmem.address import Range
from ufsgmem.fuse.files import Files
from ufsgmem.gmem import PRIVATE, SHARED, GuestMemfd
from ufsgmem.uapi import (
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP, KVM_MEMORY_ATTRIBUTES2_STRUCT, KVM_SET_MEMORY_ATTRIBUTES2,
)

PS = 4096


class RecordingInvalidator:
    """Records each revocation; ``fail`` makes the next one raise; ``during`` runs inside it (as requests
    other loop threads serve while a real revocation blocks)."""

    def __init__(self):
        self.calls: list[tuple[Range, ...]] = []
        self.fail: OSError | None = None
        self.during = None

    def revoke(self, ino, ranges, fd=None):
        self.calls.append(tuple(ranges))
        if self.during is not None:
            self.during()
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc


@pytest.fixture
def setup():
    revoker = RecordingInvalidator()
    files = Files(revoker)
    entry = files.ns.add("f", GuestMemfd(8 * PS, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED))
    yield files, entry, revoker
    entry.gm.close()


def convert(files, entry, offset, size, attributes):
    files.set_memory_attributes(entry, protocol.FileRequest("set_memory_attributes", offset, size, attributes))


def fill(files, entry, offset, size=PS):
    return bytes(files.mem_read(entry, offset, size, read_syscall=False))


def test_a_failed_revocation_changes_nothing_and_is_revoked_again(setup):
    files, entry, revoker = setup
    fill(files, entry, 0, 2 * PS)  # mapped somewhere: pages 0-1 may be cached
    revoker.fail = OSError(errno.EMFILE, "no descriptor left")
    with pytest.raises(OSError) as exc:
        convert(files, entry, 0, 2 * PS, PRIVATE)
    assert exc.value.errno == errno.EMFILE
    assert entry.gm.get_attributes() == [(0, 8 * PS, SHARED)], "the attribute changed although revocation failed"
    assert entry.gm.pending is None
    convert(files, entry, 0, 2 * PS, PRIVATE)
    assert revoker.calls == [(Range(0, 2 * PS),)] * 2, "the second conversion skipped the pages still mapped"
    assert entry.gm.attribute_at(0) == PRIVATE


def test_an_unmapped_range_costs_no_revocation(setup):
    files, entry, revoker = setup
    convert(files, entry, 4 * PS, PS, PRIVATE)
    assert revoker.calls == []


def test_a_fill_is_marked_before_it_answers(setup):
    """The page a READ hands out is in the next conversion's revocation, whatever the order of threads."""
    files, entry, revoker = setup
    fill(files, entry, 3 * PS)
    convert(files, entry, 2 * PS, 2 * PS, PRIVATE)
    assert revoker.calls == [(Range(3 * PS, 4 * PS),)]


def test_while_revoking_fills_fail_and_write_backs_are_kept(setup):
    files, entry, revoker = setup
    fill(files, entry, 0)
    seen = {}

    def requests_meanwhile():
        with pytest.raises(OSError) as exc:
            fill(files, entry, 0)
        seen["fill"] = exc.value.errno
        seen["write-back"] = files.mem_write(entry, 0, b"\x5a" * PS, writepage=True)
        seen["neighbour"] = fill(files, entry, PS)[:1]

    revoker.during = requests_meanwhile
    convert(files, entry, 0, PS, PRIVATE)
    assert seen == {"fill": errno.EIO, "write-back": PS, "neighbour": b"\0"}
    assert bytes(entry.gm.guest_read(0, PS)) == b"\x5a" * PS, "the dirty page written back during revocation was lost"


def test_read_and_write_syscalls_are_einval(setup):
    files, entry, _ = setup
    for call in (lambda: files.mem_read(entry, 0, PS, read_syscall=True),
                 lambda: files.mem_write(entry, 0, b"x", writepage=False)):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EINVAL


def attrs2(offset, size, attributes, flags=0, error_offset=0x1230000, reserved=(0,) * 11) -> bytes:
    return KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, attributes, flags, error_offset, *reserved)


def ioctl(files, entry, arg, cmd=KVM_SET_MEMORY_ATTRIBUTES2, compat=False, writable=True):
    try:
        return files.ioctl(entry, cmd, arg, compat=compat, writable=writable)
    except OSError as exc:
        return exc.errno


def test_ioctl_copies_the_struct_back_only_on_eagain(setup):
    files, entry, _ = setup
    assert ioctl(files, entry, attrs2(0, PS, PRIVATE)) == (0, b""), "success copies nothing back"
    assert ioctl(files, entry, attrs2(0, PS, PRIVATE, flags=1)) == errno.EINVAL, "argument errors copy nothing"
    with entry.state:
        entry.gm.pin(3 * PS, PS)
    result, out = ioctl(files, entry, attrs2(0, 8 * PS, PRIVATE))
    assert result == -errno.EAGAIN
    assert struct.unpack_from("<Q", out, protocol.ERROR_OFFSET_AT)[0] == 3 * PS
    assert out[:protocol.ERROR_OFFSET_AT] == attrs2(0, 8 * PS, PRIVATE)[:protocol.ERROR_OFFSET_AT]


@pytest.mark.parametrize("case, expected", [
    (dict(cmd=0xC080AED3), errno.ENOTTY),
    (dict(compat=True), errno.ENOTTY),  # v8 has no compat_ioctl
    (dict(writable=False), errno.EBADF),
])
def test_ioctl_refusals_come_first_and_change_nothing(setup, case, expected):
    files, entry, _ = setup
    assert ioctl(files, entry, attrs2(0, PS, PRIVATE), **case) == expected
    assert entry.gm.attribute_at(0) == SHARED


def test_without_in_place_conversion_every_form_is_enotty(setup):
    files, entry, _ = setup
    entry.in_place_conversion = False
    assert ioctl(files, entry, attrs2(0, PS, PRIVATE)) == errno.ENOTTY
    _, error = files.file_request(entry, b"set_memory_attributes offset=0 size=4K attributes=private")
    assert error.errno == errno.ENOTTY
    assert entry.gm.attribute_at(0) == SHARED
