"""The control protocol's parser and formatter on their own (pure functions, no mount)."""

from __future__ import annotations

import errno
import struct

import pytest

from ufsgmem import protocol
from ufsgmem.errors import fail
from ufsgmem.uapi import KVM_CREATE_GUEST_MEMFD, KVM_CREATE_GUEST_MEMFD_STRUCT, KVM_MEMORY_ATTRIBUTES2_STRUCT


def test_text_requests():
    req = protocol.parse_file_request(b"set_memory_attributes offset=4K size=0x2000 attributes=private\n")
    assert (req.op, req.offset, req.size, req.attributes, req.flags) == ("set_memory_attributes", 4096, 8192, 8, 0)
    assert protocol.parse_file_request(b"set_memory_attributes offset=0 size=4K attributes=0").attributes == 0
    assert protocol.parse_file_request(b"get_attributes").size is None
    create = protocol.parse_mount_request(b"create vm size=1G flags=mmap|init_shared backend=hugetlb page_size=2M")
    assert (create.name, create.size, create.flags, create.backend, create.page_size) == \
        ("vm", 1 << 30, 3, "hugetlb", 2 << 20)
    assert protocol.parse_mount_request(b"create vm size=4K flags=0x1").flags == 1
    assert protocol.parse_mount_request(b"destroy vm").name == "vm"


def test_binary_create_page_orders():
    def raw(order):
        return struct.pack("<4sI", b"UGM1", KVM_CREATE_GUEST_MEMFD) + \
            KVM_CREATE_GUEST_MEMFD_STRUCT.pack(4 << 20, 1, order, 0, 0, 0, 0, 0) + b"vm".ljust(64, b"\0") + \
            b"hugetlb".ljust(32, b"\0")
    assert protocol.parse_mount_request(raw(0)).page_size is None
    assert protocol.parse_mount_request(raw(9)).page_size == 2 << 20
    assert protocol.parse_mount_request(raw(18)).page_size == 1 << 30
    assert protocol.parse_mount_request(raw(9)).backend == "hugetlb"
    assert [protocol.page_order(p) for p in (None, 2 << 20, 1 << 30)] == [0, 9, 18]
    with pytest.raises(OSError) as info:
        protocol.parse_mount_request(raw(12))
    assert info.value.errno == errno.EINVAL


def test_results():
    req = protocol.parse_file_request(b"get_attributes")
    assert protocol.ok_result(req, protocol.format_runs([(0, 4096, 0), (4096, 8192, 8)])) == \
        b"ok 0x0+0x1000=shared 0x1000+0x2000=private\n"
    text = protocol.error_result(req, fail(errno.EAGAIN, "pinned", error_offset=0x3000))
    assert text == b"error EAGAIN error_offset=0x3000 -- pinned\n"
    raw = b"UGM1" + struct.pack("<I", 0xC080AED2) + KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(0, 8192, 8, 0, 0, *[0] * 11)
    breq = protocol.parse_file_request(raw)
    out = protocol.error_result(breq, fail(errno.EAGAIN, "pinned", error_offset=0x1000))
    assert len(out) == 136 and KVM_MEMORY_ATTRIBUTES2_STRUCT.unpack_from(out, 8)[4] == 0x1000
    assert protocol.ok_result(breq) == raw, "on success the struct comes back unchanged"


@pytest.mark.parametrize("data", [b"create vm size=4K\nfoo", b"create vm\tsize=4K\x00", b"create v/m size=4K",
                                  b"create vm size=4K size=8K", b"create vm size=", b"create =4K vm"])
def test_malformed_text_is_einval(data):
    with pytest.raises(OSError) as info:
        protocol.parse_mount_request(data)
    assert info.value.errno == errno.EINVAL


def test_names_are_capped_at_63_bytes_in_both_forms():
    """The binary name field is 64 NUL-padded bytes, so a name keeps room for its NUL: 63 bytes at most."""
    name = "n" * 63
    assert protocol.parse_mount_request(f"create {name} size=4K".encode()).name == name
    assert protocol.parse_mount_request(protocol.create_request(name, 4096)).name == name
    too_long = name + "n"
    raw = protocol.create_request(name, 4096).replace(name.encode() + b"\0", too_long.encode())
    for data in (f"create {too_long} size=4K".encode(), f"destroy {too_long}".encode(), raw):
        with pytest.raises(OSError) as info:
            protocol.parse_mount_request(data)
        assert info.value.errno == errno.EINVAL and "longer than 63" in str(info.value), data[:80]
    with pytest.raises(OSError) as info:
        protocol.create_request(too_long, 4096)
    assert info.value.errno == errno.EINVAL
