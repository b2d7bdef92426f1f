"""The server's own threads for requests that may wait long: a bounded pool with one FIFO per key.

Why it exists: so that libfuse's workers are never all waiting, one of the three deadlocks FUSE allows
(the rule and the why: docs/architecture.md, Threads and locks). Work that may wait is handed to these
threads (``lowlevel.Deferred``), and libfuse's workers stay free. These threads never serve a FUSE request
themselves, so nothing they wait for depends on them: a revocation's write-backs, page fills, LOOKUPs and
OPENs are all served by libfuse's workers.

Scheduling: jobs with the same key (one file) run one at a time, in the order they came; different keys
run side by side on up to ``max_threads`` threads, taking turns (a key with more work goes to the back of
the line after each job), so one busy file never starves another. A job waiting in a queue holds no lock
and has not started, so a bounded pool cannot deadlock: every running job waits only for things libfuse's
workers serve, or for a file lock another running job holds and will release.

Threads start on demand and leave after ``IDLE_SECONDS`` without work. ``stop`` refuses new jobs, hands
every queued one to its ``cancel`` (which answers the request without running it) and lets idle threads go;
``join`` then waits for the running jobs (call it once whatever they wait for can end: the server aborts
its FUSE connection first). Knows nothing about FUSE.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
from typing import Callable, Hashable

log = logging.getLogger("ufsgmem.fuse")

IDLE_SECONDS = 30.0
#: The loop's signals belong to the thread that runs libfuse's loop (``lowlevel.py``).
LOOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class Executor:
    def __init__(self, max_threads: int, name: str = "ufsgmem-deferred"):
        if max_threads < 1:
            raise ValueError(f"max_threads must be at least 1, got {max_threads}")
        self.max_threads = max_threads
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        #: key -> jobs not started yet; a key is present while it has work queued or running
        self._queues: dict[Hashable, collections.deque] = {}
        self._ready: collections.deque = collections.deque()  # keys with queued work and no job running
        self._threads: set[threading.Thread] = set()
        self._idle = 0
        self._stopped = False
        self._unkeyed = 0

    # --- submitting ---------------------------------------------------------------------------------
    def submit(self, key: Hashable | None, job: Callable[[], None], cancel: Callable[[], None]) -> bool:
        """Queue ``job`` behind the other jobs of ``key`` (None: a key of its own). ``cancel`` is called
        instead of ``job`` if the executor stops first. False (nothing queued) once stopped."""
        with self._cond:
            if self._stopped:
                return False
            if key is None:
                self._unkeyed += 1
                key = ("unkeyed", self._unkeyed)
            queue = self._queues.get(key)
            if queue is None:
                self._queues[key] = collections.deque([(job, cancel)])
                self._ready.append(key)
                self._wake()
            else:  # a job of this key runs or waits its turn: this one follows it
                queue.append((job, cancel))
            return True

    def _wake(self) -> None:
        """One more key is ready: wake an idle thread, or start one if none is idle. Lock held."""
        if self._idle > len(self._ready) - 1:
            self._cond.notify()
        elif len(self._threads) < self.max_threads:
            thread = threading.Thread(target=self._serve, name=f"{self.name}-{len(self._threads)}", daemon=True)
            self._threads.add(thread)
            thread.start()
        # else: every thread is busy; the first to finish its job takes the next ready key

    # --- the threads --------------------------------------------------------------------------------
    def _serve(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, LOOP_SIGNALS)
        me = threading.current_thread()
        while True:
            with self._cond:
                while not self._ready and not self._stopped:
                    self._idle += 1
                    woken = self._cond.wait(IDLE_SECONDS)
                    self._idle -= 1
                    if not woken and not self._ready:  # idle for long: leave
                        self._threads.discard(me)
                        return
                if not self._ready:  # stopped, nothing left to run
                    self._threads.discard(me)
                    return
                key = self._ready.popleft()
                job, _ = self._queues[key].popleft()
            try:
                job()
            except BaseException:  # noqa: BLE001 - a job answers its own errors; this is a bug
                log.exception("deferred job %r failed", key)
            with self._cond:
                if self._queues[key]:
                    self._ready.append(key)  # its next job, after the other ready keys
                else:
                    del self._queues[key]

    # --- the end ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Refuse new jobs, cancel every queued one (in this thread), let idle threads leave."""
        with self._cond:
            self._stopped = True
            cancelled = []
            for queue in self._queues.values():  # a running key's queue holds only the jobs after it
                cancelled += queue
                queue.clear()
            self._ready.clear()
            self._cond.notify_all()
        for _, cancel in cancelled:
            try:
                cancel()
            except BaseException:  # noqa: BLE001 - keep cancelling the others
                log.exception("cancelling a deferred job")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the running jobs to end (after ``stop``); False if some still ran after ``timeout``."""
        with self._cond:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout)
        return not any(t.is_alive() for t in threads)

    def status(self) -> dict:
        with self._cond:
            return {"threads": len(self._threads), "idle": self._idle,
                    "queued": sum(len(q) for q in self._queues.values()), "keys": len(self._queues)}
