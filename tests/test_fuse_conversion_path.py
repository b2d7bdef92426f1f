"""The conversion path outside the kernel: its worker thread (``ufsgmem/fuse/worker.py``: results, errors,
overflow, shutdown) and the per-file lock that does not yield when free (``ufsgmem/fuse/inodes.py``)."""

from __future__ import annotations

import errno
import threading

import pytest
import trio
import trio.testing

from ufsgmem.fuse.worker import Worker


def test_runs_in_its_own_thread_and_returns_the_result():
    worker = Worker()

    async def main():
        names = [await worker.run(lambda: threading.current_thread().name) for _ in range(3)]
        assert names == ["ufsgmem-revoke"] * 3, "every call runs in the one long-lived thread"

    try:
        trio.run(main)
        assert (worker.calls, worker.overflow) == (3, 0)
    finally:
        worker.close()


def test_an_exception_is_raised_in_the_caller_and_the_worker_goes_on():
    worker = Worker()

    def fails():
        raise OSError(errno.ENOENT, "inode not cached")

    async def main():
        with pytest.raises(OSError) as info:
            await worker.run(fails)
        assert info.value.errno == errno.ENOENT
        assert await worker.run(lambda: 42) == 42

    try:
        trio.run(main)
    finally:
        worker.close()


def test_a_call_while_busy_goes_to_another_thread_instead_of_waiting():
    """A long revocation must not hold up a short one on another file."""
    worker, release, long_started = Worker(), threading.Event(), threading.Event()

    def long_call():
        long_started.set()
        assert release.wait(30), "the short call never came"
        return "long"

    async def main():
        results = {}
        async with trio.open_nursery() as nursery:
            async def run(key, fn):
                results[key] = await worker.run(fn)
            nursery.start_soon(run, "long", long_call)
            await trio.to_thread.run_sync(long_started.wait)
            results["short"] = await worker.run(lambda: threading.current_thread().name)
            release.set()
        return results

    try:
        results = trio.run(main)
        assert results["long"] == "long"
        assert results["short"] != "ufsgmem-revoke", "the short call ran beside the busy worker"
        assert (worker.calls, worker.overflow) == (1, 1)
    finally:
        worker.close()


def test_a_cancelled_caller_still_waits_for_its_call_to_end():
    """The blocking call cannot be interrupted, so its caller may not move on while it still runs."""
    worker, started, go = Worker(), threading.Event(), threading.Event()
    seen = []

    def call():
        started.set()
        assert go.wait(30)
        return "done"

    async def caller(scope_box):
        with trio.CancelScope() as scope:
            scope_box.append(scope)
            seen.append(await worker.run(call))
        seen.append("left")

    async def main():
        async with trio.open_nursery() as nursery:
            scope_box = []
            nursery.start_soon(caller, scope_box)
            await trio.to_thread.run_sync(started.wait)
            scope_box[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert seen == [], "the caller moved on while its call was still running"
            go.set()
        assert seen == ["done", "left"], "it got its result once the call ended"
        assert await worker.run(lambda: "next") == "next", "the next call gets its own result"

    try:
        trio.run(main)
    finally:
        worker.close()


def test_close_ends_the_thread_and_a_later_call_starts_it_again():
    worker = Worker()

    def alive() -> int:
        return sum(t.name == "ufsgmem-revoke" for t in threading.enumerate())

    async def one():
        return await worker.run(lambda: 7)

    before = alive()
    assert trio.run(one) == 7 and alive() == before + 1
    worker.close()
    assert alive() == before, "close ended the thread"
    try:
        assert trio.run(one) == 7 and alive() == before + 1, "the next call started a new one"
    finally:
        worker.close()


# --- the per-file lock on the same path ------------------------------------------------------------------
def test_an_uncontended_lock_does_not_yield_and_a_contended_one_waits_in_order():
    from ufsgmem.fuse.inodes import InvalidateLock

    lock, order = InvalidateLock(), []

    async def other(name):
        order.append(f"{name} runs")
        async with lock:
            order.append(f"{name} holds")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other, "a")
            async with lock:  # no checkpoint: "a" cannot run before this line's body
                order.append("main holds")
                await trio.testing.wait_all_tasks_blocked()  # a now waits for the lock
                nursery.start_soon(other, "b")
                await trio.testing.wait_all_tasks_blocked()  # and b behind it
                assert lock.locked()
        assert not lock.locked()

    trio.run(main)
    assert order == ["main holds", "a runs", "b runs", "a holds", "b holds"]
