"""The conformance suite: every store, on a real server, passes the same tests.

Each test drives the engine (SPEC §2's decision table) or the store's primitives directly, with
a clock the test moves by hand, so expiry and lease takeover are exact, not slept for.
"""

from __future__ import annotations

import asyncio

import pytest

from oncepay.errors import LeaseLost
from oncepay.idempotency import (
    Engine,
    Execute,
    InProgress,
    Replay,
    Reused,
    StoredResponse,
    fingerprint,
)
from oncepay.idempotency.records import ClaimOutcome, RecordState
from oncepay.idempotency.stores import Store
from tests.clock import FakeClock
from tests.signalling import SignallingStore

SCOPE = "merchant-a"
FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
OTHER_FP = fingerprint("POST", "/v1/payments", b'{"amount":999}')
RESPONSE = StoredResponse(
    status=201,
    headers=(("content-type", "application/json"), ("x-tag", "one"), ("x-tag", "two")),
    body=b'{"id":"pay_1","amount":100}\x00\xff binary-safe',
)


def engine_for(store: Store, clock: FakeClock, **options: float) -> Engine:
    return Engine(store, clock=clock, **{"ttl": 3600.0, "lease": 30.0, **options})


async def executed(engine: Engine, key: str = "k1", fp: str = FP, scope: str = SCOPE) -> Execute:
    decision = await engine.begin(scope, key, fp)
    assert isinstance(decision, Execute), decision
    return decision


# -- the decision table, row by row ------------------------------------------------------------


async def test_first_request_with_a_key_executes(store: Store, clock: FakeClock) -> None:
    decision = await executed(engine_for(store, clock))
    ticket = decision.ticket
    assert (ticket.scope, ticket.key, ticket.fingerprint) == (SCOPE, "k1", FP)
    assert ticket.resumed is False
    assert ticket.recovery_point is None
    assert ticket.expires_at == pytest.approx(clock.now + 3600.0)
    record = await store.get(SCOPE, "k1")
    assert record is not None
    assert record.state is RecordState.EXECUTING
    assert record.fence == ticket.fence
    assert record.lease_expires_at == pytest.approx(clock.now + 30.0)


async def test_same_key_same_fingerprint_completed_replays_byte_for_byte(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, RESPONSE)
    clock.advance(5)
    replay = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(replay, Replay)
    assert replay.response == RESPONSE  # status, multi-valued headers in order, body bytes
    assert replay.expires_at == pytest.approx(first.expires_at)


async def test_same_key_different_fingerprint_is_reuse_when_completed(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, RESPONSE)
    assert isinstance(await engine.begin(SCOPE, "k1", OTHER_FP), Reused)


