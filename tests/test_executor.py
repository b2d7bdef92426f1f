"""The executor that runs the server's long work off libfuse's workers (``ufsgmem/fuse/executor.py``), without
FUSE: one key's jobs run in order and one at a time, a waiting key holds up no other, the pool stays within
its bound, and stopping cancels what has not started. And the session's choice between running deferred
work where it was received and handing it off (``lowlevel.py``). Every wait is bounded."""

from __future__ import annotations

import threading

import pytest

from ufsgmem.fuse.executor import Executor

WAIT = 30.0


def gate(executor: Executor, key, started: threading.Event, release: threading.Event, done: list) -> None:
    """Queue a job on ``key`` that says it started, waits for ``release``, then records ``key``."""
    def job():
        started.set()
        assert release.wait(WAIT)
        done.append(key)
    assert executor.submit(key, job, lambda: done.append(("cancelled", key)))


def test_one_keys_jobs_run_in_order_one_at_a_time():
    ex = Executor(8)
    order, running, overlap = [], [0], []
    lock = threading.Lock()
    finished = threading.Event()

    def job(i):
        def run():
            with lock:
                running[0] += 1
                overlap.append(running[0])
            order.append(i)
            with lock:
                running[0] -= 1
            if i == 199:
                finished.set()
        return run

    for i in range(200):
        assert ex.submit("file", job(i), lambda: None)
    assert finished.wait(WAIT)
    assert order == list(range(200))
    assert max(overlap) == 1
    ex.stop()
    assert ex.join(WAIT)


def test_a_waiting_key_holds_up_no_other_key():
    ex = Executor(4)
    started, release, done = threading.Event(), threading.Event(), []
    gate(ex, "a", started, release, done)
    assert started.wait(WAIT)
    other = threading.Event()
    assert ex.submit("b", other.set, lambda: None)
    assert ex.submit(None, lambda: None, lambda: None)
    assert other.wait(WAIT), "b waited for a"
    release.set()
    ex.stop()
    assert ex.join(WAIT)
    assert done == ["a"]


def test_the_pool_stays_within_its_bound_and_queued_keys_run_later():
    ex = Executor(2)
    release = threading.Event()
    started = [threading.Event() for _ in range(3)]
    done: list = []
    for i in range(3):
        gate(ex, i, started[i], release, done)
    assert started[0].wait(WAIT) and started[1].wait(WAIT)
    assert not started[2].is_set()  # both threads are taken: the third key waits its turn
    assert ex.status()["threads"] == 2
    release.set()
    assert started[2].wait(WAIT)
    ex.stop()
    assert ex.join(WAIT)
    assert sorted(done) == [0, 1, 2]


def test_stop_cancels_what_has_not_started_and_refuses_more():
    ex = Executor(4)
    started, release, done = threading.Event(), threading.Event(), []
    gate(ex, "a", started, release, done)
    assert started.wait(WAIT)
    for _ in range(3):
        gate(ex, "a", threading.Event(), release, done)  # queued behind the first
    ex.stop()
    assert done == [("cancelled", "a")] * 3  # cancelled in stop's thread, before it returns
    assert not ex.submit("a", lambda: done.append("late"), lambda: None)
    assert not ex.join(0.05)  # the running job is still waiting
    release.set()
    assert ex.join(WAIT)
    assert done[-1] == "a"


def test_a_failing_job_does_not_take_its_thread_or_key_down():
    ex = Executor(1)
    ran = threading.Event()

    def boom():
        raise RuntimeError("a bug in a job")

    assert ex.submit("k", boom, lambda: None)
    assert ex.submit("k", ran.set, lambda: None)
    assert ran.wait(WAIT)
    ex.stop()
    assert ex.join(WAIT)


def test_max_threads_must_be_positive():
    with pytest.raises(ValueError):
        Executor(0)


def test_deferred_work_runs_on_the_receiving_thread_up_to_the_inline_slots_then_on_the_executor():
    """The fast path is real: while an inline slot is free, the work runs in the thread that received
    the request (no hop); with every slot taken it runs on an executor thread, and the reply still comes."""
    from ufsgmem.fuse.lowlevel import INLINE_SLOTS, Deferred, Session, _answer

    session = Session(object(), ["fsname=ufsgmem-test"], uid=0, gid=0, time_ns=0)  # never mounted
    try:
        replies = []
        replied = threading.Event()

        def reply(value):
            replies.append((value, threading.get_ident()))
            replied.set()

        _answer(None, session, lambda: Deferred(lambda: "inline", key=1), reply, ("test", ()))
        assert replies == [("inline", threading.get_ident())]
        taken = [session.inline_slot() for _ in range(INLINE_SLOTS)]
        assert all(taken) and session.inline_slot() is None
        replied.clear()
        _answer(None, session, lambda: Deferred(lambda: "deferred", key=1), reply, ("test", ()))
        assert replied.wait(WAIT)
        assert replies[-1][0] == "deferred" and replies[-1][1] != threading.get_ident()
        for token in taken:
            session.inline_done(token)
    finally:
        session.close()
