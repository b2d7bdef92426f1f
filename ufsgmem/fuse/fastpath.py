"""The Python side of the compiled hot path (``fastpath.c``): what Python registers so that C can serve
``mem``'s page fills, write-backs, ``KVM_SET_MEMORY_ATTRIBUTES2`` and ``fallocate(2)`` without calling Python.

C serves a request only in the common case and hands everything else to the Python handlers unchanged
(``fastpath.c`` lists the conditions). For that, both sides share per file a ``struct ufs_file``
(:class:`FastFile`, one per ``Entry``): its two locks (``Entry.state`` and ``Entry.lock`` are
:class:`CLock` wrappers of its pthread mutexes; taking one from Python releases the GIL while it waits),
its possibly-cached map (``Entry.cached``, the C run map wrapped as a ``RunMap``), and the backend's memory (``Backend.memory_fd()``: C maps it
itself; a backend without one is always served by Python; ``Backend.fallocate_mapping()``, if the backend
offers it, lets C allocate and punch as the backend would). Per session (:class:`FastPath`): which inodes
are ``mem`` files, which handles are open on them, the inline slots and the counters.

Under ``--low-latency`` the CPU latency hold is Python's (``latency.py``): while it is not held, C passes
requests to Python, whose hook raises it; while it is, C notes the time of each request it serves, which
the hold's expiry reads (:meth:`FastPath.last_request`).
"""

from __future__ import annotations

import errno
import os

from ._lowlevel import ffi, lib

#: ``ufsgmem mount --hot-path``: C serves the common case, or Python serves everything (as before)
HOT_PATHS = ("compiled", "python")
KINDS = ("read", "write", "ioctl", "fallocate")


class CLock:
    """A file's pthread mutex as a context manager with ``threading.Lock``'s ``acquire``/``release``. The
    lib call releases the GIL, so a C request holding the mutex never waits for Python."""

    __slots__ = ("_file", "_which")

    def __init__(self, file, which: int):
        self._file, self._which = file, which

    def __enter__(self):
        lib.ufs_file_lock(self._file, self._which)
        return self

    def __exit__(self, *exc) -> None:
        lib.ufs_file_unlock(self._file, self._which)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            lib.ufs_file_lock(self._file, self._which)
            return True
        return bool(lib.ufs_file_trylock(self._file, self._which))

    def release(self) -> None:
        lib.ufs_file_unlock(self._file, self._which)


class Counter:
    """Bytes counted against an optional bound (``counter.c``), shared with the compiled path: the mount's
    memory budget and each user's memory bound, so a fill charged in C and one charged in Python change
    the same count. ``take`` never passes the bound, even with concurrent takes."""

    __slots__ = ("ptr", "bound")

    def __init__(self, bound: int | None):
        ptr = lib.ufs_counter_new(-1 if bound is None else bound)
        if ptr == ffi.NULL:
            raise MemoryError("cannot allocate a counter")
        self.ptr = ffi.gc(ptr, lib.ufs_counter_put)
        self.bound = bound

    def take(self, nbytes: int, force: bool = False) -> bool:
        """Count ``nbytes`` more; False (nothing counted) past the bound unless ``force``."""
        return lib.ufs_counter_take(self.ptr, nbytes, int(force)) == 0

    def give(self, nbytes: int) -> bool:
        """Give ``nbytes`` back; False (nothing changed) if that is more than is held."""
        return lib.ufs_counter_give(self.ptr, nbytes) == 0

    @property
    def held(self) -> int:
        return lib.ufs_counter_held(self.ptr)