async def test_same_key_different_fingerprint_is_reuse_while_executing(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    await executed(engine)
    assert isinstance(await engine.begin(SCOPE, "k1", OTHER_FP), Reused)


async def test_same_key_different_fingerprint_is_reuse_even_after_lease_lapsed(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    await executed(engine)
    clock.advance(31)
    assert isinstance(await engine.begin(SCOPE, "k1", OTHER_FP), Reused)


async def test_same_key_while_first_executes_is_in_progress(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    await executed(engine)
    clock.advance(1)
    decision = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(decision, InProgress)
    assert decision.retry_after >= 1


async def test_executing_record_whose_lease_ran_out_is_taken_over(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.checkpoint(first.ticket, "payment_created")
    clock.advance(31)
    second = await executed(engine)
    assert second.ticket.resumed is True
    assert second.ticket.recovery_point == "payment_created"
    assert second.ticket.fence > first.ticket.fence
    assert second.expires_at == pytest.approx(first.expires_at)  # TTL counts from first use


async def test_released_record_lets_a_retry_execute_again(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.release(first.ticket)
    retry = await executed(engine)
    assert retry.ticket.resumed is False
    assert retry.ticket.fence > first.ticket.fence


async def test_released_record_accepts_a_different_request(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.release(first.ticket)
    await executed(engine, fp=OTHER_FP)


async def test_record_older_than_ttl_is_treated_as_new(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, RESPONSE)
    clock.advance(3600)
    again = await executed(engine, fp=OTHER_FP)
    assert again.ticket.fence > first.ticket.fence
    assert again.expires_at == pytest.approx(clock.now + 3600)


async def test_ttl_can_be_set_per_request(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await engine.begin(SCOPE, "k1", FP, ttl=60)
    assert isinstance(first, Execute)
    await engine.complete(first.ticket, RESPONSE)
    clock.advance(59)
    assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
    clock.advance(1)
    assert isinstance(await engine.begin(SCOPE, "k1", FP), Execute)


# -- fencing -------------------------------------------------------------------------------------


async def test_stale_token_cannot_complete_after_takeover(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    clock.advance(31)
    second = await executed(engine)
    with pytest.raises(LeaseLost):
        await engine.complete(first.ticket, StoredResponse(200, (), b"stale"))
    await engine.complete(second.ticket, RESPONSE)
    replay = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(replay, Replay)
    assert replay.response == RESPONSE


async def test_stale_token_cannot_release_or_checkpoint(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    clock.advance(31)
    second = await executed(engine)
    with pytest.raises(LeaseLost):
        await engine.release(first.ticket)
    with pytest.raises(LeaseLost):
        await engine.checkpoint(first.ticket, "acquirer_called")
    record = await store.get(SCOPE, "k1")
    assert record is not None
    assert (record.state, record.fence, record.recovery_point) == (
        RecordState.EXECUTING,
        second.ticket.fence,
        None,
    )


async def test_a_record_completes_only_once(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, RESPONSE)
    with pytest.raises(LeaseLost):
        await engine.complete(first.ticket, StoredResponse(500))
    with pytest.raises(LeaseLost):
        await engine.release(first.ticket)


async def test_token_stays_larger_after_the_record_is_purged(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    clock.advance(3600)
    await store.purge_expired(now=clock.now)
    again = await executed(engine)
    assert again.ticket.fence > first.ticket.fence
    with pytest.raises(LeaseLost):
        await engine.complete(first.ticket, RESPONSE)


async def test_operations_on_a_missing_record_are_refused(store: Store, clock: FakeClock) -> None:
    with pytest.raises(LeaseLost):
        await store.complete(SCOPE, "nope", 1, RESPONSE, now=clock.now)
    with pytest.raises(LeaseLost):
        await store.release(SCOPE, "nope", 1, now=clock.now)
    with pytest.raises(LeaseLost):
        await store.checkpoint(SCOPE, "nope", 1, "started", now=clock.now, lease=30)


# -- checkpoints (recovery points) ---------------------------------------------------------------


async def test_checkpoint_records_the_recovery_point_and_renews_the_lease(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    clock.advance(20)
    ticket = await engine.checkpoint(first.ticket, "acquirer_called")
    assert ticket.recovery_point == "acquirer_called"
    clock.advance(20)  # 40 s after the claim, 20 s after the renewal: still leased
    assert isinstance(await engine.begin(SCOPE, "k1", FP), InProgress)
    record = await store.get(SCOPE, "k1")
    assert record is not None
    assert record.recovery_point == "acquirer_called"


# -- tenant isolation ----------------------------------------------------------------------------


async def test_same_key_in_two_scopes_names_two_records(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    a = await executed(engine, scope="tenant-a")
    await engine.complete(a.ticket, RESPONSE)
    b = await executed(engine, scope="tenant-b")  # not a replay of tenant-a's response
    await engine.complete(b.ticket, StoredResponse(202, (), b"tenant-b"))
    ra = await engine.begin("tenant-a", "k1", FP)
    rb = await engine.begin("tenant-b", "k1", FP)
    assert isinstance(ra, Replay)
    assert isinstance(rb, Replay)
    assert (ra.response.body, rb.response.body) == (RESPONSE.body, b"tenant-b")


async def test_keys_and_scopes_with_separator_like_characters_do_not_collide(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    a = await executed(engine, scope="a:b", key="c")
    b = await executed(engine, scope="a", key="b:c")
    c = await executed(engine, scope="{a}", key='"{x}\\ 255 ~!')
    await engine.complete(a.ticket, RESPONSE)
    for ticket in (b.ticket, c.ticket):
        record = await store.get(ticket.scope, ticket.key)
        assert record is not None
        assert record.state is RecordState.EXECUTING
    for scope, key in (("a:b", "c"), ("a", "b:c"), ("{a}", '"{x}\\ 255 ~!')):
        record = await store.get(scope, key)
        assert record is not None
        assert (record.scope, record.key) == (scope, key)


async def test_get_of_an_unknown_key_is_none(store: Store) -> None:
    assert await store.get(SCOPE, "never-used") is None


async def test_longest_key_round_trips(store: Store, clock: FakeClock) -> None:
    key = "k" * 255
    engine = engine_for(store, clock)
    first = await executed(engine, key=key)
    await engine.complete(first.ticket, RESPONSE)
    assert isinstance(await engine.begin(SCOPE, key, FP), Replay)


async def test_empty_body_and_no_headers_round_trip(store: Store, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, StoredResponse(204))
    replay = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(replay, Replay)
    assert replay.response == StoredResponse(204, (), b"")


# -- purge ---------------------------------------------------------------------------------------


async def test_purge_removes_only_expired_records_in_bounded_batches(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    for i in range(5):
        await executed(engine, key=f"old-{i}")
    clock.advance(1800)
    await executed(engine, key="young")
    clock.advance(1800)  # the five old ones are now exactly at their TTL
    first_batch = await store.purge_expired(now=clock.now, limit=3)
    second_batch = await store.purge_expired(now=clock.now, limit=3)
    assert first_batch + second_batch == 5 or (first_batch, second_batch) == (0, 0)
    if first_batch:  # SQL stores purge by statement; Redis expires records by itself (PX)
        assert first_batch == 3
        assert second_batch == 2
        for i in range(5):
            assert await store.get(SCOPE, f"old-{i}") is None
    assert await store.get(SCOPE, "young") is not None
    assert isinstance(await engine.begin(SCOPE, "old-0", FP), Execute)


# -- wait mode -----------------------------------------------------------------------------------


async def test_wait_mode_replays_once_the_first_request_completes(
    store: Store, clock: FakeClock
) -> None:
    signalling = SignallingStore(store)
    engine = engine_for(signalling, clock, wait=30.0)  # type: ignore[arg-type]
    first = await executed(engine)
    waiter = asyncio.create_task(engine.begin(SCOPE, "k1", FP))
    await asyncio.wait_for(signalling.subscribed.wait(), 10)
    await engine.complete(first.ticket, RESPONSE)
    decision = await asyncio.wait_for(waiter, 10)
    assert isinstance(decision, Replay)
    assert decision.response == RESPONSE


async def test_wait_mode_executes_again_once_the_first_request_releases(
    store: Store, clock: FakeClock
) -> None:
    signalling = SignallingStore(store)
    engine = engine_for(signalling, clock, wait=30.0)  # type: ignore[arg-type]
    first = await executed(engine)
    waiter = asyncio.create_task(engine.begin(SCOPE, "k1", FP))
    await asyncio.wait_for(signalling.subscribed.wait(), 10)
    await engine.release(first.ticket)
    decision = await asyncio.wait_for(waiter, 10)
    assert isinstance(decision, Execute)
    assert decision.ticket.fence > first.ticket.fence


async def test_wait_mode_gives_up_with_in_progress_after_its_bound(store: Store) -> None:
    engine = Engine(store, ttl=3600, lease=30, wait=0.2)
    await executed(engine)
    decision = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(decision, InProgress)


async def test_wait_mode_takes_over_when_the_lease_lapses(store: Store) -> None:
    # Real clock: the lease is a timer, so the waiter wakes when it runs out, not by luck.
    engine = Engine(store, ttl=3600, lease=0.3, wait=10.0)
    first = await executed(engine)
    decision = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(decision, Execute)
    assert decision.ticket.resumed is True
    assert decision.ticket.fence > first.ticket.fence


# -- concurrency within one process --------------------------------------------------------------


async def test_fifty_concurrent_claims_of_one_key_have_one_winner(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    decisions = await asyncio.gather(*(engine.begin(SCOPE, "race", FP) for _ in range(50)))
    winners = [d for d in decisions if isinstance(d, Execute)]
    assert len(winners) == 1
    assert all(isinstance(d, InProgress) for d in decisions if d is not winners[0])


async def test_concurrent_takeovers_of_an_expired_lease_have_one_winner(
    store: Store, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    await executed(engine, key="race")
    clock.advance(31)
    claims = await asyncio.gather(
        *(store.claim(SCOPE, "race", FP, now=clock.now, lease=30, ttl=3600) for _ in range(50))
    )
    outcomes = [c.outcome for c in claims]
    assert outcomes.count(ClaimOutcome.TAKEN_OVER) == 1
    assert outcomes.count(ClaimOutcome.EXISTING) == 49
