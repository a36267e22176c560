"""Crash recovery through atomic phases (SPEC §5): for each recovery point, the request dies
right after it; then a retry with the same key, or the recovery worker, finishes it. Each time
the acquirer shows exactly one authorization and the ledger balances.

A crash is a ``BaseException`` raised at the point, which nothing in the service catches — as
good as the process dying there: no release, no cleanup, the key stays locked until its lease
lapses (the test moves the engine's clock past it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from oncepay.idempotency.engine import Engine, Execute
from oncepay.idempotency.keys import fingerprint
from oncepay.payments.operations import CreatePayment
from oncepay.payments.recovery import recover_once
from oncepay.storage.db import write
from tests.payments.stack import BACKOFF, Stack


class Crash(BaseException):
    """The process 'dies' here."""


@contextmanager
def crash_in(
    monkeypatch: pytest.MonkeyPatch, method: str, owner: Any = CreatePayment
) -> Iterator[None]:
    """Make <owner>.<method> (CreatePayment's by default) die once, at its start."""
    original = getattr(owner, method)
    calls = {"n": 0}

    async def dying(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise Crash(method)
        return await original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(owner, method, dying)
        yield


BODY = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_ok"}

# Where the request dies, and the recovery point its record then shows. Phase 2 records the
# answer and stores the response in one transaction (SPEC §5 lets them commit together): a
# death anywhere in it, even at the completion after the ledger and events were written,
# rolls back to payment_created.
CRASH_POINTS = [
    pytest.param("call", "payment_created", id="after-payment_created"),
    pytest.param("record", "payment_created", id="after-acquirer-answered"),
    pytest.param("acomplete_in", "payment_created", id="at-the-completion"),
]


def crash_at(monkeypatch: pytest.MonkeyPatch, method: str) -> Any:
    return crash_in(monkeypatch, method, Engine if method == "acomplete_in" else CreatePayment)


async def record_of(stack: Stack, key: str) -> Any:
    return await stack.services.engine.store.get(stack.merchant.id, key)


async def assert_exactly_once(stack: Stack, payment: dict[str, Any]) -> None:
    assert payment["status"] == "captured"
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(payment["id"]) == 1
    assert await stack.ledger_violations() == []
    events = (await stack.client.get("/v1/events", params={"type": "payment.captured"})).json()
    assert len(events["data"]) == 1


@pytest.mark.parametrize(("method", "point"), CRASH_POINTS)
async def test_crash_then_retry_resumes(
    stack: Stack, usual_way: None, monkeypatch: pytest.MonkeyPatch, method: str, point: str
) -> None:
    with crash_at(monkeypatch, method), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="crashy")
    record = await record_of(stack, "crashy")
    assert record.state == "executing"
    assert record.recovery_point.startswith(f"{point}:create:pay_")
    # While the dead request's lease runs, a retry is told to wait: nothing runs twice.
    busy = await stack.post("/v1/payments", BODY, key="crashy")
    assert busy.status_code == 409
    stack.expire_leases()
    resumed = await stack.post("/v1/payments", BODY, key="crashy")
    assert resumed.status_code == 201, resumed.text
    await assert_exactly_once(stack, resumed.json())
    replay = await stack.post("/v1/payments", BODY, key="crashy")
    assert replay.content == resumed.content
    assert replay.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(("method", "point"), CRASH_POINTS)
async def test_crash_then_worker_finishes(
    stack: Stack, usual_way: None, monkeypatch: pytest.MonkeyPatch, method: str, point: str
) -> None:
    with crash_at(monkeypatch, method), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="crashy")
    report = await recover_once(stack.services, now=stack.clock())
    assert report.total == 0  # the lease still runs: the worker leaves it alone
    stack.expire_leases()
    report = await recover_once(stack.services, now=stack.clock())
    assert dict(report.results) == {"finished": 1}
    record = await record_of(stack, "crashy")
    assert record.state == "completed"
    # The client's retry gets the answer the worker stored.
    replay = await stack.post("/v1/payments", BODY, key="crashy")
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    await assert_exactly_once(stack, replay.json())


