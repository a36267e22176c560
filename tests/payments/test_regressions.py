"""Regressions found by review, each a path to a broken promise: an unknown outcome outliving
its key's TTL, a stale holder failing over a payment already recorded failed, a lost phase-1
commit acknowledgement, follow-on unknowns that never clear or escalate, and a stale holder's
wrong answer; and the keep-alive pass of unfinished keys touching live or locked records. Each
test failed on the code before its fix."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import oncepay.payments.phases as phases
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.operations import Capture
from oncepay.payments.recovery import keep_unfinished, reap, recover_once
from oncepay.payments.storage.idempotency import IDEMPOTENCY_TABLE
from oncepay.storage.db import Database
from oncepay.storage.db import write as real_write
from tests.payments.stack import BACKOFF, Stack, database_url, running_stack
from tests.payments.test_recovery import BODY, Crash, crash_in
from tests.servers import require_postgres

DAY = 24 * 3600.0


async def recover(stack: Stack) -> dict[str, int]:
    return dict((await recover_once(stack.services, now=stack.clock())).results)


async def test_an_unknown_outcome_outlives_the_keys_ttl(stack: Stack) -> None:
    """Recovery finds requests through their keys: a key past its TTL would stop recovery, be
    purged, and make the client's retry a second payment."""
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5)
    assert (await stack.pay(key="order-42")).status_code == 503
    [first] = (await stack.client.get("/v1/payments")).json()["data"]
    stack.clock.advance(BACKOFF[0] + 1)
    assert await recover(stack) == {"unknown": 1}
    stack.clock.advance(2 * DAY)  # a two-day acquirer incident, past the 24 h TTL
    await keep_unfinished(stack.services, now=stack.clock())
    assert await reap(stack.services, now=stack.clock()) == 0  # not purged: unfinished
    assert await recover(stack) == {"unknown": 1}  # still asked
    await stack.faults()
    stack.clock.advance(BACKOFF[-1] + 60)  # and past the breaker's reset after the incident
    assert await recover(stack) == {"finished": 1}
    retry = await stack.pay(key="order-42")
    assert retry.status_code == 201
    assert retry.json()["id"] == first["id"]  # the same payment, replayed
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(first["id"]) == 1


async def test_a_stale_holder_cannot_fail_over_a_failed_payment(
    two_acquirers: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first holder's call is slow; meanwhile its lease lapses and the worker, seeing no
    acquirer available, records the payment failed. The first holder must not then move the
    failed payment to the secondary and authorize it there."""
    stack = two_acquirers
    real_authorize = HttpAcquirer.authorize
    down = {"on": False}
    calls = {"n": 0}

    async def authorize(self: HttpAcquirer, **kwargs: Any) -> AcquirerAnswer:
        calls["n"] += 1
        if self.name == "primary" and calls["n"] == 1:
            stack.expire_leases()
            down["on"] = True
            await recover(stack)
            down["on"] = False
            return AcquirerAnswer(Outcome.UNKNOWN, "primary", kwargs["reference"], detail="slow")
        return await real_authorize(self, **kwargs)

    monkeypatch.setattr(HttpAcquirer, "authorize", authorize)
    monkeypatch.setattr(HttpAcquirer, "available", lambda self: not down["on"])
    first = await stack.pay(key="k1")
    assert first.status_code == 409  # the stale holder lost its lease: told to retry
    assert first.json()["code"] == "idempotency_lease_lost"
    replay = await stack.pay(key="k1")
    payment = replay.json()
    assert (payment["status"], payment["failure_code"]) == ("failed", "acquirer_unavailable")
    assert await stack.approved_authorizations(payment["id"]) == 0
    assert await stack.operations(payment["id"], "secondary") == []


async def test_a_lost_commit_acknowledgement_in_phase_1_keeps_the_key(
    stack: Stack, usual_way: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phase 1 commits but the acknowledgement is lost: releasing the key would let the retry
    create a second payment beside the first."""
    calls = {"n": 0}

    @asynccontextmanager
    async def flaky_write(db: Database) -> AsyncIterator[Any]:
        calls["n"] += 1
        async with real_write(db) as conn:
            yield conn
        if calls["n"] == 1:
            raise ConnectionResetError("connection lost during COMMIT")

    monkeypatch.setattr(phases, "write", flaky_write)
    await _503_then_resumed(stack, monkeypatch, "order-7")


async def _503_then_resumed(stack: Stack, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    """With the fault patched in: the payment is a 503 ``database_unavailable`` and its key
    stays locked past phase 1; with it undone, the retry after the lease resumes it into one
    payment, authorized once."""
    lost = await stack.pay(key=key)
    assert (lost.status_code, lost.json()["code"]) == (503, "database_unavailable")
    record = await stack.services.engine.store.get(stack.merchant.id, key)
    assert record is not None
    assert record.state == "executing"
    assert record.recovery_point is not None
    monkeypatch.undo()
    stack.expire_leases()
    retry = await stack.pay(key=key)
    assert retry.status_code == 201, retry.text
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(retry.json()["id"]) == 1


async def test_a_driver_error_in_the_completion_is_a_503_and_the_key_resumes(
    stack: Stack, usual_way: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idempotency store's statements inside a phase run on the raw driver, whose errors
    are the driver's own (on PostgreSQL they also carry the phase's deferred writes): the
    database failing there is a 503 to retry, as SQLAlchemy's errors are, not a 500."""
    import sqlite3

    import asyncpg

    from oncepay.idempotency.engine import Engine

    failure: Exception = (
        sqlite3.OperationalError("disk I/O error")
        if stack.db.is_sqlite
        else asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    )

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise failure

    monkeypatch.setattr(Engine, "acomplete_in", failing)
    await _503_then_resumed(stack, monkeypatch, "order-8")


@pytest.mark.parametrize("operation", ["capture", "refund"])
async def test_a_resolved_follow_on_clears_the_unknown_outcome(
    stack: Stack, operation: str
) -> None:
    manual = operation == "capture"
    pid = (await stack.pay(capture_method="manual" if manual else "automatic")).json()["id"]
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5,
                       operations=[operation, "lookup"])  # fmt: skip
    path = f"/v1/payments/{pid}/{'capture' if manual else 'refunds'}"
    body = None if manual else {"amount": 100}
    assert (await stack.post(path, body, key="op")).status_code == 503
    await stack.faults()
    stack.clock.advance(BACKOFF[0] + 0.1)
    assert await recover(stack) == {"finished": 1}
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert payment["outcome_unknown"] is False
    refund = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 100})
    assert refund.status_code == 201, refund.text
    assert await stack.ledger_violations() == []


