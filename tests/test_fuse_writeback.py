"""The server's own write-back descriptor of ``mem`` (``fuse/revoke.py`` ``WriteBackFiles``): opened once per
file however many conversions revoke it, closed at destroy, so a destroyed file's memory is still freed
when the last outside user goes, and dirty data still survives every conversion."""

from __future__ import annotations

import mmap
import os

import pytest

from fusefix import memfds, open_files, requires_fuse, wait_freed
from ufsgmem.client import Mount

pytestmark = [requires_fuse, pytest.mark.fuse]

SIZE = 1 << 20


def _fds_on(pid: int, path: str) -> int:
    return sum(target == path for target in open_files(pid))


def test_one_descriptor_for_many_conversions_and_data_survives(fuse_mount):
    with Mount(fuse_mount.path) as mount:
        f = mount.create("wb1", SIZE, "mmap|init_shared")
        mem = os.path.join(f.path, "mem")
        fd = os.open(mem, os.O_RDWR)
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        try:
            for i in range(8):
                offset = (i % 4) * 256 * 1024
                m[offset:offset + 4] = bytes([i + 1]) * 4  # dirty in the page cache
                f.convert(offset, 256 * 1024, to="private")
                f.convert(offset, 256 * 1024, to="shared")
                assert m[offset:offset + 4] == bytes([i + 1]) * 4, f"conversion {i} lost dirty data"
            assert _fds_on(fuse_mount.pid, os.path.realpath(mem)) == 1
        finally:
            m.close()
            os.close(fd)
            f.close()
        mount.destroy("wb1")
        assert _fds_on(fuse_mount.pid, os.path.realpath(mem)) == 0, "destroy closes the write-back descriptor"


def test_destroyed_file_is_freed_after_a_revoking_conversion(fuse_mount):
    before = memfds(fuse_mount.pid)
    with Mount(fuse_mount.path) as mount:
        f = mount.create("wb2", SIZE, "mmap|init_shared")
        memory = memfds(fuse_mount.pid) - before
        fd = os.open(os.path.join(f.path, "mem"), os.O_RDWR)
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED)
        os.close(fd)
        m[:4] = b"data"
        f.convert(0, SIZE, to="private")  # revokes: the server opens its own descriptor
        f.close()
        mount.destroy("wb2")
        assert memory and memory <= memfds(fuse_mount.pid), "memory is kept while mapped"
        m.close()
    assert wait_freed(fuse_mount.pid, memory, os.path.join(fuse_mount.path, "ctl")), \
        "memory freed once the last outside user is gone"