async def test_a_record_left_at_acquirer_called_by_an_earlier_version_is_finished(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Earlier versions committed the answer (phase 2) apart from the stored response (phase
    3), with the recovery point acquirer_called between them: such a record still finishes,
    by storing the response only (the acquirer is not asked again)."""
    with crash_at(monkeypatch, "call"), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="old")
    stack.expire_leases()
    record = await record_of(stack, "old")
    decision = await stack.services.engine.begin(stack.merchant.id, "old", record.fingerprint)
    assert isinstance(decision, Execute)
    ticket, pid = decision.ticket, record.recovery_point.rpartition(":")[2]
    op, svc = CreatePayment(), stack.services
    answer = await op.call(svc, pid, ticket)
    async with write(svc.db) as conn:  # phase 2 as earlier versions committed it
        ticket = await svc.engine.acheckpoint_in(conn, ticket, f"acquirer_called:create:{pid}")
        await op.record(conn, svc, pid, answer)
    stack.expire_leases()
    with crash_at(monkeypatch, "call"):  # were it asked again, the request would die
        resumed = await stack.post("/v1/payments", BODY, key="old")
    assert resumed.status_code == 201, resumed.text
    await assert_exactly_once(stack, resumed.json())


async def test_crash_right_after_the_claim_starts_afresh(stack: Stack) -> None:
    """Died after claiming, before phase 1 committed: nothing exists, so the retry that takes
    the key over simply runs the request."""
    path = "/v1/payments"
    import json as jsonlib

    fp = fingerprint("POST", path, jsonlib.dumps(BODY).encode())
    decision = await stack.services.engine.begin(stack.merchant.id, "early", fp)
    assert isinstance(decision, Execute)  # ... and then the process died
    stack.expire_leases()
    assert (await recover_once(stack.services, now=stack.clock())).total == 0
    response = await stack.post(path, BODY, key="early")
    assert response.status_code == 201, response.text
    await assert_exactly_once(stack, response.json())


@pytest.mark.parametrize(
    ("owner", "method"),
    [
        pytest.param(Engine, "aclaim_in", id="at-the-claim"),
        pytest.param(CreatePayment, "start", id="in-phase-1"),
        pytest.param(Engine, "acheckpoint_in", id="at-phase-1s-recovery-point"),
    ],
)
async def test_a_crash_before_the_claim_and_phase_1_commit_leaves_nothing(
    stack: Stack, usual_way: None, monkeypatch: pytest.MonkeyPatch, owner: Any, method: str
) -> None:
    """A new key is claimed in phase 1's own transaction (SPEC §5): a death anywhere in it,
    even after the payment row and its recovery point were written, rolls the claim back with
    the payment, so there is no record to wait for: the retry runs the request at once."""
    with crash_in(monkeypatch, method, owner), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="first")
    assert await record_of(stack, "first") is None
    assert await stack.count("payments") == 0
    assert await stack.count("events") == 0
    response = await stack.post("/v1/payments", BODY, key="first")
    assert response.status_code == 201, response.text
    await assert_exactly_once(stack, response.json())
    record = await record_of(stack, "first")
    assert record.state == "completed"


async def test_unknown_outcome_resolved_by_lookup_in_the_same_request(stack: Stack) -> None:
    """The authorization commits but its answer never arrives; the fencing look-up finds it."""
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5, operations=["authorize"])
    response = await stack.pay(key="slow")
    assert response.status_code == 201, response.text
    await assert_exactly_once(stack, response.json())


async def test_unknown_outcome_waits_for_recovery(stack: Stack) -> None:
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5)  # look-ups stall too
    response = await stack.pay(key="unknown", capture_method="manual")
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "acquirer_outcome_unknown"
    assert int(response.headers["retry-after"]) == int(BACKOFF[0])
    assert "idempotency-key-expires" not in response.headers  # nothing stored under it yet
    [payment] = (await stack.client.get("/v1/payments")).json()["data"]
    assert (payment["status"], payment["outcome_unknown"]) == ("processing", True)
    # No follow-on operation runs on it while its outcome is unknown.
    capture = await stack.post(f"/v1/payments/{payment['id']}/capture")
    assert capture.status_code == 409
    assert capture.json()["code"] == "payment_outcome_unknown"
    assert "idempotency-key-expires" not in capture.headers  # its key released: retry later
    await stack.faults()  # the acquirer answers again
    stack.clock.advance(BACKOFF[0] + 0.1)
    assert dict((await recover_once(stack.services, now=stack.clock())).results) == {"finished": 1}
    replay = await stack.pay(key="unknown", capture_method="manual")
    assert replay.status_code == 201
    assert replay.json()["status"] == "authorized"
    assert replay.json()["outcome_unknown"] is False
    assert "idempotency-key-expires" in replay.headers
    assert await stack.approved_authorizations(payment["id"]) == 1
    assert await stack.ledger_violations() == []


async def test_unknown_outcome_is_escalated_never_guessed(stack: Stack) -> None:
    await stack.faults(outage=True)
    first = await stack.pay(key="dark")
    assert first.status_code == 503
    pid = (await stack.client.get("/v1/payments")).json()["data"][0]["id"]
    for delay in BACKOFF:
        stack.clock.advance(delay + 0.1)
        stack.clock.advance(60)  # and past the breaker's reset, so each pass really asks
        report = await recover_once(stack.services, now=stack.clock())
        assert dict(report.results) == {"unknown": 1}
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (payment["status"], payment["outcome_unknown"]) == ("processing", True)
    escalations = await stack.client.get(
        "/v1/events", params={"type": "payment.recovery_escalated"}
    )
    assert len(escalations.json()["data"]) == 1
    metrics = (await stack.client.get("/metrics")).text
    assert "oncepay_recovery_escalations_total" in metrics
    # The acquirer comes back: the look-up proves nothing happened, a new attempt authorizes.
    await stack.faults()
    stack.clock.advance(BACKOFF[-1] + 60)
    assert dict((await recover_once(stack.services, now=stack.clock())).results) == {"finished": 1}
    final = await stack.pay(key="dark")
    assert final.status_code == 201
    await assert_exactly_once(stack, final.json())
    references = [op["reference"] for op in await stack.operations(pid)]
    assert f"{pid}_a2" in references  # attempt 1 was fenced by the look-up, attempt 2 ran
