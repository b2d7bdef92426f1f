"""Host mappings made with the real mmap(2), and accesses that may fault, run in forked children.

Python's ``mmap`` module refuses a length past ``st_size`` of a regular file, but guest_memfd allows it
(the selftest maps four times the file), so mappings are made with libc ``mmap`` through ctypes and
touched with ``ctypes.memset``/``string_at``.

An access that the kernel answers with SIGBUS would kill the test process, so every access list runs in
a forked child (:meth:`Mapping.run`): the child performs the operations in order and writes one result
line per operation to a pipe; when it dies of SIGBUS the parent knows exactly which operation faulted.
No sleeps, no signal handlers in the parent: the outcome is the child's exit status. MAP_SHARED
mappings are inherited across fork, so writes the child made before faulting stay visible to the parent.

Operations (tuples):

* ``("fill", offset, length, byte)`` — memset; result ``ok``;
* ``("read", offset, length)`` — result the bytes as runs, e.g. ``aa*4096,00*4096`` (:func:`runs`).
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal

from ..errors import errname

PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE = 0x01, 0x02
MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MS_ASYNC, MS_INVALIDATE, MS_SYNC = 1, 2, 4
SYS_MBIND, SYS_GET_MEMPOLICY = 237, 239  # x86-64
MPOL_DEFAULT, MPOL_BIND, MPOL_INTERLEAVE = 0, 2, 3
MPOL_F_ADDR = 2


def runs(data: bytes) -> str:
    """``b"\\xaa\\xaa\\x00"`` → ``"aa*2,00*1"``: a compact, comparable picture of memory content."""
    out, start = [], 0
    for i in range(1, len(data) + 1):
        if i == len(data) or data[i] != data[start]:
            out.append(f"{data[start]:02x}*{i - start}")
            start = i
    return ",".join(out) or "empty"


def mmap_fd(fd: int, length: int, flags: int = MAP_SHARED, prot: int = PROT_READ | PROT_WRITE,
            offset: int = 0) -> "Mapping":
    """mmap(2) of ``fd``; OSError with the kernel's errno on failure."""
    address = _libc.mmap(None, length, prot, flags, fd, offset)
    if address in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mmap(length={length:#x}, flags={flags:#x}, offset={offset:#x}): {os.strerror(err)}")
    return Mapping(address, length)


class Mapping:
    """A live mapping ``[address, address + length)``; unmap with :meth:`close`."""

    def __init__(self, address: int, length: int):
        self.address = address
        self.length = length

    def run(self, ops: list[tuple]) -> list[str]:
        """Perform ``ops`` in a forked child; one result per completed op, then ``SIGBUS`` if it faulted."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: no Python-level cleanup, no faulthandler: a SIGBUS must kill it
            try:
                os.close(read_end)
                faulthandler.disable()
                signal.signal(signal.SIGBUS, signal.SIG_DFL)
                signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                for op in ops:
                    os.write(write_end, (self._perform(op) + "\n").encode())
                os._exit(0)
            except BaseException:
                os._exit(3)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            results = pipe.read().decode().splitlines()
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results.append(signal.Signals(os.WTERMSIG(status)).name)
        elif os.WEXITSTATUS(status) != 0:
            results.append(f"child exit {os.WEXITSTATUS(status)}")
        return results

    def _perform(self, op: tuple) -> str:
        kind, offset, length = op[0], op[1], op[2]
        if kind == "fill":
            ctypes.memset(self.address + offset, op[3], length)
            return "ok"
        if kind == "read":
            return runs(ctypes.string_at(self.address + offset, length))
        raise ValueError(f"unknown mapping operation {kind!r}")

    def madvise(self, offset: int, length: int, advice: int) -> str:
        """``ok`` or the errno name (advice that could fault belongs in a child; these do not)."""
        if _libc.madvise(self.address + offset, length, advice) != 0:
            return errname(ctypes.get_errno())
        return "ok"

    def msync(self, offset: int, length: int, flags: int) -> str:
        """``ok`` or the errno name of msync(2) on part of the mapping."""
        if _libc.msync(self.address + offset, length, flags) != 0:
            return errname(ctypes.get_errno())
        return "ok"

    def mbind(self, offset: int, length: int, mode: int, nodemask: int) -> str:
        """mbind(2) (no libc wrapper: the raw syscall); ``ok`` or the errno name."""
        mask = ctypes.c_ulong(nodemask)
        if _libc.syscall(SYS_MBIND, ctypes.c_void_p(self.address + offset), ctypes.c_ulong(length),
                         ctypes.c_int(mode), ctypes.byref(mask), ctypes.c_ulong(64), ctypes.c_uint(0)) != 0:
            return errname(ctypes.get_errno())
        return "ok"

    def get_mempolicy(self, offset: int) -> str:
        """The policy mode at ``address + offset`` (get_mempolicy with MPOL_F_ADDR), or the errno name."""
        mode, mask = ctypes.c_int(-1), ctypes.c_ulong(0)
        if _libc.syscall(SYS_GET_MEMPOLICY, ctypes.byref(mode), ctypes.byref(mask), ctypes.c_ulong(64),
                         ctypes.c_void_p(self.address + offset), ctypes.c_ulong(MPOL_F_ADDR)) != 0:
            return errname(ctypes.get_errno())
        return f"mode {mode.value} nodes {mask.value:#x}"

    def close(self) -> None:
        if self.length:
            _libc.munmap(self.address, self.length)
            self.length = 0
