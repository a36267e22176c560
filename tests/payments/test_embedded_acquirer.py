"""The embedded simulator called as a function (``EmbeddedAcquirer``, what ``oncepay serve``
uses with no acquirer URL): the same answers, idempotency and faults as over HTTP, since a
request may meet the simulator either way (its HTTP routes stay for settlement reports)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.payments.acquirers.base import Outcome
from oncepay.payments.acquirers.breaker import CircuitBreaker, consecutive_failures
from oncepay.payments.acquirers.embedded import EmbeddedAcquirer
from oncepay.payments.bootstrap import build_acquirers
from oncepay.payments.settings import Settings
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.simulator import Faults, create_app
from oncepay.simulator.direct import call
from tests.payments.acquirer_helpers import authorizations_of

AUTHORIZE: dict[str, Any] = {
    "reference": "pay_1_a1",
    "order_id": "pay_1",
    "amount": 1000,
    "currency": "EUR",
    "payment_method": "pm_card_ok",
    "capture": False,
}


class Both:
    """One simulator, reached directly and over its HTTP routes."""

    def __init__(self, tmp_path: Path) -> None:
        self.app = create_app(f"sqlite:///{tmp_path / 'acquirer.db'}", seed=1)
        self.sim = self.app.state.simulator
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://acquirer"
        )
        name = "primary"
        breaker = CircuitBreaker(name, trip=consecutive_failures(1000))
        self.acquirer = EmbeddedAcquirer(name, self.app, timeout=2, attempts=2, breaker=breaker)

    async def direct(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        status, content, document = await call(self.sim, path, body, body.get("reference", "-"))
        if document is not None:  # handed back as made: what the body encodes, exactly
            assert document == json.loads(content)
        return status, content

    async def over_http(self, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
        headers = {"Idempotency-Key": body.get("reference", "-")}
        response = await self.http.post(path, json=body, headers=headers)
        return response.status_code, response.content


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    pair = Both(tmp_path)
    yield pair
    await pair.http.aclose()
    await pair.acquirer.aclose()


async def test_a_direct_call_and_its_http_repeat_are_one_operation(both: Both) -> None:
    first = await both.direct("/v1/authorizations", AUTHORIZE)
    assert first[0] == 201
    # The same request over HTTP: the same fingerprint, so the stored answer, byte for byte.
    assert await both.over_http("/v1/authorizations", AUTHORIZE) == first
    assert await both.direct("/v1/authorizations", AUTHORIZE) == first
    assert len(await authorizations_of(both.http, "pay_1")) == 1


async def test_an_http_call_and_its_direct_repeat_are_one_operation(both: Both) -> None:
    first = await both.over_http("/v1/authorizations", AUTHORIZE)
    auth_id = httpx.Response(201, content=first[1]).json()["id"]
    capture = {"reference": "cap_1", "amount": 600}
    path = f"/v1/authorizations/{auth_id}/capture"
    captured = await both.over_http(path, capture)
    assert captured[0] == 201
    assert await both.direct(path, capture) == captured
    assert await both.direct("/v1/lookups", {"reference": "cap_1"}) == (200, captured[1])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/authorizations", {**AUTHORIZE, "amount": -1}),
        ("/v1/authorizations", {**AUTHORIZE, "surprise": 1}),
        ("/v1/authorizations", {**AUTHORIZE, "payment_method": "pm_nope"}),
        ("/v1/authorizations/auth_missing/capture", {"reference": "c", "amount": 5}),
        ("/v1/authorizations/auth_missing/undo", {"reference": "c"}),
        ("/v1/elsewhere", {"reference": "c"}),
    ],
)
async def test_refusals_are_the_http_routes_refusals(
    both: Both, path: str, body: dict[str, Any]
) -> None:
    assert await both.direct(path, body) == await both.over_http(path, body)


async def test_a_repeated_reference_with_another_body_is_refused(both: Both) -> None:
    await both.direct("/v1/authorizations", AUTHORIZE)
    status, body = await both.direct("/v1/authorizations", {**AUTHORIZE, "amount": 5})
    assert (status, httpx.Response(status, content=body).json()["code"]) == (
        422,
        "idempotency_key_reused",
    )


async def test_the_embedded_acquirer_moves_money_once(both: Both) -> None:
    acquirer = both.acquirer
    answer = await acquirer.authorize(**AUTHORIZE)
    assert answer.outcome is Outcome.APPROVED
    assert answer.authorization_id is not None
    assert await acquirer.authorize(**AUTHORIZE) == answer  # harmless to repeat
    auth_id = answer.authorization_id
    captured = await acquirer.capture(reference="cap_1", authorization_id=auth_id, amount=1000)
    assert captured.outcome is Outcome.APPROVED
    again = await acquirer.void(reference="void_1", authorization_id=auth_id)
    assert (again.outcome, again.decline_code) == (Outcome.DECLINED, "already_captured")
    assert (await acquirer.lookup("cap_1")).outcome is Outcome.APPROVED
    declined = await acquirer.authorize(
        **{
            **AUTHORIZE,
            "reference": "pay_2_a1",
            "order_id": "pay_2",
            "payment_method": "pm_card_declined",
        }
    )
    assert (declined.outcome, declined.decline_code) == (Outcome.DECLINED, "card_declined")
    assert len(await authorizations_of(both.http, "pay_1")) == 1


async def test_a_fenced_reference_never_authorizes(both: Both) -> None:
    assert (await both.acquirer.lookup("pay_1_a1")).outcome is Outcome.NOT_FOUND
    assert (await both.acquirer.authorize(**AUTHORIZE)).outcome is Outcome.NOT_FOUND
    assert await authorizations_of(both.http, "pay_1") == []


async def test_a_dropped_answer_is_unknown_and_the_look_up_settles_it(both: Both) -> None:
    both.sim.faults = Faults(drop_rate=1.0, operations=frozenset({"authorize"}))
    answer = await both.acquirer.authorize(**AUTHORIZE)
    assert answer.outcome is Outcome.UNKNOWN
    assert not answer.never_sent
    assert "connection dropped" in (answer.detail or "")
    assert len(await authorizations_of(both.http, "pay_1")) == 1  # committed, then dropped
    assert (await both.acquirer.lookup("pay_1_a1")).outcome is Outcome.APPROVED


async def test_a_5xx_is_retried_with_the_same_reference_then_unknown(both: Both) -> None:
    both.sim.faults = Faults(error_rate=1.0, operations=frozenset({"authorize"}))
    answer = await both.acquirer.authorize(**AUTHORIZE)
    assert answer.outcome is Outcome.UNKNOWN
    assert "503" in (answer.detail or "")
    both.sim.faults = Faults()
    assert (await both.acquirer.authorize(**AUTHORIZE)).outcome is Outcome.APPROVED


async def test_a_stall_after_the_commit_times_out_as_unknown_and_the_authorization_stands(
    both: Both,
) -> None:
    """The attempt's timeout (kept by a timer on the caller's task) cuts a stall after the
    commit: an unknown outcome that may have reached the acquirer; the look-up settles it."""
    both.sim.faults = Faults(
        timeout_after_commit_rate=1.0, stall_seconds=60, operations=frozenset({"authorize"})
    )
    both.acquirer.timeout, both.acquirer.attempts = 0.2, 1
    started = asyncio.get_running_loop().time()
    answer = await both.acquirer.authorize(**AUTHORIZE)
    assert asyncio.get_running_loop().time() - started < 30  # not the 60 s stall
    assert answer.outcome is Outcome.UNKNOWN
    assert not answer.never_sent
    assert "TimeoutError" in (answer.detail or "")
    both.sim.faults = Faults()
    assert (await both.acquirer.lookup("pay_1_a1")).outcome is Outcome.APPROVED
    assert len(await authorizations_of(both.http, "pay_1")) == 1


async def test_a_cancelled_caller_is_cancelled_and_the_operation_still_runs_to_its_end(
    both: Both,
) -> None:
    """Cancelling the caller (not its timer) is a cancellation, not a timeout; the money move
    it started goes on to its commit, as a server's does when its client hangs up."""
    await both.sim.ready()
    await both.sim.db.writers.acquire()  # the simulator's writers wait: the move is in flight
    try:
        caller = asyncio.create_task(both.acquirer.authorize(**AUTHORIZE))
        for _ in range(1000):  # turns of the loop until the money move's own task has started
            if both.sim._inflight:
                break
            await asyncio.sleep(0)
        else:
            pytest.fail("the money move never started in a task of its own")
        moving = next(iter(both.sim._inflight))
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert not moving.done()  # cancelling the caller did not cancel the move
    finally:
        both.sim.db.writers.release()
    await moving
    assert len(await authorizations_of(both.http, "pay_1")) == 1
    assert (await both.acquirer.lookup("pay_1_a1")).outcome is Outcome.APPROVED


