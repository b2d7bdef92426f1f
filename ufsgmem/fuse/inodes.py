"""The mount's namespace: inode numbers, lookup counts, open handles, and when memory may be freed.

Layout (design §2.2)::

    /ctl                 mount control file        (inode 2)
    /NAME/               one directory per guest_memfd
    /NAME/mem            the guest_memfd file
    /NAME/ctl            its control file
    /NAME/guest          the guest's view (pread/pwrite of any page)
    /NAME/status         JSON of GuestMemfd.status()
    /NAME/snapshot       JSON of GuestMemfd.snapshot() (for ``ufsgmem layout``)

Each guest_memfd gets a fresh block of inode numbers that is never reused, so every ``mem`` has its own
st_ino (as every KVM_CREATE_GUEST_MEMFD makes a new inode) and a stale kernel reference can never reach a
newer file.

Lifetime mirrors the kernel: ``destroy`` only unlinks the name. The memory lives while any file of the
entry is open; an mmap holds its file open, so FUSE sends RELEASE only after the last munmap. The entry is
closed (memory freed) when a destroyed entry's last handle is released. Lookup counts are tracked (and
dropped in ``forget``, never at destroy: pyfuse3's gotcha) but do not keep the memory: the kernel may
keep a destroyed file's dentry cached indefinitely and never send FORGET, while a guest_memfd's memory
goes with its last file reference. An inode of a freed entry answers ENOENT.
"""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass, field

import trio

from ..gmem import GuestMemfd
from ..runmap import RunMap
from ..uapi import PAGE_SHIFT

ROOT_INO = 1
MOUNT_CTL_INO = 2
FILES = ("mem", "ctl", "guest", "status", "snapshot")
BLOCK = 8  # inode numbers per entry: the directory, then FILES in order


class InvalidateLock:
    """The per-file lock (the kernel's ``invalidate_lock``): a ``trio.Lock`` whose uncontended acquire
    does not yield to the scheduler.

    ``trio.Lock`` checkpoints on every acquire, and a checkpoint is a pass through trio's run loop (an
    ``epoll_wait`` and its bookkeeping). Nearly every control request takes the lock uncontended, and that
    one pass was measurable: a clean 4 KiB round trip through ``ctl`` went from ~158 to ~128 µs without it
    (docs/performance.md). Contended, the caller waits in the ``trio.Lock``, first come first served.
    """

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    async def __aexit__(self, *exc) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@dataclass
class Entry:
    """One guest_memfd with its inode block and reference counts."""

    name: str
    gm: GuestMemfd
    base: int
    lookups: dict[int, int] = field(default_factory=dict)
    open_handles: int = 0
    destroyed: bool = False
    #: Serialises transitions and guest accesses on this file (the kernel's invalidate lock).
    lock: InvalidateLock = field(default_factory=InvalidateLock)
    #: Pages that may sit in the kernel's page cache of ``mem`` (1) or surely do not (0). A page can only
    #: get there through a FUSE READ we answered (write(2) is refused before it touches the cache, and
    #: nothing else fills it), so revocation can skip ranges never read since they were last revoked.
    cached: RunMap | None = None

    def __post_init__(self) -> None:
        self.cached = RunMap(self.gm.size >> PAGE_SHIFT, 0)

    @property
    def dir_ino(self) -> int:
        return self.base

    def ino(self, kind: str) -> int:
        return self.base + 1 + FILES.index(kind)

    def kind(self, ino: int) -> str:
        return "dir" if ino == self.base else FILES[ino - self.base - 1]

    @property
    def referenced(self) -> bool:
        return self.open_handles > 0


@dataclass
class Handle:
    entry: Entry | None  # None for the mount control file
    kind: str
    result: bytes = b""
    read_pos: int = 0


class Namespace:
    """Names, inodes and handles of one mount. Not thread-safe: used from the trio loop only."""

    def __init__(self):
        self.by_name: dict[str, Entry] = {}
        self.by_ino: dict[int, Entry] = {}
        self.handles: dict[int, Handle] = {}
        self._next_base = itertools.count(16, BLOCK)
        self._next_fh = itertools.count(1)
        self.mount_ctl_lookups = 0

    # --- entries ------------------------------------------------------------------------------------
    def add(self, name: str, gm: GuestMemfd) -> Entry:
        entry = Entry(name, gm, next(self._next_base))
        for ino in range(entry.base, entry.base + 1 + len(FILES)):
            self.by_ino[ino] = entry
        self.by_name[name] = entry
        return entry

    def unlink(self, name: str) -> Entry:
        entry = self.by_name.pop(name)
        entry.destroyed = True
        self._maybe_free(entry)
        return entry

    def _maybe_free(self, entry: Entry) -> bool:
        """Free a destroyed, unreferenced entry; True when this call freed it."""
        if entry.destroyed and not entry.referenced and not entry.gm.closed:
            for ino in range(entry.base, entry.base + 1 + len(FILES)):
                self.by_ino.pop(ino, None)
            entry.gm.close()
            return True
        return False

    def entry_of(self, ino: int) -> Entry | None:
        return self.by_ino.get(ino)

    # --- kernel references --------------------------------------------------------------------------
    def looked_up(self, ino: int) -> None:
        if ino == MOUNT_CTL_INO:
            self.mount_ctl_lookups += 1
            return
        entry = self.by_ino[ino]
        entry.lookups[ino] = entry.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        entry = self.by_ino.get(ino)
        if entry is None:
            return
        left = entry.lookups.get(ino, 0) - count
        if left > 0:
            entry.lookups[ino] = left
        else:
            entry.lookups.pop(ino, None)
        self._maybe_free(entry)

    # --- handles ------------------------------------------------------------------------------------
    def open(self, entry: Entry | None, kind: str) -> int:
        fh = next(self._next_fh)
        self.handles[fh] = Handle(entry, kind)
        if entry is not None:
            entry.open_handles += 1
        return fh

    def release(self, fh: int) -> Entry | None:
        """Drop a handle; return its entry if that freed it (so the caller can drop its page cache)."""
        handle = self.handles.pop(fh, None)
        if handle is not None and handle.entry is not None:
            handle.entry.open_handles -= 1
            if self._maybe_free(handle.entry):
                return handle.entry
        return None

    def handle(self, fh: int) -> Handle:
        handle = self.handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, f"no open file {fh}")
        return handle

    def close_all(self) -> None:
        for entry in {id(e): e for e in self.by_ino.values()}.values():
            entry.gm.close()
        self.by_name.clear()
        self.by_ino.clear()
