"""Making a guest_memfd for MOUNTPOINT/ctl ``create``, with preallocation progress in the log.

A hugetlb backend reserves and zeroes every huge page up front; for GiBs that takes seconds. :func:`make`
runs in the libfuse worker thread of that create request, while the loop's other threads keep serving
every other file; only the ``write()`` of that create request waits. The protocol has no progress message
(one write = one request = one result), so progress goes to the server log, and ``ufsgmem create``
shows its own by watching the huge page pool (``ufsgmem/commands/create.py``).

Test hook: when ``UFSGMEM_TEST_CREATE_GATE`` names a FIFO in the server's environment, each create opens it
and reads one byte before it allocates anything. A test that opens the FIFO for writing is thereby told,
without timing, that a create is in flight in the worker thread, and decides when it may finish.
"""

from __future__ import annotations

import errno
import logging
import os
import time

from ..address import format_size
from ..errors import fail
from ..gmem import GuestMemfd

log = logging.getLogger("ufsgmem.fuse")

GATE_ENV = "UFSGMEM_TEST_CREATE_GATE"
#: log a progress line each time another tenth of the file is preallocated
STEPS = 10


class PreallocLog:
    """The backend's ``progress(done, total)`` callback: logs every tenth and the total time."""

    def __init__(self, name: str):
        self.name = name
        self.started = time.monotonic()
        self.logged = 0

    def __call__(self, done: int, total: int) -> None:
        step = done * STEPS // total if total else STEPS
        if step <= self.logged:
            return
        self.logged = step
        seconds = time.monotonic() - self.started
        rate = f", {done / seconds / (1 << 30):.2f} GiB/s" if seconds > 0 else ""
        log.info("create %s: preallocated %s of %s (%d%%) in %.1f s%s", self.name, format_size(done),
                 format_size(total), done * 100 // total, seconds, rate)


def wait_for_gate() -> None:
    """The test hook above; nothing when the variable is unset."""
    path = os.environ.get(GATE_ENV)
    if path:
        with open(path, "rb") as gate:
            gate.read(1)


def make(name: str, size: int, flags: int, backend: str, page_size: int | None) -> GuestMemfd:
    """Create the file. Blocking (preallocation): other loop threads keep serving meanwhile."""
    wait_for_gate()
    log.info("create %s: %s on %s", name, format_size(size), backend)
    try:
        return GuestMemfd(size, flags, backend=backend, page_size=page_size, name=name, progress=PreallocLog(name))
    except MemoryError:  # a backend's own bookkeeping for this size does not fit: the kernel's answer
        raise fail(errno.ENOMEM, f"backend {backend!r} cannot keep track of a {format_size(size)} file "
                                 "in this server's memory") from None
