"""Per-user bounds of a mount (``ufsgmem mount --allow-other``): what one user may hold of the server.

A mount that serves other users shares one server, one descriptor table, one ``--max-memory`` and the
machine's huge page pool between them. Without bounds one user could take any of these whole and leave
every other user's create, open or fault failing. So each user other than root and the user who mounted
(who own the server anyway) holds at most:

==========  ===============================================  =======  ==========================
bound       what counts                                      refusal  default
==========  ===============================================  =======  ==========================
files       files created and not yet freed (a destroyed     ENOSPC   1024
            file counts until its last handle closes)
handles     files open (each open(2) the kernel holds,       EMFILE   4096
            mappings included: they keep their file open)
memory      committed guest memory of the user's files      ENOMEM   half of ``--max-memory``,
            (``budget.py``), huge pages included                      else half of MemTotal
huge        hugetlb memory of the user's files, per page     ENOSPC   half of that size's pool
            size                                                      (at the time of the create)
results     server memory held for the user: its open       ENOMEM   64M
            ``status``/``snapshot`` contents and control
            results larger than 4 KiB (long ones as their
            arrays, ~9 bytes an attribute run:
            ``pagedtext.py``), and the data of its
            ``guest``/``ctl`` writes while they wait or run
==========  ===============================================  =======  ==========================

``ufsgmem mount --per-user files=N,handles=N,memory=SIZE,huge=SIZE,results=SIZE`` changes them (any
subset; ``none`` lifts one). A refusal says which bound, how much is held, and the option that sets it.

The bounds are counters taken *before* the thing they count exists and given back when it goes, under
one lock, so concurrent requests of one user can never pass a bound together. Control results of at
most 4 KiB are always granted (counted, never refused): a request with side effects has already run when
its result is stored, so refusing its ``ok`` would misreport it; the handle bound already limits them.
So is a write's data of at most 4 KiB (every well-formed control request), so that a user at the bound
can still destroy files; a longer write is refused before it is copied. A write's data counts because
it waits with its request, perhaps long in the executor's queue (``executor.py``), and a blocked caller
costs the user nothing: thousands of waiting 1 MiB ``guest`` writes held gigabytes before.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, fields
from typing import Callable

from ..address import format_size, parse_size
from ..errors import fail
from ..pagedtext import PagedText

#: results up to this size are always granted (see the module docstring)
SMALL_RESULT = 4096
OPTION = "ufsgmem mount --per-user"


@dataclass(frozen=True)
class UserLimits:
    """Each bound, or None for none; ``memory``/``huge`` None mean "the default, computed" unless lifted."""

    files: int | None = 1024
    handles: int | None = 4096
    memory: int | None = None
    huge: int | None = None
    results: int | None = 64 << 20
    #: bounds lifted with ``none`` (so ``memory``/``huge`` None is not taken for "the default")
    lifted: frozenset = frozenset()

    @classmethod
    def parse(cls, text: str) -> "UserLimits":
        """``files=N,handles=N,memory=SIZE,huge=SIZE,results=SIZE`` (any subset, ``none`` lifts a bound);
        ValueError naming what is wrong."""
        values, lifted = {}, set()
        names = [f.name for f in fields(cls) if f.name != "lifted"]
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in names:
                raise ValueError(f"{part!r}: expected one of {', '.join(n + '=' for n in names)}")
            if value == "none":
                lifted.add(key)
                values[key] = None
                continue
            number = int(value, 0) if key in ("files", "handles") and value.isdigit() else parse_size(value)
            if number <= 0:
                raise ValueError(f"{part!r}: a bound must be positive (or none)")
            values[key] = number
        return cls(**values, lifted=frozenset(lifted))


def machine_memory() -> int:
    """MemTotal in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) << 10
    return 0


def huge_pool_bytes(page_size: int) -> int:
    """Bytes of the machine's hugetlb pool of ``page_size`` (0 if there is none)."""
    try:
        with open(f"/sys/kernel/mm/hugepages/hugepages-{page_size >> 10}kB/nr_hugepages") as f:
            return int(f.read()) * page_size
    except OSError:
        return 0


#: bound -> (errno, what is held, how it is shown)
_KINDS = {
    "files": (errno.ENOSPC, "files", str),
    "handles": (errno.EMFILE, "open files", str),
    "memory": (errno.ENOMEM, "committed guest memory", format_size),
    "huge": (errno.ENOSPC, "hugetlb memory", format_size),
    "results": (errno.ENOMEM, "server memory for results, snapshots and requests in flight", format_size),
}


