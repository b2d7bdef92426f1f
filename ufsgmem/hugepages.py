"""Growing and shrinking the kernel's huge page pools, for tests, the demo and the benchmarks.

The pools are global (``/sys/kernel/mm/hugepages/hugepages-<kB>kB/nr_hugepages``), so whoever grows one
must shrink it again. :func:`reserved` adds pages and takes back exactly the pages it added, by
decrement rather than by restoring an absolute count, so nested or concurrent reservations stay correct.
1 GiB pages need 1 GiB of physically contiguous free memory; when the kernel cannot find it at first,
compacting memory and asking once more usually helps.
"""

from __future__ import annotations

import contextlib
import os

SYSFS = "/sys/kernel/mm/hugepages/hugepages-{kb}kB/{what}"


def _path(size: int, what: str) -> str:
    return SYSFS.format(kb=size >> 10, what=what)


def read(size: int, what: str = "nr_hugepages") -> int:
    with open(_path(size, what)) as f:
        return int(f.read())


def _write(size: int, value: int) -> None:
    with open(_path(size, "nr_hugepages"), "w") as f:
        f.write(str(value))


def unavailable_reason(size: int) -> str | None:
    """Why pages of ``size`` cannot be reserved here, or None when they can be tried."""
    if not os.path.exists(_path(size, "nr_hugepages")):
        return f"this kernel has no {size >> 20} MiB huge pages"
    if os.geteuid() != 0:
        return "reserving huge pages needs root"
    return None


def grow(size: int, count: int) -> int:
    """Add up to ``count`` pages of ``size`` to the pool; return how many the kernel really added."""
    before = read(size)
    _write(size, before + count)
    got = read(size) - before
    if got < count:
        with contextlib.suppress(OSError):
            with open("/proc/sys/vm/compact_memory", "w") as f:
                f.write("1")
        _write(size, before + count)
        got = read(size) - before
    return max(got, 0)


def shrink(size: int, count: int) -> None:
    """Take ``count`` pages of ``size`` back out of the pool."""
    if count > 0:
        _write(size, max(0, read(size) - count))


@contextlib.contextmanager
def reserved(size: int, count: int):
    """Grow the pool by ``count`` pages for the block; yields the number added (may be fewer)."""
    got = 0
    try:
        got = grow(size, count)
        yield got
    finally:
        shrink(size, got)
