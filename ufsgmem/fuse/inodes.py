"""The mount's namespace: inode numbers, lookup counts, open handles, and when memory may be freed.

Layout (design §2.2, docs/design.md)::

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
  revocation waits for exactly those requests (docs/architecture.md, "The three deadlocks").
* ``Entry.state`` guards the core's state (``GuestMemfd``) and the entry's own (``cached``,
  ``private_cached``, ``private_closing``, ``charged``). Held only for the duration of a core call, never
  while waiting for the kernel; every handler may take it.

Both entry locks are the pthread mutexes of the file's ``struct ufs_file`` (``fastpath.py``), which the
compiled hot path takes too (it never calls Python while holding one). The counters' locks
(``MemoryBudget``, ``Users``, ``WriteBackFiles``) are leaves. The lock order is stated
once, in docs/architecture.md ("Threads and locks").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import itertools
import threading
from dataclasses import InitVar, dataclass, field

from ..address import Range
from ..gmem import GuestMemfd
from ..runmap import RunMap
from ..uapi import PAGE_SHIFT
from .fastpath import FastFile, FastPath
from .users import SMALL_RESULT, Held, Users

#: freeing a result at least this big trims the heap (``trim_heap``)
TRIM_AFTER = 1 << 20
_libc = ctypes.CDLL(None)


def trim_heap() -> None:
    """Give free heap memory back to the kernel (glibc's ``malloc_trim``): otherwise much of what big
    results took stays in the server's resident memory after they are freed (docs/reliability.md has
    the figures)."""
    with contextlib.suppress(AttributeError):
        _libc.malloc_trim(0)

#: mallopt's M_MMAP_THRESHOLD, and what it is set to (``map_big_allocations``)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20


def map_big_allocations() -> None:
    """Make glibc give every allocation of MMAP_THRESHOLD or more its own mapping, returned to the kernel
    when it is freed. By default the threshold rises to the largest block freed so far (up to 32 MiB),
    after which a result's arrays and the transient arrays that building it takes come from the heaps of
    libfuse's worker threads, where they fragment: 80 held results of 400 000 runs took the server to
    535 MiB with this off, against ~300 MiB of arrays (docs/reliability.md has the figures)."""
    with contextlib.suppress(AttributeError):
        _libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


ROOT_INO = 1
MOUNT_CTL_INO = 2
FILES = ("mem", "ctl", "guest", "status", "snapshot", "private")
BLOCK = 8  # inode numbers per entry: the directory, then FILES in order


@dataclass
class Entry:
    """One guest_memfd as the mount serves it: the core's file (``gm``: attributes, pins, allocation) and
    all the frontend's state of it (names and references, what the kernel may have cached of ``mem`` and
    ``private``, its memory charge, its locks), built complete by ``Namespace.add``. Only its write-back
    descriptor lives elsewhere: in the mount's capped ``revoke.WriteBackFiles``, since the cap is
    across files."""

    name: str
    gm: GuestMemfd
    base: int
    lookups: dict[int, int] = field(default_factory=dict)
    open_handles: int = 0
    destroyed: bool = False
    #: What the compiled hot path shares of this file (``fastpath.py``): the two locks below are its
    #: mutexes, ``cached`` its map.
    file: FastFile | None = field(default=None, init=False, repr=False)
    #: Serialises transitions and guest accesses on this file (the kernel's invalidate lock).
    lock: object = field(default=None, init=False, repr=False)
    #: Guards ``gm`` and the mutable state below for the length of one core call (see the module docstring).
    state: object = field(default=None, init=False, repr=False)
    #: Pages that may sit in the kernel's page cache of ``mem`` (1) or surely do not (0). A page can only
    #: get there through a FUSE READ we answered (write(2) is refused before it touches the cache, and
    #: nothing else fills it), so revocation can skip ranges never read since they were last revoked.
    cached: RunMap | None = field(default=None, init=False, repr=False)
    #: KVM_SET_MEMORY_ATTRIBUTES2 works (else ENOTTY, as under kvm.gmem_in_place_conversion=0)
    in_place_conversion: bool = True
    #: (uid, gid) of the user who created it: its directory and files belong to that user
    owner: tuple[int, int] | None = None
    #: bytes of the mount's memory budget this file holds at creation (then ``charged``, kept in C)
    initial_charge: InitVar[int] = 0
    #: bytes of the machine's hugetlb pool it holds, against its owner's ``huge`` bound (``users.py``)
    huge: int = 0
    #: Pages of ``private`` a fill handed out since their last revocation (None until the view serves one;
    #: guarded by ``state``), as ``cached`` is for ``mem``.
    private_cached: RunMap | None = None
    #: The range a private→shared conversion is taking out of ``private`` (fills of it are refused;
    #: guarded by ``state``, set and cleared under ``lock``).
    private_closing: Range | None = None

    def __post_init__(self, initial_charge: int) -> None:
        self.file = FastFile(self.ino("mem"), self.gm, self.in_place_conversion)
        self.file.charged = initial_charge
        self.lock, self.state = self.file.lock, self.file.state
        self.cached = self.file.cached_map()

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

    # --- its memory charge (``budget.Charges`` keeps it equal to its committed folios; state held) -----
    @property
    def owner_uid(self) -> int:
        """Whose bounds (``users.py``) its memory counts against."""
        return self.owner[0] if self.owner is not None else 0

    @property
    def folio_size(self) -> int:
        return self.gm.folio_size

    def committed_folios(self, first: int, last: int) -> int:
        """Committed folios among those overlapping pages ``[first, last)``: allocated by the backend, or
        holding a page the kernel may have cached (``budget.py`` says why both count)."""
        step = self.gm.folio_size >> PAGE_SHIFT
        f0, f1 = first // step, -(-last // step)
        p0, p1 = f0 * step, min(f1 * step, self.gm.size >> PAGE_SHIFT)
        if f1 - f0 == 1:  # one folio (a 4 KiB conversion or write-back): two lookups, no run lists
            return int(self.gm.any_allocated(p0, p1) or not self.cached.is_uniform(p0, p1, 0))
        spans = [(s // step, -(-e // step)) for s, e in self.gm.allocated_runs(p0, p1)]
        spans += [(s // step, -(-e // step)) for s, e, v in self.cached.runs(p0, p1) if v]
        total, reach = 0, f0
        for s, e in sorted(spans):
            s = max(s, reach)
            if e > s:
                total += e - s
                reach = e
        return total

    def overlapping_folios(self, first: int, last: int) -> int:
        step = self.gm.folio_size >> PAGE_SHIFT
        return -(-last // step) - first // step

    @property
    def charged(self) -> int:
        """Bytes of the mount's memory budget this file holds (``budget.py``; changed with ``state`` held,
        by Python's methods below or by the compiled hot path's fills)."""
        return self.file.charged

    def take_charge(self, nbytes: int) -> None:
        """``nbytes`` more of the budget are its own (the budget granted them)."""
        self.file.charged += nbytes

    def give_charge(self, nbytes: int) -> None:
        """Give back ``nbytes`` of its charge. A file never gives back more than it was charged: the count
        of every path that commits memory (fills, write-backs, allocate, guest accesses, pin, create) must
        follow it, so more is a bug, refused before anything changes."""
        if nbytes > self.charged:
            raise AssertionError(f"{self.name!r} gives back {nbytes} bytes but was charged {self.charged}: "
                                 "some path committed memory without charging it")
        self.file.charged -= nbytes


@dataclass
class Handle:
    entry: Entry | None  # None for the mount control file
    kind: str
    ino: int = 0  # the inode it was opened on: a request naming another inode is EBADF
    writable: bool = False  # opened for writing (ioctl and fallocate need it)
    opener: tuple[int, int] = (0, 0)  # (uid, gid) of the process that opened it: requests act as that user
    #: what a read returns (bytes, or a ``pagedtext.PagedText`` rendered as it is read): set it through
    #: Namespace.set_result, which counts ``charged`` bytes of it against the opener's ``results`` bound
    result: bytes = b""
    charged: int = 0
    read_pos: int = 0
    closed: bool = False  # released: its result is no longer counted


class Namespace:
    """Names, inodes and handles of one mount; every method takes ``lock`` itself."""

    def __init__(self, users: Users | None = None, on_free=None, fast: FastPath | None = None, counters=None):
        self.lock = threading.Lock()
        #: ``counters(uid)``: the (owner's, mount's) memory counters a file's charges go to (``budget.py``)
        self.counters = counters
        #: the session's compiled hot path (None without a session): told of every mem file and handle
        self.fast = fast
        #: called with entry.state held when a file's memory goes back (``control.give_back`` releases its charge)
        self.on_free = on_free if on_free is not None else (lambda entry: None)
        self.by_name: dict[str, Entry] = {}
        self.by_ino: dict[int, Entry] = {}
        self.handles: dict[int, Handle] = {}
        self._next_base = itertools.count(16, BLOCK)
        self._next_fh = itertools.count(1)
        self.mount_ctl_lookups = 0
        #: per-user bounds (``users.py``): handles and the results they hold count against their opener
        self.users = users if users is not None else Users()

    # --- entries ------------------------------------------------------------------------------------
    def add(self, name: str, gm: GuestMemfd, owner: tuple[int, int] | None = None, charged: int = 0,
            huge: int = 0, in_place_conversion: bool = True) -> Entry:
        """Give ``gm`` a name (with ``charged`` bytes of the memory budget already its own, so a request that
        finds it at once sees its charge, and every setting it is created with); EEXIST if another create
        won the race for it."""
        with self.lock:
            if name in self.by_name:
                raise OSError(errno.EEXIST, f"{name!r} exists")
            entry = Entry(name, gm, next(self._next_base), owner=owner, initial_charge=charged, huge=huge,
                          in_place_conversion=in_place_conversion)
            if self.counters is not None:
                entry.file.set_counters(*self.counters(entry.owner_uid))
            for ino in range(entry.base, entry.base + 1 + len(FILES)):
                self.by_ino[ino] = entry
            self.by_name[name] = entry
            if self.fast is not None:
                self.fast.add_file(entry.file)
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
            if self.fast is not None:  # C serves it no more (a request already in keeps its memory)
                self.fast.remove_file(entry.ino("mem"))
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
    def open(self, entry: Entry | None, kind: str, result: bytes | Held = b"", **fields) -> int:
        """A new handle whose reads return ``result``; ENOENT if ``entry`` was freed meanwhile (its inode is
        gone), EMFILE or ENOMEM past the opener's bounds on handles or on held results (``users.py``). A
        ``Held`` result is already counted; if the open fails its count is given back here."""
        handle = Handle(entry, kind, **fields)
        uid = handle.opener[0]
        try:
            self.users.take(uid, "handles")
        except BaseException:
            self._give_result(uid, result.charged if isinstance(result, Held) else 0)
            raise
        try:
            handle.result, handle.charged = self._count_result(uid, result)
        except BaseException:
            self.users.give(uid, "handles")
            raise
        with self.lock:
            if entry is not None and entry.gm.closed:
                self._forget_handle(handle)
                raise OSError(errno.ENOENT, f"{entry.name!r} was destroyed")
            fh = next(self._next_fh)
            self.handles[fh] = handle
            if entry is not None:
                entry.open_handles += 1
            if kind == "mem" and self.fast is not None:
                self.fast.open(fh, handle.ino, handle.writable)
            return fh

    def set_result(self, handle: Handle, result: bytes | Held) -> None:
        """Keep ``result`` for the handle's next read in place of the last one; ENOMEM past the opener's
        ``results`` bound (the last one is kept). Bytes up to SMALL_RESULT are always granted; a ``Held``
        result was counted by its builder (``users.hold_result``)."""
        uid = handle.opener[0]
        result, charged = self._count_result(uid, result)
        with self.lock:  # one swap at a time, and none into a handle released meanwhile
            if handle.closed:
                old = charged
            else:
                old, handle.result, handle.charged = handle.charged, result, charged
        self._give_result(uid, old)

    def _count_result(self, uid: int, result: bytes | Held) -> tuple[object, int]:
        """(what reads return, bytes counted for it): bytes are counted here, a Held was already."""
        if isinstance(result, Held):
            return result.result, result.charged
        return result, self.users.take(uid, "results", len(result), force=len(result) <= SMALL_RESULT)

    def _give_result(self, uid: int, charged: int) -> None:
        self.users.give(uid, "results", charged)
        if charged >= TRIM_AFTER:  # big results came from malloc's arenas: hand the pages back now
            trim_heap()

    def _forget_handle(self, handle: Handle) -> None:
        handle.closed = True
        self.users.give(handle.opener[0], "handles")
        self._give_result(handle.opener[0], handle.charged)
        handle.result, handle.charged = b"", 0

    def release(self, fh: int, ino: int) -> Entry | None:
        """Drop handle ``fh`` of inode ``ino``; return its entry if that freed it (so the caller can drop its
        page cache)."""
        with self.lock:
            handle = self.handles.get(fh)
            if handle is None or handle.ino != ino:
                return None
            del self.handles[fh]
            if handle.kind == "mem" and self.fast is not None:
                self.fast.release(fh)
            self._forget_handle(handle)
            if handle.entry is not None:
                handle.entry.open_handles -= 1
                if self._maybe_free(handle.entry):
                    return handle.entry
            return None

    def handle(self, fh: int, ino: int) -> Handle:
        """Open file ``fh``, which must be open on inode ``ino``: a handle number is one object only."""
        handle = self.handles.get(fh)
        if handle is None or handle.ino != ino:
            raise OSError(errno.EBADF, f"no open file {fh} on inode {ino}")
        return handle

    def close_all(self) -> None:
        """At shutdown, once no request is served any more: free every file."""
        with self.lock:
            for entry in {id(e): e for e in self.by_ino.values()}.values():
                if self.fast is not None:
                    self.fast.remove_file(entry.ino("mem"))
                entry.gm.close()
                self.on_free(entry)
            self.by_name.clear()
            self.by_ino.clear()
