"""N concurrent claims of one key, from several OS processes, yield exactly one winner.

Each child builds its own store from the same spec, warms its connection up, then waits on a
barrier so that every claim is released at the same instant: the race is forced, not hoped for.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from multiprocessing.synchronize import Barrier

import pytest

from oncepay.idempotency import StoredResponse
from oncepay.idempotency.records import ClaimOutcome, RecordState
from tests.conftest import StoreSpec

PROCESSES = 4
CLAIMS = 52  # 13 per process: at least the 50 the spec asks for
FP = "f" * 64

pytestmark = pytest.mark.slow


async def _claims_in_child(spec: StoreSpec, key: str, count: int, barrier: Barrier) -> list[str]:
    store = spec.build()
    try:
        await store.get("warm-up", "warm-up")  # connect and create the schema before the race
        await asyncio.to_thread(barrier.wait)
        now = time.time()
        claims = await asyncio.gather(
            *(store.claim("race", key, FP, now=now, lease=30, ttl=3600) for _ in range(count))
        )
        return [claim.outcome.value for claim in claims]
    finally:
        await store.aclose()


def _child(
    spec: StoreSpec,
    key: str,
    count: int,
    barrier: Barrier,
    out: multiprocessing.Queue[list[str]],
) -> None:
    out.put(asyncio.run(_claims_in_child(spec, key, count, barrier)))


def run_across_processes(spec: StoreSpec, key: str) -> list[str]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out: multiprocessing.Queue[list[str]] = ctx.Queue()
    per_child = CLAIMS // PROCESSES
    children = [
        ctx.Process(target=_child, args=(spec, key, per_child, barrier, out))
        for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    outcomes = [o for _ in children for o in out.get(timeout=120)]
    for child in children:
        child.join(timeout=30)
        assert child.exitcode == 0
    return outcomes


def test_concurrent_claims_from_several_processes_have_one_winner(
    shared_store_spec: StoreSpec,
) -> None:
    outcomes = run_across_processes(shared_store_spec, f"race-{uuid.uuid4().hex}")
    assert len(outcomes) == CLAIMS
    assert outcomes.count(ClaimOutcome.CREATED.value) == 1
    assert outcomes.count(ClaimOutcome.EXISTING.value) == CLAIMS - 1


async def test_concurrent_takeovers_from_several_processes_have_one_winner(
    shared_store_spec: StoreSpec,
) -> None:
    key = f"takeover-{uuid.uuid4().hex}"
    store = shared_store_spec.build()
    try:
        # A claim made 'a minute ago' whose 30 s lease has lapsed: every child races to take over.
        first = await store.claim("race", key, FP, now=time.time() - 60, lease=30, ttl=3600)
        assert first.outcome is ClaimOutcome.CREATED
        outcomes = await asyncio.to_thread(run_across_processes, shared_store_spec, key)
        assert outcomes.count(ClaimOutcome.TAKEN_OVER.value) == 1
        assert outcomes.count(ClaimOutcome.EXISTING.value) == CLAIMS - 1
        record = await store.get("race", key)
        assert record is not None
        assert record.fence == first.record.fence + 1
        await store.complete("race", key, record.fence, StoredResponse(200), now=time.time())
    finally:
        await store.aclose()


# A child waits this long for its siblings at the barrier: spawning interpreters takes a few
# seconds on a loaded CI machine; a minute means something is broken, not slow.
BARRIER_TIMEOUT = 60.0


def _first_use_in_child(spec: StoreSpec, key: str, barrier: Barrier) -> None:
    asyncio.run(_first_use(spec, key, barrier))


async def _first_use(spec: StoreSpec, key: str, barrier: Barrier) -> None:
    store = spec.build()
    try:
        barrier.wait(BARRIER_TIMEOUT)  # then every process sets up a schema none has created
        claim = await store.claim("race", key, FP, now=time.time(), lease=30, ttl=3600)
        assert claim.outcome is ClaimOutcome.CREATED
    finally:
        await store.aclose()


async def test_processes_using_a_fresh_store_at_once_all_succeed(
    shared_store_spec: StoreSpec,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    children = [
        ctx.Process(target=_first_use_in_child, args=(shared_store_spec, f"k{i}", barrier))
        for i in range(PROCESSES)
    ]
    for child in children:
        child.start()
    for child in children:
        await asyncio.to_thread(child.join, BARRIER_TIMEOUT * 2)
    assert [child.exitcode for child in children] == [0] * PROCESSES
    store = shared_store_spec.build()
    try:
        records = [await store.get("race", f"k{i}") for i in range(PROCESSES)]
    finally:
        await store.aclose()
    assert all(r is not None and r.state is RecordState.EXECUTING for r in records)