class FastFile:
    """One ``mem`` file as C sees it (``struct ufs_file``), made with its ``Entry``: ``gm``'s compiled
    state if it has one (``GuestMemfd.address``), its backend's memory if it offers it."""

    def __init__(self, ino: int, gm, in_place_conversion: bool):
        self.ino = ino
        address = getattr(gm, "address", None) or 0
        memory_fd = getattr(gm.backend, "memory_fd", lambda: None)()
        err = ffi.new("int *")
        ptr = lib.ufs_file_new(ino, address, gm.size, -1 if memory_fd is None else memory_fd,
                               int(bool(in_place_conversion)), err)
        if ptr == ffi.NULL:
            raise OSError(-err[0], f"cannot prepare the compiled path of inode {ino}: {os.strerror(-err[0])}")
        self.ptr = ffi.gc(ptr, lib.ufs_file_put)
        if getattr(gm.backend, "memory_hugepage", False):
            lib.ufs_file_advise_huge(self.ptr)
        mapping = getattr(gm.backend, "fallocate_mapping", lambda: None)() if memory_fd is not None else None
        if mapping:  # the backend allocates and punches exactly as C would: C serves fallocate(2) too
            lib.ufs_file_set_fallocate(self.ptr, mapping)
        self.state = CLock(self.ptr, lib.UFS_LOCK_STATE)
        self.lock = CLock(self.ptr, lib.UFS_LOCK_INVAL)

    def set_counters(self, user: Counter, mount: Counter) -> None:
        """Where this file's charges go: its owner's memory bound and the mount's budget (``budget.py``)."""
        lib.ufs_file_set_counters(self.ptr, user.ptr, mount.ptr)

    @property
    def charged(self) -> int:
        """Bytes of the budget the file holds (``Entry.charged``; state held to change it)."""
        return lib.ufs_file_charged(self.ptr)

    @charged.setter
    def charged(self, value: int) -> None:
        lib.ufs_file_set_charged(self.ptr, value)

    def cached_map(self):
        """The possibly-cached map: C's, shared with the hot path, as a ``RunMap`` that keeps this file."""
        from ..runmap import RunMap
        return RunMap.wrap(int(ffi.cast("uintptr_t", lib.ufs_file_cached(self.ptr))), self)

    def set_private_active(self) -> None:
        """The private view served a page: conversions go to Python from now on. ``state`` held."""
        lib.ufs_file_set_private_active(self.ptr)

    def set_write_back(self, fd: int | None) -> None:
        """Hand the file's write-back descriptor to C, which closes it when it is replaced, dropped (None)
        or the file freed, and not while a conversion of its own writes back through it. Python keeps
        using the number while it is registered (``revoke.WriteBackFiles``)."""
        lib.ufs_file_set_write_back(self.ptr, -1 if fd is None else fd)


class FastPath:
    """A session's part of the hot path (``struct ufs_fast``): files, handles, inline slots, counters."""

    def __init__(self, ptr, hot_path: str):
        if hot_path not in HOT_PATHS:
            raise ValueError(f"--hot-path is one of {', '.join(HOT_PATHS)}, not {hot_path!r}")
        self.ptr = ptr
        self.hot_path = hot_path
        lib.ufs_fast_set_enabled(ptr, hot_path == "compiled")

    @property
    def serving(self) -> bool:
        """C serves requests (switched on, session not ended)."""
        return self.ptr != ffi.NULL and bool(lib.ufs_fast_enabled(self.ptr))

    def hold(self, wanted: bool) -> None:
        """--low-latency: C serves only while the hold is held (``held``), noting each request's time."""
        if self.ptr != ffi.NULL:
            lib.ufs_fast_set_hold(self.ptr, int(wanted))

    def held(self, held: bool) -> None:
        if self.ptr != ffi.NULL:
            lib.ufs_fast_set_held(self.ptr, int(held))

    def last_request(self) -> float:
        """``time.monotonic()`` of the last request C served under the hold (0 if none)."""
        return 0.0 if self.ptr == ffi.NULL else lib.ufs_fast_last_ns(self.ptr) / 1e9

    def disable(self) -> None:
        if self.ptr != ffi.NULL:
            lib.ufs_fast_set_enabled(self.ptr, 0)

    # (after the session is freed, ptr is NULL and the registrations below are no-ops: nothing serves)
    def add_file(self, file: FastFile) -> None:
        if self.ptr != ffi.NULL and lib.ufs_fast_add_file(self.ptr, file.ptr) < 0:
            raise OSError(errno.ENOMEM, "cannot register the file with the compiled path")

    def remove_file(self, ino: int) -> None:
        if self.ptr != ffi.NULL:
            lib.ufs_fast_remove_file(self.ptr, ino)

    def open(self, fh: int, ino: int, writable: bool) -> None:
        if self.ptr != ffi.NULL and lib.ufs_fast_open(self.ptr, fh, ino, int(writable)) < 0:
            raise OSError(errno.ENOMEM, "cannot register the handle with the compiled path")

    def release(self, fh: int) -> None:
        if self.ptr != ffi.NULL:
            lib.ufs_fast_release(self.ptr, fh)

    def counts(self) -> dict:
        if self.ptr == ffi.NULL:
            return {kind: {"compiled": 0, "python": 0} for kind in KINDS}
        compiled, python = ffi.new("uint64_t[]", lib.UFS_KINDS), ffi.new("uint64_t[]", lib.UFS_KINDS)
        lib.ufs_fast_counts(self.ptr, compiled, python)
        return {kind: {"compiled": compiled[i], "python": python[i]} for i, kind in enumerate(KINDS)}

    def status(self) -> dict:
        """For ``status``: the mode, whether C serves, and the mount's requests on ``mem`` files by who
        served them (read = page fills, write = write-backs, ioctl = conversions, fallocate = allocations and
        punches)."""
        return {"mode": self.hot_path, "compiled_serving": self.serving, **self.counts()}
