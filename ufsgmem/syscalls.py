"""System calls the standard library lacks (``fallocate(2)`` with a mode, ``mincore(2)``) and a liveness
check of a process by pid.

``os.posix_fallocate`` takes no mode, so PUNCH_HOLE needs libc's ``fallocate``; ``mincore`` tells which
pages of a mapping are resident (how the tests and benchmarks see revocation and page-cache cost without
timing anything). Errors are ``OSError`` with the kernel's errno.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from .uapi import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with the errno the kernel gave."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode={mode:#x}, {offset:#x}, {length:#x}): {os.strerror(err)}")


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