async def test_a_move_cancelled_under_its_caller_cancels_the_wait_as_shield_does(
    both: Both,
) -> None:
    await both.sim.ready()
    await both.sim.db.writers.acquire()
    try:
        caller = asyncio.create_task(both.acquirer.authorize(**AUTHORIZE))
        for _ in range(1000):
            if both.sim._inflight:
                break
            await asyncio.sleep(0)
        else:
            pytest.fail("the money move never started in a task of its own")
        next(iter(both.sim._inflight)).cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, 10)  # the waiter must not be left hanging
    finally:
        both.sim.db.writers.release()
    assert await authorizations_of(both.http, "pay_1") == []


async def test_a_move_that_fails_hands_its_error_to_the_caller(
    both: Both, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The move's own task fails: its caller sees a failed attempt (maybe reached)."""
    await both.sim.ready()

    async def broken(*_: Any) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(both.sim.db.writer), "get_driver", broken)
    both.acquirer.attempts = 1
    answer = await both.acquirer.authorize(**AUTHORIZE)
    assert answer.outcome is Outcome.UNKNOWN
    assert not answer.never_sent
    assert "disk on fire" in (answer.detail or "")
    assert not both.sim._inflight


async def test_serve_embeds_it_and_its_reports_still_come_over_its_routes(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'p.db'}",
        acquirer_database_url=f"sqlite:///{tmp_path / 'a.db'}",
    )
    pool = build_acquirers(settings)
    try:
        primary = pool["primary"]
        assert isinstance(primary, EmbeddedAcquirer)
        assert (await primary.authorize(**AUTHORIZE)).outcome is Outcome.APPROVED
        reports = AcquirerReports.of(primary)
        today = datetime.now(UTC).date()
        rows = await reports.authorizations(today)
        assert [a.reference for a in rows] == ["pay_1_a1"]
    finally:
        await pool.aclose()