async def test_a_later_unknown_outcome_starts_the_schedule_afresh(stack: Stack) -> None:
    await stack.faults(outage=True)
    assert (await stack.pay(key="dark", capture_method="manual")).status_code == 503
    pid = (await stack.client.get("/v1/payments")).json()["data"][0]["id"]
    for delay in BACKOFF:
        stack.clock.advance(delay + 60.1)
        await recover(stack)
    await stack.faults()
    stack.clock.advance(BACKOFF[-1] + 60)
    assert await recover(stack) == {"finished": 1}
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5, operations=["capture"])
    capture = await stack.post(f"/v1/payments/{pid}/capture", key="cap")
    assert capture.status_code == 503
    assert int(capture.headers["retry-after"]) == int(BACKOFF[0])
    for _ in range(len(BACKOFF) + 1):
        stack.clock.advance(BACKOFF[-1] + 60)
        await recover(stack)
    escalated = await stack.client.get("/v1/events", params={"type": "payment.recovery_escalated"})
    assert len(escalated.json()["data"]) == 2


async def test_a_stale_holder_is_told_to_retry_not_that_it_failed(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A capture whose holder lost its lease while the worker finished it: the holder's client
    gets 409 lease lost (retry), and the retry replays the capture that succeeded."""
    pid = (await stack.pay(capture_method="manual")).json()["id"]
    original = Capture.call
    calls = {"n": 0}

    async def slow_call(self: Capture, svc: Any, object_id: str, *args: Any) -> AcquirerAnswer:
        answer = await original(self, svc, object_id, *args)
        calls["n"] += 1
        if calls["n"] == 1:
            stack.expire_leases()
            assert await recover(stack) == {"finished": 1}
        return answer

    monkeypatch.setattr(Capture, "call", slow_call)
    first = await stack.post(f"/v1/payments/{pid}/capture", key="cap-stale")
    assert (first.status_code, first.json()["code"]) == (409, "idempotency_lease_lost")
    replay = await stack.post(f"/v1/payments/{pid}/capture", key="cap-stale")
    assert (replay.status_code, replay.json()["status"]) == (200, "captured")
    assert await stack.ledger_violations() == []


async def test_keep_unfinished_extends_only_abandoned_requests(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an abandoned unfinished request (lease lapsed, a recovery point) has its expiry
    pushed out; a live one, still running under its lease, is left to its holder."""
    with crash_in(monkeypatch, "call"), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="abandoned")
    stack.expire_leases()
    with crash_in(monkeypatch, "call"), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="live")  # its lease runs from now

    async def expiry(key: str) -> float:
        record = await stack.services.engine.store.get(stack.merchant.id, key)
        assert record is not None
        return record.expires_at

    live_before = await expiry("live")
    assert await keep_unfinished(stack.services, now=stack.clock()) == 1
    retention = stack.services.settings.unfinished_retention
    assert await expiry("abandoned") == stack.clock() + retention
    assert await expiry("live") == live_before
    # A second pass finds nothing left to extend (it is already past the half-way mark).
    assert await keep_unfinished(stack.services, now=stack.clock()) == 0


@pytest.mark.postgres
async def test_keep_unfinished_skips_a_record_a_phase_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A phase holds its record's row lock while it runs; the keep-alive pass skips that row
    instead of waiting for it (it used to wait, and could deadlock with the phase). PostgreSQL
    only: on SQLite the pass and a phase are both writers and never overlap."""
    require_postgres()
    async with running_stack(database_url("postgres", tmp_path), tmp_path) as stack:
        with crash_in(monkeypatch, "call"), pytest.raises(Crash):
            await stack.post("/v1/payments", BODY, key="held")
        stack.expire_leases()
        held = f"SELECT 1 FROM {IDEMPOTENCY_TABLE} WHERE idempotency_key = 'held' FOR UPDATE"
        async with real_write(stack.db) as phase:  # another holder's phase, mid-transaction
            await phase.execute(text(held))
            kept = await asyncio.wait_for(keep_unfinished(stack.services, now=stack.clock()), 10)
            assert kept == 0
        assert await keep_unfinished(stack.services, now=stack.clock()) == 1  # once it is free
