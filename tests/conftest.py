"""Shared fixtures: capabilities the tests set up themselves (huge pages), and the backends to run over."""

from __future__ import annotations

import contextlib
import os

import pytest

HUGEPAGE_SYSFS = "/sys/kernel/mm/hugepages/hugepages-{kb}kB/{what}"
SZ_2M = 2 << 20
SZ_1G = 1 << 30


def _read(size: int, what: str) -> int:
    with open(HUGEPAGE_SYSFS.format(kb=size >> 10, what=what)) as f:
        return int(f.read())


def _write(size: int, what: str, value: int) -> None:
    with open(HUGEPAGE_SYSFS.format(kb=size >> 10, what=what), "w") as f:
        f.write(str(value))


@contextlib.contextmanager
def reserved_hugepages(size: int, count: int):
    """Add ``count`` huge pages of ``size`` to the pool, and take exactly those away again afterwards.

    Skips (with the reason) only where the machine truly cannot: no sysfs knob, not root, or the kernel
    could not find the memory. Restoring by decrement keeps nested or concurrent reservations correct.
    """
    path = HUGEPAGE_SYSFS.format(kb=size >> 10, what="nr_hugepages")
    if not os.path.exists(path):
        pytest.skip(f"this kernel has no {size >> 20} MiB huge pages ({path} missing)")
    if os.geteuid() != 0:
        pytest.skip("reserving huge pages needs root")
    before = _read(size, "nr_hugepages")
    _write(size, "nr_hugepages", before + count)
    got = _read(size, "nr_hugepages") - before
    if got < count:  # the memory may be free but scattered (1 GiB pages): compact it and ask once more
        with contextlib.suppress(OSError), open("/proc/sys/vm/compact_memory", "w") as f:
            f.write("1")
        _write(size, "nr_hugepages", before + count)
        got = _read(size, "nr_hugepages") - before
    try:
        if got < count:
            pytest.skip(f"the kernel gave {got} of {count} {size >> 20} MiB huge pages (memory fragmented)")
        yield
    finally:
        _write(size, "nr_hugepages", max(0, _read(size, "nr_hugepages") - got))


@pytest.fixture
def hugepages():
    """``with hugepages(SZ_2M, 4): ...`` reserves pages for the block and gives them back after."""
    return reserved_hugepages
