"""The conversion path's worker thread: one long-lived thread for the blocking calls a conversion makes.

A shared→private conversion of a mapped range must leave the trio loop for its write-back and
invalidation (``revoke.py`` says why: both block on FUSE requests the loop itself must serve). With
``trio.to_thread.run_sync`` that round trip cost ~86 µs here for a function that does nothing (~40 µs
with everything on one CPU): a capacity limiter, a thread-cache handoff, a context copy and several
passes of trio's run loop. This thread is woken through a pipe and answers through another that the
loop waits on with ``wait_readable``: ~45 µs, and ~10 µs on one CPU (``mount --cpus``), measured the same
way (``docs/performance.md``).

One thread means one blocking call at a time. A call that arrives while it is busy (another file's
conversion, a 1 GiB revocation still running) goes to ``trio.to_thread.run_sync`` instead, so a long
revocation never holds up a short one. As with ``to_thread``, a call runs to its end even if the task
awaiting it is cancelled (the blocking system call cannot be interrupted): the wait is shielded.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

import outcome
import trio

T = TypeVar("T")


class Worker:
    def __init__(self, name: str = "ufsgmem-revoke"):
        self._name = name
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = self._done_r = self._done_w = -1
        self._job: Callable[[], object] | None = None
        self._result: outcome.Outcome | None = None
        self.busy = False
        self.calls = self.overflow = 0  # calls run here / handed to trio.to_thread because it was busy

    def _start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._done_r, self._done_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        wake_r, done_w = self._wake_r, self._done_w
        try:
            while os.read(wake_r, 1):  # b"" once close() closed the write end
                self._result = outcome.capture(self._job)
                self._job = None
                os.write(done_w, b"d")
        finally:
            os.close(wake_r)
            os.close(done_w)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the worker thread; its result, or its exception raised here."""
        if self.busy:
            self.overflow += 1
            return await trio.to_thread.run_sync(fn)
        if self._thread is None:
            self._start()
        self.busy = True
        self.calls += 1
        try:
            self._job = fn
            os.write(self._wake_w, b"j")
            with trio.CancelScope(shield=True):
                await trio.lowlevel.wait_readable(self._done_r)
            os.read(self._done_r, 1)
            result, self._result = self._result, None
        finally:
            self.busy = False
        return result.unwrap()

    def close(self, timeout: float = 5.0) -> None:
        """End the thread once the call it may be running returns (waiting at most ``timeout``: at
        shutdown a call still blocked on the gone connection is left to die with the process)."""
        if self._thread is None:
            return
        os.close(self._wake_w)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            os.close(self._done_r)
        self._thread = None
