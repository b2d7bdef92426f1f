"""The mount's namespace: inode numbers, lookup counts, open handles, and when memory may be freed.

Layout (design §2.2)::

    /ctl                 mount control file        (inode 2)
    /NAME/               one directory per guest_memfd
    /NAME/mem            the guest_memfd file
    /NAME/ctl            its control file
    /NAME/guest          the guest's view (pread/pwrite of any page)
    /NAME/status         JSON of GuestMemfd.status()
    /NAME/snapshot       JSON of GuestMemfd.snapshot() (for ``ufsgmem layout``)
    /NAME/private        the private view: a mappable file of the private pages only (``ufsgmem run``)

Each guest_memfd gets a fresh block of inode numbers that is never reused, so every ``mem`` has its own
st_ino (as every KVM_CREATE_GUEST_MEMFD makes a new inode) and a stale kernel reference can never reach a
newer file.

Lifetime mirrors the kernel: ``destroy`` only unlinks the name. The memory lives while any file of the
entry is open; an mmap holds its file open, so FUSE sends RELEASE only after the last munmap. The entry is
closed (memory freed) when a destroyed entry's last handle is released. Lookup counts are tracked (and
dropped in ``forget``, never at destroy: pyfuse3's gotcha) but do not keep the memory: the kernel may
keep a destroyed file's dentry cached indefinitely and never send FORGET, while a guest_memfd's memory
goes with its last file reference. An inode of a freed entry answers ENOENT.

Locks (requests arrive on several libfuse worker threads at once):

* ``Namespace.lock`` guards the names, inode numbers and handles. Held briefly, never across I/O.
* ``Entry.lock`` is the kernel's ``invalidate_lock``: it serialises transitions (shared→private,
  punch-hole) and guest accesses of one file, and is held across their revocation, which blocks until
  the kernel has written dirty pages back. So it is never taken by a ``mem`` READ or WRITE handler: the
  revocation waits for exactly those requests.
* ``Entry.state`` guards the core's state (``GuestMemfd`` and ``Entry.cached``). Held only for the
  duration of a core call, never while waiting for the kernel; every handler may take it.

Order: ``Entry.lock`` before ``Entry.state``. ``Namespace.lock`` may be held while taking ``Entry.state``
(freeing a file), never ``Entry.lock``, and neither entry lock is ever held while taking it.
"""

from __future__ import annotations

import errno
import itertools
import threading
from dataclasses import dataclass, field

from ..gmem import GuestMemfd
from ..runmap import RunMap
from ..uapi import PAGE_SHIFT

ROOT_INO = 1
MOUNT_CTL_INO = 2
FILES = ("mem", "ctl", "guest", "status", "snapshot", "private")
BLOCK = 8  # inode numbers per entry: the directory, then FILES in order


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
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: Guards ``gm`` and ``cached`` for the length of one core call (see the module docstring).
    state: threading.Lock = field(default_factory=threading.Lock)
    #: Pages that may sit in the kernel's page cache of ``mem`` (1) or surely do not (0). A page can only
    #: get there through a FUSE READ we answered (write(2) is refused before it touches the cache, and
    #: nothing else fills it), so revocation can skip ranges never read since they were last revoked.
    cached: RunMap | None = None
    #: KVM_SET_MEMORY_ATTRIBUTES2 works (else ENOTTY, as under kvm.gmem_in_place_conversion=0)
    in_place_conversion: bool = True
    #: (uid, gid) of the user who created it: its directory and files belong to that user
    owner: tuple[int, int] | None = None
    #: bytes of the mount's memory budget this file holds (``budget.py``; guarded by ``state``)
    charged: int = 0

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
    writable: bool = False  # opened for writing (ioctl and fallocate need it)
    opener: tuple[int, int] = (0, 0)  # (uid, gid) of the process that opened it: requests act as that user
    result: bytes = b""
    read_pos: int = 0


class Namespace:
    """Names, inodes and handles of one mount; every method takes ``lock`` itself."""

    def __init__(self):
        self.lock = threading.Lock()
        #: called with entry.state held when a file's memory goes back (``Files`` releases its charge)
        self.on_free = lambda entry: None
        self.by_name: dict[str, Entry] = {}
        self.by_ino: dict[int, Entry] = {}
        self.handles: dict[int, Handle] = {}
        self._next_base = itertools.count(16, BLOCK)
        self._next_fh = itertools.count(1)
        self.mount_ctl_lookups = 0

    # --- entries ------------------------------------------------------------------------------------
    def add(self, name: str, gm: GuestMemfd, owner: tuple[int, int] | None = None) -> Entry:
        """Give ``gm`` a name; EEXIST if another create won the race for it."""
        with self.lock:
            if name in self.by_name:
                raise OSError(errno.EEXIST, f"{name!r} exists")
            entry = Entry(name, gm, next(self._next_base), owner=owner)
            for ino in range(entry.base, entry.base + 1 + len(FILES)):
                self.by_ino[ino] = entry
            self.by_name[name] = entry
            return entry

    def unlink(self, name: str) -> Entry:
        """Remove the name (ENOENT if there is none); the memory goes with the last open file."""
        with self.lock:
            entry = self.by_name.pop(name, None)
            if entry is None:
                raise OSError(errno.ENOENT, f"no guest_memfd called {name!r}")
            entry.destroyed = True
            self._maybe_free(entry)
            return entry

    def names(self) -> list[tuple[str, Entry]]:
        with self.lock:
            return sorted(self.by_name.items())

    def _maybe_free(self, entry: Entry) -> bool:
        """Free a destroyed, unreferenced entry; True when this call freed it."""
        if entry.destroyed and not entry.referenced and not entry.gm.closed:
            for ino in range(entry.base, entry.base + 1 + len(FILES)):
                self.by_ino.pop(ino, None)
            with entry.state:
                entry.gm.close()
                self.on_free(entry)
            return True
        return False

    def entry_of(self, ino: int) -> Entry | None:
        return self.by_ino.get(ino)

    # --- kernel references --------------------------------------------------------------------------
    def looked_up(self, ino: int) -> None:
        with self.lock:
            if ino == MOUNT_CTL_INO:
                self.mount_ctl_lookups += 1
                return
            entry = self.by_ino[ino]
            entry.lookups[ino] = entry.lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        with self.lock:
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
    def open(self, entry: Entry | None, kind: str, **fields) -> int:
        """A new handle; ENOENT if ``entry`` was freed meanwhile (its inode is gone)."""
        with self.lock:
            if entry is not None and entry.gm.closed:
                raise OSError(errno.ENOENT, f"{entry.name!r} was destroyed")
            fh = next(self._next_fh)
            self.handles[fh] = Handle(entry, kind, **fields)
            if entry is not None:
                entry.open_handles += 1
            return fh

    def release(self, fh: int) -> Entry | None:
        """Drop a handle; return its entry if that freed it (so the caller can drop its page cache)."""
        with self.lock:
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
        """At shutdown, once no request is served any more: free every file."""
        with self.lock:
            for entry in {id(e): e for e in self.by_ino.values()}.values():
                entry.gm.close()
                self.on_free(entry)
            self.by_name.clear()
            self.by_ino.clear()
