"""The group commit's sync thread (``_drivers.sqlite._SyncThread``): calls run in turn on one
thread of its own, each answered on its caller's loop, as ``run_in_executor`` would."""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest

from oncepay._drivers.sqlite import _SyncThread


async def test_calls_run_in_turn_on_one_thread_of_their_own() -> None:
    worker = _SyncThread("test-sync")
    seen: list[tuple[int, str]] = []

    def call(n: int) -> int:
        seen.append((n, threading.current_thread().name))
        return n * 10

    try:
        answers = await asyncio.gather(*(worker.run(functools.partial(call, n)) for n in range(20)))
    finally:
        worker.shutdown()
    assert answers == [n * 10 for n in range(20)]
    assert [n for n, _ in seen] == list(range(20))  # in the order handed over
    assert {name for _, name in seen} == {"test-sync"}
    assert threading.current_thread().name != "test-sync"


async def test_an_error_is_the_callers_and_the_thread_goes_on() -> None:
    worker = _SyncThread("test-sync")

    def broken() -> None:
        raise OSError(5, "I/O error")

    try:
        with pytest.raises(OSError, match="I/O error"):
            await worker.run(broken)
        assert await worker.run(lambda: "still here") == "still here"
    finally:
        worker.shutdown()


async def test_a_cancelled_caller_leaves_the_call_running_and_the_thread_whole() -> None:
    worker = _SyncThread("test-sync")
    release, ran = threading.Event(), threading.Event()

    def slow() -> str:
        release.wait(10)
        ran.set()
        return "done"

    try:
        waiting = worker.run(slow)
        waiting.cancel()
        release.set()
        assert await worker.run(lambda: "next") == "next"  # after slow, in turn
        assert ran.is_set()
        assert waiting.cancelled()
    finally:
        worker.shutdown()


async def test_nothing_is_taken_after_shutdown() -> None:
    worker = _SyncThread("test-sync")
    assert await worker.run(lambda: 1) == 1
    worker.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        worker.run(lambda: 2)


def test_an_answer_for_a_closed_loop_is_dropped() -> None:
    worker = _SyncThread("test-sync")
    release, ran = threading.Event(), threading.Event()

    def late() -> None:
        release.wait(10)

    async def hand_over() -> None:
        worker.run(late)
        worker.run(ran.set)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(hand_over())
    loop.close()
    release.set()  # its answer finds the loop closed: dropped, and the thread goes on
    assert ran.wait(10)
    worker.shutdown()
