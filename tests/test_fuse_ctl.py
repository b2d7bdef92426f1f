"""Control files through a real mount: text and binary forms, errnos as write results, read-back, bad
input that must change nothing, and lifetimes (memory freed after destroy once the last user is gone)."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess

import pytest

from fusefix import memfds, requires_fuse, wait_freed
from ufsgmem.uapi import (
    KVM_CREATE_GUEST_MEMFD, KVM_CREATE_GUEST_MEMFD_STRUCT, KVM_MEMORY_ATTRIBUTES2_STRUCT,
    KVM_SET_MEMORY_ATTRIBUTES2,
)

pytestmark = [requires_fuse, pytest.mark.fuse]
PS = 4096


def attrs2(offset=0, size=PS, attributes=8, flags=0, error_offset=0, reserved=(0,) * 11, cmd=None,
           magic=b"UGM1") -> bytes:
    return struct.pack("<4sI", magic, KVM_SET_MEMORY_ATTRIBUTES2 if cmd is None else cmd) + \
        KVM_MEMORY_ATTRIBUTES2_STRUCT.pack(offset, size, attributes, flags, error_offset, *reserved)


def create_bin(name: bytes, size: int, flags: int = 3, page_order: int = 0, backend: bytes = b"",
               reserved=(0,) * 5) -> bytes:
    return struct.pack("<4sI", b"UGM1", KVM_CREATE_GUEST_MEMFD) + \
        KVM_CREATE_GUEST_MEMFD_STRUCT.pack(size, flags, page_order, *reserved) + \
        name.ljust(64, b"\0") + backend.ljust(32, b"\0")


def write_read(path: str, data: bytes) -> tuple[int | None, bytes]:
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            os.write(fd, data)
            err = None
        except OSError as exc:
            err = exc.errno
        return err, os.read(fd, 4096)
    finally:
        os.close(fd)


def state(g) -> tuple:
    s = g.status()
    return (g.request("get_attributes"), s["pinned_bytes"], s["allocated_bytes"], s["punches"],
            s["conversions"]["to_private"], s["conversions"]["to_shared"])


def test_echo_from_a_shell(fuse_mount):
    ctl = os.path.join(fuse_mount.path, "ctl")
    subprocess.run(["sh", "-c", f"echo 'create shellvm size=64K flags=mmap|init_shared' > {ctl}"], check=True)
    vm = os.path.join(fuse_mount.path, "shellvm")
    subprocess.run(["sh", "-c", f"echo set_memory_attributes offset=0x1000 size=4K attributes=private "
                                f"> {vm}/ctl"], check=True)
    with open(f"{vm}/status") as f:
        assert json.load(f)["private_bytes"] == PS
    # /bin/echo, because dash's builtin echo reports every write error as "I/O error"
    bad = subprocess.run(["sh", "-c", f"/bin/echo bogus > {vm}/ctl"], capture_output=True)
    assert bad.returncode != 0 and b"Invalid argument" in bad.stderr
    subprocess.run(["sh", "-c", f"echo destroy shellvm > {ctl}"], check=True)
    assert not os.path.exists(vm)


def test_read_back_text(gmem):
    g = gmem(4 * PS)
    err, out = write_read(g.path("ctl"), b"set_memory_attributes offset=0x1000 size=0x2000 attributes=private\n")
    assert err is None and out == b"ok\n"
    err, out = write_read(g.path("ctl"), b"get_attributes")
    assert out == b"ok 0x0+0x1000=shared 0x1000+0x2000=private 0x3000+0x1000=shared\n"
    err, out = write_read(g.path("ctl"), b"get_attributes offset=0x1000 size=0x1000")
    assert out == b"ok 0x1000+0x1000=private\n"
    err, out = write_read(g.path("ctl"), b"set_memory_attributes offset=0x1001 size=0x1000 attributes=private")
    assert err == errno.EINVAL and out.startswith(b"error EINVAL -- ")


def test_binary_set_memory_attributes(gmem):
    g = gmem(4 * PS)
    err, out = write_read(g.path("ctl"), attrs2(PS, 2 * PS, 8))
    assert err is None and out == attrs2(PS, 2 * PS, 8)
    assert g.request("get_attributes") == b"ok 0x0+0x1000=shared 0x1000+0x2000=private 0x3000+0x1000=shared\n"
    g.request(f"pin offset=0 size={PS}")
    err, out = write_read(g.path("ctl"), attrs2(0, 4 * PS, 8))
    assert err == errno.EAGAIN
    assert KVM_MEMORY_ATTRIBUTES2_STRUCT.unpack_from(out, 8)[4] == 0, "error_offset of the pinned page 0"
    g.request(f"unpin offset=0 size={PS}")
    g.request(f"pin offset={3 * PS} size={PS}")
    err, out = write_read(g.path("ctl"), attrs2(0, 4 * PS, 8))
    assert err == errno.EAGAIN and KVM_MEMORY_ATTRIBUTES2_STRUCT.unpack_from(out, 8)[4] == 3 * PS


def test_binary_create_with_page_order(fuse_mount):
    ctl = os.path.join(fuse_mount.path, "ctl")
    err, out = write_read(ctl, create_bin(b"binvm", 1 << 20, flags=3))
    assert err is None and out == create_bin(b"binvm", 1 << 20, flags=3)
    with open(os.path.join(fuse_mount.path, "binvm", "status")) as f:
        st = json.load(f)
    assert (st["size"], st["flags"], st["page_size"]) == (1 << 20, 3, PS)
    fuse_mount.ctl("destroy binvm")
    # page_order 9 asks for 2 MiB pages: anon has none, so the core refuses it (EINVAL), nothing created
    err, _ = write_read(ctl, create_bin(b"hugevm", 4 << 20, flags=1, page_order=9))
    assert err == errno.EINVAL and not os.path.exists(os.path.join(fuse_mount.path, "hugevm"))


# (An empty write never reaches the server: the kernel returns 0 for it.)
BAD_FILE_REQUESTS = [
    (b"\n", errno.EINVAL),
    (b"frobnicate offset=0 size=4096", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4096", errno.EINVAL),  # no attributes
    (b"set_memory_attributes offset=0 size=4096 attributes=purple", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4096 attributes=4", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4096 attributes=private flags=1", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=0 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=1 size=4096 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4097 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=0x4000 size=4096 attributes=private", errno.EINVAL),  # past EOF
    (b"set_memory_attributes offset=0 size=0x100000000000000000 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=0xfffffffffffff000 size=0x2000 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=-4096 size=4096 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=zero size=4096 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=0 offset=0 size=4096 attributes=private", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4096 attributes=private extra=1", errno.EINVAL),
    (b"set_memory_attributes offset=0 size=4096 attributes=private\nget_attributes", errno.EINVAL),
    (b"allocate offset=0 size=4096 junk", errno.EINVAL),
    (b"allocate offset=0 size=8192000", errno.EINVAL),
    (b"punch_hole offset=1 size=4096", errno.EINVAL),
    (b"pin offset=0 size=0", errno.EINVAL),
    (b"unpin offset=0x2000 size=4096", errno.EINVAL),  # not pinned
    (b"get_attributes offset=0", errno.EINVAL),
    (b"\xff\xfe set_memory_attributes", errno.EINVAL),
    (b"x" * 5000, errno.EINVAL),
    # binary
    (b"UGM1", errno.EINVAL),  # short header
    (attrs2()[:-1], errno.EINVAL),  # short struct
    (attrs2() + b"\0", errno.EINVAL),  # long struct
    (attrs2(cmd=0x4020AED2), errno.ENOTTY),  # the VM ioctl, not the gmem one
    (attrs2(cmd=0xDEADBEEF), errno.ENOTTY),
    (attrs2(magic=b"UGM2"), errno.EINVAL),  # not the magic: parsed as text, which it is not
    (attrs2(flags=1), errno.EINVAL),
    (attrs2(reserved=(0,) * 10 + (1,)), errno.EINVAL),
    (attrs2(attributes=1 << 63), errno.EINVAL),
    (attrs2(size=0), errno.EINVAL),
    (attrs2(offset=PS + 1), errno.EINVAL),
    (attrs2(offset=(1 << 64) - PS, size=2 * PS), errno.EINVAL),
    (attrs2(offset=4 * PS), errno.EINVAL),
]


def test_bad_file_requests_change_nothing(gmem):
    g = gmem(4 * PS)
    g.convert(PS, PS, private=True)
    g.request(f"pin offset=0 size={PS}")
    before = state(g)
    for data, expected in BAD_FILE_REQUESTS:
        err, out = write_read(g.path("ctl"), data)
        assert err == expected, f"{data[:80]!r}: errno {err}, want {expected}"
        assert state(g) == before, f"{data[:80]!r} changed the state"
        if not data.startswith(b"UGM1"):
            assert out.startswith(b"error " + errno.errorcode[expected].encode()), out


BAD_MOUNT_REQUESTS = [
    (b"create", errno.EINVAL),
    (b"create vm", errno.EINVAL),  # no size
    (b"create vm size=0", errno.EINVAL),
    (b"create vm size=4097", errno.EINVAL),
    (b"create vm size=4K flags=4", errno.EINVAL),
    (b"create vm size=4K flags=mmap|bogus", errno.EINVAL),
    (b"create vm size=4K backend=nosuch", errno.EINVAL),
    (b"create vm size=4K page_size=3M", errno.EINVAL),
    (b"create ../etc size=4K", errno.EINVAL),
    (b"create ctl size=4K", errno.EINVAL),
    (b"create .hidden size=4K", errno.EINVAL),
    (b"create vm size=4K extra", errno.EINVAL),
    (b"create vm size=99999999999999999999999", errno.EINVAL),
    (b"destroy", errno.EINVAL),
    (b"destroy nosuch", errno.ENOENT),
    (b"explode vm", errno.EINVAL),
    (create_bin(b"vm", 0), errno.EINVAL),
    (create_bin(b"vm", PS, flags=1 << 5), errno.EINVAL),
    (create_bin(b"vm", PS, page_order=7), errno.EINVAL),
    (create_bin(b"vm", PS, reserved=(0, 0, 0, 0, 1)), errno.EINVAL),
    (create_bin(b"vm\0junk", PS), errno.EINVAL),
    (create_bin(b"", PS), errno.EINVAL),
    (b"create " + b"n" * 64 + b" size=4K", errno.EINVAL),  # 63 bytes at most: the binary field keeps its NUL
    (create_bin(b"n" * 64, PS), errno.EINVAL),
    (create_bin(b"vm", PS)[:-1], errno.EINVAL),
    (create_bin(b"vm", PS)[:8] + b"\0" * 10, errno.EINVAL),
    (b"UGM1" + struct.pack("<I", 0xC080AED2) + bytes(128), errno.ENOTTY),  # a file request on the mount ctl
]


def test_bad_mount_requests_change_nothing(fuse_mount, gmem):
    gmem(PS)
    ctl = os.path.join(fuse_mount.path, "ctl")
    before = sorted(os.listdir(fuse_mount.path))
    for data, expected in BAD_MOUNT_REQUESTS:
        err, _ = write_read(ctl, data)
        assert err == expected, f"{data[:80]!r}: errno {err}, want {expected}"
        assert sorted(os.listdir(fuse_mount.path)) == before, f"{data[:80]!r} changed the mount"


def test_a_63_byte_name_works(fuse_mount):
    name = "n" * 63
    fuse_mount.ctl(f"create {name} size=4K flags=mmap|init_shared")
    try:
        assert os.stat(os.path.join(fuse_mount.path, name, "mem")).st_size == PS
        assert os.statvfs(fuse_mount.path).f_namemax == 63
    finally:
        fuse_mount.ctl(f"destroy {name}")


def test_duplicate_name_is_eexist(gmem, fuse_mount):
    g = gmem(PS)
    err, out = write_read(os.path.join(fuse_mount.path, "ctl"), f"create {g.name} size=8K".encode())
    assert err == errno.EEXIST and out.startswith(b"error EEXIST")
    assert g.status()["size"] == PS


def test_memory_lives_until_the_last_mapping_goes(fuse_mount):
    before = memfds(fuse_mount.pid)
    fuse_mount.ctl("create life size=64K flags=mmap|init_shared")
    memory = memfds(fuse_mount.pid) - before
    assert memory, "the file has backend memory"
    mem = os.path.join(fuse_mount.path, "life", "mem")
    fd = os.open(mem, os.O_RDWR)
    import mmap
    m = mmap.mmap(fd, 64 * 1024, mmap.MAP_SHARED)
    os.close(fd)
    m[:5] = b"alive"
    fuse_mount.ctl("destroy life")
    assert not os.path.exists(os.path.join(fuse_mount.path, "life"))
    m[5:10] = b"still"
    assert m[:10] == b"alivestill", "the mapping outlives the name"
    assert memory <= memfds(fuse_mount.pid), "memory is kept while mapped"
    m.close()
    assert wait_freed(fuse_mount.pid, memory, os.path.join(fuse_mount.path, "ctl")), \
        "memory freed once the last mapping is gone"


def test_status_and_snapshot(gmem):
    g = gmem(4 * PS)
    g.convert(0, PS, private=True)
    st = g.status()
    assert st["private_bytes"] == PS and st["shared_bytes"] == 3 * PS and st["size"] == 4 * PS
    with open(g.path("snapshot")) as f:
        snap = json.load(f)
    assert snap["size"] == 4 * PS
    for name in ("status", "snapshot"):
        with pytest.raises(PermissionError):
            os.open(g.path(name), os.O_WRONLY)
    for name in ("mem", "ctl", "guest", "status", "snapshot"):
        assert os.stat(g.path(name)).st_uid == os.getuid()
        assert os.stat(g.path(name)).st_mode & 0o077 == 0, f"{name} is not readable by others"
