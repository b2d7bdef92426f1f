"""System calls the standard library lacks (``fallocate(2)`` with a mode, ``mincore(2)``, a ``madvise(2)``
that lets other threads run), a liveness
check of a process by pid, and the kernel's CPU-list format (``0,2-3``) for pinning the server.

``os.posix_fallocate`` takes no mode, so PUNCH_HOLE needs libc's ``fallocate``; ``mincore`` tells which
pages of a mapping are resident (how the tests and benchmarks see revocation and page-cache cost without
timing anything). ``mmap.madvise`` holds the GIL for the whole call, and MADV_POPULATE_WRITE allocates:
under a memory cgroup limit it can wait in reclaim for a FUSE write-back that another thread of the same
server must serve, in Python, which then needs the GIL (measured: a hang). ctypes releases it.
Errors are ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np

from .uapi import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on ``[address, address + length)``, without holding the GIL; OSError with the errno."""
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({address:#x}, {length:#x}, {advice}): {os.strerror(err)}")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with the errno the kernel gave."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset:#x}, {length:#x}): {os.strerror(err)}")


_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2); raises OSError with the errno the kernel gave."""
    result = _libc.prctl(option, arg2, arg3, arg4, arg5)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")
    return result


def mapping_address(mapping: mmap.mmap) -> int:
    """The virtual address of a writable ``mmap`` object."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def mincore(mapping: mmap.mmap, offset: int = 0, length: int | None = None) -> np.ndarray:
    """A bool per page of ``[offset, offset + length)`` of ``mapping``: resident in memory or not."""
    length = len(mapping) - offset if length is None else length
    pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
    vec = np.zeros(pages, dtype=np.uint8)
    if _libc.mincore(mapping_address(mapping) + offset, length, vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore: {os.strerror(err)}")
    return (vec & 1).astype(bool)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a dead child nobody reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's CPU-list format (``0``, ``0-1``, ``0,2-3``, as in /sys/devices/system/cpu/online).

    EINVAL for anything else, and for CPUs this process may not run on (``sched_getaffinity``), naming them.
    """
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            lo, hi = int(first), int(last) if dash else int(first)
        except ValueError:
            raise OSError(errno.EINVAL, f"bad CPU list {text!r}: expected numbers and ranges such as 0,2-3") from None
        if lo < 0 or hi < lo:
            raise OSError(errno.EINVAL, f"bad CPU list {text!r}: {part.strip()!r} is not a range")
        cpus.update(range(lo, hi + 1))
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise OSError(errno.EINVAL, f"CPU {min(cpus - allowed)} is not available here (allowed: "
                                    f"{format_cpu_list(allowed)})")
    return cpus


def pin_process(cpus: set[int]) -> None:
    """Pin every thread of this process to ``cpus`` (``sched_setaffinity`` is per thread; threads started
    later inherit the affinity of the thread that starts them)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass


def format_cpu_list(cpus) -> str:
    """``{0, 2, 3}`` → ``0,2-3``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)