class Users:
    """What each bounded user holds; thread-safe. ``exempt`` uids (root, the user who mounted) are
    counted for ``status`` but never refused."""

    def __init__(self, limits: UserLimits | None = None, *, max_memory: int | None = None,
                 exempt: tuple[int, ...] = (0,)):
        self.limits = limits or UserLimits()
        self.exempt = frozenset(exempt) | {os.getuid()}
        if self.limits.memory is None and "memory" not in self.limits.lifted:
            self.limits = _replace(self.limits, memory=(max_memory or machine_memory()) // 2 or None)
        self._held: dict[tuple[int, str], int] = {}
        #: memory is counted in C counters (``fastpath.Counter``), one per user: the compiled hot path
        #: charges its page fills to them too
        self._memory: dict[int, object] = {}
        self._lock = threading.Lock()

    def memory_counter(self, uid: int):
        """The counter of ``uid``'s committed memory, against its bound (made on first use)."""
        counter = self._memory.get(uid)
        if counter is None:
            from .fastpath import Counter
            with self._lock:
                counter = self._memory.get(uid)
                if counter is None:
                    counter = self._memory[uid] = Counter(self.bound(uid, "memory"))
        return counter

    def bound(self, uid: int, what: str, page_size: int = 0) -> int | None:
        if uid in self.exempt:
            return None
        if what == "huge":
            if self.limits.huge is not None or "huge" in self.limits.lifted:
                return self.limits.huge
            return huge_pool_bytes(page_size) // 2
        return getattr(self.limits, what)

    def take(self, uid: int, what: str, amount: int = 1, *, force: bool = False, page_size: int = 0) -> int:
        """Count ``amount`` more of ``what`` for ``uid``; past its bound raise the bound's errno with the
        reason (nothing counted) unless ``force``d. Returns ``amount`` (for :meth:`give`)."""
        if not amount:
            return 0
        if what == "memory":
            counter = self.memory_counter(uid)
            if not counter.take(amount, force):
                err, noun, show = _KINDS[what]
                raise fail(err, f"uid {uid} holds {show(counter.held)} {noun} of its bound of "
                                f"{show(counter.bound)}: {show(amount)} more would pass it ({OPTION} {what}=)")
            return amount
        key = (uid, f"huge:{page_size}" if what == "huge" else what)
        with self._lock:
            held = self._held.get(key, 0)
            bound = None if force else self.bound(uid, what, page_size)
            if bound is not None and held + amount > bound:
                err, noun, show = _KINDS[what]
                size = f" of {format_size(page_size)} pages" if what == "huge" else ""
                raise fail(err, f"uid {uid} holds {show(held)} {noun}{size} of its bound of {show(bound)}: "
                                f"{show(amount)} more would pass it ({OPTION} {what}=)")
            self._held[key] = held + amount
        return amount

    def give(self, uid: int, what: str, amount: int = 1, *, page_size: int = 0) -> None:
        key = (uid, f"huge:{page_size}" if what == "huge" else what)
        if not amount:
            return
        if what == "memory":
            counter = self.memory_counter(uid)
            if not counter.give(amount):
                raise AssertionError(f"uid {uid} gives back {amount} {what} but held {counter.held}")
            return
        with self._lock:
            left = self._held.get(key, 0) - amount
            if left < 0:
                raise AssertionError(f"uid {uid} gives back {amount} {what} but held {left + amount}")
            if left:
                self._held[key] = left
            else:
                self._held.pop(key, None)

    def held(self, uid: int, what: str, page_size: int = 0) -> int:
        if what == "memory":
            return self.memory_counter(uid).held
        with self._lock:
            return self._held.get((uid, f"huge:{page_size}" if what == "huge" else what), 0)

    def status(self, uid: int) -> dict:
        """What ``uid`` holds against its bounds (None: unbounded), for ``status``."""
        out = {}
        for what in ("files", "handles", "memory", "results"):
            out[what] = {"held": self.held(uid, what), "max": self.bound(uid, what)}
        return out


@dataclass(frozen=True)
class Held:
    """A result whose server memory its builder has already counted against ``uid``'s ``results`` bound
    (``charged`` bytes): the namespace keeps the count with the handle and gives it back with it."""

    result: bytes | PagedText
    uid: int
    charged: int


def hold_result(users: Users, uid: int, estimate: int, build: Callable[[], PagedText]) -> Held:
    """Build a long result for ``uid`` within its ``results`` bound: ``estimate`` (what the result's arrays
    will take) is counted *before* ``build()`` runs, so a refused request builds nothing (ENOMEM); then
    the count is set to what the result really holds (``PagedText.held_bytes``: arrays, index, one
    rendered block), which may still refuse it if the estimate fell short. A result of at most
    SMALL_RESULT bytes is kept as bytes and always granted, like every small result."""
    charged = users.take(uid, "results", estimate, force=estimate <= SMALL_RESULT)
    try:
        text = build()
        result, held = (text[0:len(text)], len(text)) if len(text) <= SMALL_RESULT else (text, text.held_bytes())
        if held > charged:
            charged += users.take(uid, "results", held - charged, force=held <= SMALL_RESULT)
        elif held < charged:
            users.give(uid, "results", charged - held)
            charged = held
    except BaseException:
        users.give(uid, "results", charged)
        raise
    return Held(result, uid, charged)


def _replace(limits: UserLimits, **changes) -> UserLimits:
    values = {f.name: getattr(limits, f.name) for f in fields(limits)}
    values.update(changes)
    return UserLimits(**values)
