"""HttpAcquirer against the simulator: outcomes, retries with the same reference, unknown
outcomes settled by a look-up, the circuit breaker, and what counts as never sent — in-process
for speed, and against real uvicorn processes for stalls and dropped connections."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tenacity import wait_none

from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.acquirers.breaker import CircuitBreaker, consecutive_failures
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.metrics import REGISTRY
from oncepay.simulator import Faults, create_app
from tests.clock import FakeClock
from tests.payments.acquirer_helpers import (
    CountingApp,
    acquirer_args,
    authorizations_of,
    running_acquirer,
)
from tests.processes import PYTHONPATH, ROOT, free_port, running


def unique(prefix: str = "acq") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# Every attempt made, however the acquirer is doing: for the tests of retrying itself (adaptive
# retry control would rightly stop retrying an acquirer failing this often; see
# test_retry_control.py).
FIXED = RetryControl(mode="fixed")


def patient_breaker(name: str) -> CircuitBreaker:
    """A breaker that stays closed, for tests of retries rather than of the breaker."""
    return CircuitBreaker(name, trip=consecutive_failures(1000))


class Embedded:
    """A simulator in this process, the client under test, and an admin client beside it."""

    def __init__(self, database_url: str, faults: Faults | None = None, seed: int = 1) -> None:
        self.app = CountingApp(create_app(database_url, faults, seed))
        self.admin = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://acquirer"
        )

    def client(self, **options: Any) -> HttpAcquirer:
        name = unique()
        options.setdefault("backoff", wait_none())
        options.setdefault("breaker", patient_breaker(name))
        return HttpAcquirer(name, app=self.app, **options)

    async def set_faults(self, **faults: Any) -> None:
        response = await self.admin.put("/admin/faults", json=faults)
        assert response.status_code == 200, response.text

    async def authorizations(self, order_id: str) -> int:
        return len(await authorizations_of(self.admin, order_id))


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Embedded]:
    embedded = Embedded(f"sqlite:///{tmp_path / 'acquirer.db'}")
    yield embedded
    await embedded.admin.aclose()
    await embedded.app.state.simulator.aclose()


async def authorize(
    acquirer: HttpAcquirer, reference: str = "pay_1_a1", **overrides: Any
) -> AcquirerAnswer:
    arguments: dict[str, Any] = {
        "reference": reference,
        "order_id": reference.rsplit("_", 1)[0],
        "amount": 1000,
        "currency": "EUR",
        "payment_method": "pm_card_ok",
        "capture": False,
    }
    return await acquirer.authorize(**{**arguments, **overrides})


def calls(acquirer: HttpAcquirer, operation: str, outcome: str) -> float:
    labels = {"acquirer": acquirer.name, "operation": operation, "outcome": outcome}
    return REGISTRY.get_sample_value("oncepay_acquirer_calls_total", labels) or 0.0


# --- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "outcome", "decline_code"),
    [
        ("pm_card_ok", Outcome.APPROVED, None),
        ("pm_card_declined", Outcome.DECLINED, "card_declined"),
        ("pm_card_insufficient_funds", Outcome.DECLINED, "insufficient_funds"),
    ],
)
async def test_authorize_maps_the_acquirers_answer(
    sim: Embedded, method: str, outcome: Outcome, decline_code: str | None
) -> None:
    acquirer = sim.client()
    answer = await authorize(acquirer, payment_method=method)
    assert (answer.outcome, answer.decline_code) == (outcome, decline_code)
    assert answer.acquirer == acquirer.name
    assert answer.reference == "pay_1_a1"
    assert answer.authorization_id is not None
    assert answer.authorization_id.startswith("auth_")
    assert calls(acquirer, "authorize", outcome.value) == 1
    assert await sim.authorizations("pay_1") == 1, "the order is the payment"
    await acquirer.aclose()


async def test_capture_void_and_refund(sim: Embedded) -> None:
    acquirer = sim.client()
    first = (await authorize(acquirer, "pay_1_a1")).authorization_id
    second = (await authorize(acquirer, "pay_2_a1")).authorization_id
    assert first is not None
    assert second is not None
    captured = await acquirer.capture(reference="cap_1", authorization_id=first, amount=800)
    assert (captured.outcome, captured.authorization_id) == (Outcome.APPROVED, first)
    refunded = await acquirer.refund(reference="re_1", authorization_id=first, amount=300)
    assert refunded.outcome is Outcome.APPROVED
    voided = await acquirer.void(reference="void_2", authorization_id=second)
    assert voided.outcome is Outcome.APPROVED
    await acquirer.aclose()


async def test_a_refused_follow_on_is_declined_with_the_problems_code_and_not_retried(
    sim: Embedded,
) -> None:
    acquirer = sim.client(attempts=5)
    auth = (await authorize(acquirer)).authorization_id
    assert auth is not None
    before = sim.app.requests
    refused = await acquirer.refund(reference="re_1", authorization_id=auth, amount=1)
    assert (refused.outcome, refused.decline_code) == (Outcome.DECLINED, "not_captured")
    assert refused.detail
    assert sim.app.requests == before + 1, "a 4xx is never retried"
    await acquirer.aclose()


async def test_look_ups_map_to_approved_declined_and_not_found(sim: Embedded) -> None:
    acquirer = sim.client()
    approved = await authorize(acquirer, "pay_1_a1")
    await authorize(acquirer, "pay_2_a1", payment_method="pm_card_declined")
    assert approved.authorization_id is not None
    await acquirer.capture(reference="cap_1", authorization_id=approved.authorization_id, amount=5)

    found = await acquirer.lookup("pay_1_a1")
    assert (found.outcome, found.authorization_id) == (Outcome.APPROVED, approved.authorization_id)
    declined = await acquirer.lookup("pay_2_a1")
    assert (declined.outcome, declined.decline_code) == (Outcome.DECLINED, "card_declined")
    capture = await acquirer.lookup("cap_1")
    assert (capture.outcome, capture.authorization_id) == (
        Outcome.APPROVED,
        approved.authorization_id,
    )
    missing = await acquirer.lookup("pay_3_a1")
    assert missing.outcome is Outcome.NOT_FOUND
    assert calls(acquirer, "lookup", "not_found") == 1
    await acquirer.aclose()


async def test_an_authorization_of_a_fenced_reference_is_not_found(sim: Embedded) -> None:
    acquirer = sim.client()
    assert (await acquirer.lookup("pay_1_a1")).outcome is Outcome.NOT_FOUND
    late = await authorize(acquirer, "pay_1_a1")
    assert late.outcome is Outcome.NOT_FOUND, "provably did not and will not happen"
    assert await sim.authorizations("pay_1") == 0
    await acquirer.aclose()


# --- retries and unknown outcomes ---------------------------------------------------------


async def test_5xx_is_retried_with_the_same_reference_until_it_succeeds(tmp_path: Path) -> None:
    sim = Embedded(f"sqlite:///{tmp_path / 'a.db'}", Faults(error_rate=0.7), seed=3)
    acquirer = sim.client(attempts=30, control=FIXED)
    answer = await authorize(acquirer)
    assert answer.outcome is Outcome.APPROVED
    assert sim.app.requests > 1, "the seed makes the first attempts fail"
    assert calls(acquirer, "authorize", "error") == sim.app.requests - 1
    assert await sim.authorizations("pay_1") == 1
    await acquirer.aclose()
    await sim.admin.aclose()


async def test_5xx_until_the_budget_is_spent_is_unknown_but_maybe_sent(sim: Embedded) -> None:
    await sim.set_faults(error_rate=1.0)
    acquirer = sim.client(attempts=3)
    before = sim.app.requests
    answer = await authorize(acquirer)
    assert answer.outcome is Outcome.UNKNOWN
    assert answer.never_sent is False
    assert answer.detail is not None
    assert "503" in answer.detail
    assert sim.app.requests == before + 3
    await acquirer.aclose()


async def test_the_first_attempt_counts_as_tenacitys_first_for_stop_and_backoff(
    sim: Embedded,
) -> None:
    """The first attempt is made outside tenacity; a failed one is handed to it as its own
    first, so the backoff after it is attempt 1's and the attempts stop at the configured
    number, each sent once."""
    from tenacity import RetryCallState
    from tenacity.wait import wait_base

    numbers: list[int] = []

    class Recorded(wait_base):
        def __call__(self, retry_state: RetryCallState) -> float:
            numbers.append(retry_state.attempt_number)
            return 0.0

    await sim.set_faults(error_rate=1.0)
    acquirer = sim.client(attempts=3, control=FIXED, backoff=Recorded())
    before = sim.app.requests
    answer = await authorize(acquirer)
    assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
    assert numbers == [1, 2, 3], "tenacity works out a wait after each failed attempt"
    assert sim.app.requests == before + 3
    assert calls(acquirer, "authorize", "error") == 3
    await sim.set_faults(error_rate=0.0)
    numbers.clear()
    assert (await authorize(acquirer, "pay_2_a1")).outcome is Outcome.APPROVED
    assert numbers == [], "an answered first attempt: no tenacity, no wait"
    await acquirer.aclose()


async def test_a_timeout_after_commit_is_unknown_and_a_look_up_settles_it(sim: Embedded) -> None:
    await sim.set_faults(timeout_after_commit_rate=1.0, stall_seconds=60, operations=["authorize"])
    acquirer = sim.client(timeout=0.3, attempts=2)
    answer = await authorize(acquirer)
    assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
    settled = await acquirer.lookup("pay_1_a1")
    assert settled.outcome is Outcome.APPROVED
    assert settled.authorization_id is not None
    assert await sim.authorizations("pay_1") == 1, "both attempts, one authorization"
    await acquirer.aclose()


async def test_a_dropped_connection_is_unknown_and_a_look_up_settles_it(sim: Embedded) -> None:
    await sim.set_faults(drop_rate=1.0, operations=["authorize"])
    acquirer = sim.client(attempts=3)
    answer = await authorize(acquirer)
    assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
    assert "dropped" in (answer.detail or "")
    assert (await acquirer.lookup("pay_1_a1")).outcome is Outcome.APPROVED
    assert await sim.authorizations("pay_1") == 1
    await acquirer.aclose()


async def test_a_retry_after_a_dropped_answer_replays_it(tmp_path: Path) -> None:
    sim = Embedded(f"sqlite:///{tmp_path / 'a.db'}", Faults(drop_rate=0.5), seed=5)
    acquirer = sim.client(attempts=20, control=FIXED)
    answers = [await authorize(acquirer, f"pay_{i}_a1") for i in range(10)]
    assert {a.outcome for a in answers} == {Outcome.APPROVED}
    assert sim.app.requests > 10, "some answers were dropped and retried"
    for i in range(10):
        assert await sim.authorizations(f"pay_{i}") == 1
    await acquirer.aclose()
    await sim.admin.aclose()


async def test_the_timeout_holds_in_process_too(sim: Embedded) -> None:
    """httpx's ASGI transport ignores httpx timeouts: asyncio.timeout must hold instead."""
    await sim.set_faults(latency_ms=60_000, operations=["authorize"])
    acquirer = sim.client(timeout=0.2, attempts=2)
    answer = await authorize(acquirer)
    assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
    # The look-up on a client with room to answer: under load 0.2 s can pass before it does.
    patient = sim.client(timeout=10.0, attempts=2)
    assert (await patient.lookup("pay_1_a1")).outcome is Outcome.NOT_FOUND, "fenced now"
    assert await sim.authorizations("pay_1") == 0
    await acquirer.aclose()
    await patient.aclose()


async def test_a_refused_connection_is_unknown_and_never_sent() -> None:
    acquirer = HttpAcquirer(
        unique(), f"http://127.0.0.1:{free_port()}", attempts=3, backoff=wait_none()
    )
    answer = await authorize(acquirer)
    assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, True)
    assert calls(acquirer, "authorize", "error") == 3
    assert (await acquirer.lookup("pay_1_a1")).never_sent is True
    await acquirer.aclose()


# --- the breaker --------------------------------------------------------------------------


async def test_an_open_breaker_sends_nothing_and_answers_never_sent(sim: Embedded) -> None:
    await sim.set_faults(error_rate=1.0)
    clock = FakeClock()
    breaker = CircuitBreaker(unique(), trip=consecutive_failures(2), reset_timeout=10, clock=clock)
    acquirer = sim.client(attempts=5, breaker=breaker)
    before = sim.app.requests
    first = await authorize(acquirer)
    assert (first.outcome, first.never_sent) == (Outcome.UNKNOWN, False), "one attempt got 503"
    assert sim.app.requests == before + 2, "the breaker opened after two attempts"
    assert not acquirer.available()

    refused = await authorize(acquirer, "pay_2_a1")
    assert (refused.outcome, refused.never_sent) == (Outcome.UNKNOWN, True)
    assert sim.app.requests == before + 2, "nothing sent"
    assert calls(acquirer, "authorize", "breaker_open") == 1

    await sim.set_faults()
    clock.advance(10)
    assert acquirer.available()
    probe = await authorize(acquirer, "pay_2_a1")
    assert probe.outcome is Outcome.APPROVED
    assert breaker.state == "closed"
    await acquirer.aclose()


async def test_declines_and_refusals_do_not_trip_the_breaker(sim: Embedded) -> None:
    breaker = CircuitBreaker(unique(), trip=consecutive_failures(1))
    acquirer = sim.client(breaker=breaker)
    for i in range(5):
        declined = await authorize(acquirer, f"pay_{i}_a1", payment_method="pm_card_declined")
        assert declined.outcome is Outcome.DECLINED
        assert declined.authorization_id is not None
        refused = await acquirer.capture(
            reference=f"cap_{i}", authorization_id=declined.authorization_id, amount=5
        )
        assert refused.decline_code == "authorization_declined"
    assert breaker.state == "closed"
    assert acquirer.available()
    await acquirer.aclose()


async def test_calls_are_timed(sim: Embedded) -> None:
    acquirer = sim.client()
    await authorize(acquirer)
    labels = {"acquirer": acquirer.name, "operation": "authorize"}
    assert REGISTRY.get_sample_value("oncepay_acquirer_call_seconds_count", labels) == 1
    await acquirer.aclose()


async def test_closing_an_embedded_acquirer_closes_its_database(tmp_path: Path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'a.db'}")
    acquirer = HttpAcquirer(unique(), app=app)
    assert (await authorize(acquirer)).outcome is Outcome.APPROVED
    await acquirer.aclose()
    assert app.state.simulator.db.engine.pool.checkedout() == 0


async def test_an_odd_authorization_id_reaches_no_other_endpoint(sim: Embedded) -> None:
    acquirer = sim.client()
    answer = await acquirer.capture(reference="cap_1", authorization_id="../lookups?x", amount=5)
    assert answer.outcome is Outcome.DECLINED
    assert answer.decline_code in {"not_found", "authorization_not_found"}
    operations = (await sim.admin.get("/admin/operations")).json()["operations"]
    assert operations == [], "no look-up fenced anything"
    await acquirer.aclose()


def test_impossible_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="attempts"):
        HttpAcquirer("x", attempts=0)


# --- against real processes ---------------------------------------------------------------


async def clear_faults(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as admin:
        assert (await admin.put("/admin/faults", json={})).status_code == 200


def client_for(url: str, **options: Any) -> HttpAcquirer:
    name = unique()
    return HttpAcquirer(name, url, backoff=wait_none(), breaker=patient_breaker(name), **options)


@pytest.mark.slow
async def test_a_real_stall_after_commit_is_unknown_then_settled(tmp_path: Path) -> None:
    flags = ["--timeout-after-commit-rate", "1", "--stall-seconds", "30"]
    with running_acquirer(f"sqlite:///{tmp_path / 'a.db'}", *flags) as url:
        acquirer = client_for(url, timeout=0.5, attempts=2)
        answer = await authorize(acquirer)
        assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
        await clear_faults(url)
        settled = await acquirer.lookup("pay_1_a1")
        assert settled.outcome is Outcome.APPROVED
        async with httpx.AsyncClient(base_url=url) as admin:
            assert len(await authorizations_of(admin, "pay_1")) == 1
        await acquirer.aclose()


@pytest.mark.slow
async def test_a_real_dropped_connection_is_unknown_then_settled(tmp_path: Path) -> None:
    with running_acquirer(f"sqlite:///{tmp_path / 'a.db'}", "--drop-rate", "1") as url:
        acquirer = client_for(url, attempts=3)
        answer = await authorize(acquirer)
        assert (answer.outcome, answer.never_sent) == (Outcome.UNKNOWN, False)
        assert calls(acquirer, "authorize", "error") == 3
        await clear_faults(url)
        assert (await acquirer.lookup("pay_1_a1")).outcome is Outcome.APPROVED
        async with httpx.AsyncClient(base_url=url) as admin:
            assert len(await authorizations_of(admin, "pay_1")) == 1
        await acquirer.aclose()


@pytest.mark.slow
async def test_real_drops_and_errors_are_retried_to_one_authorization(tmp_path: Path) -> None:
    flags = ["--drop-rate", "0.3", "--error-rate", "0.3", "--seed", "11"]
    with running_acquirer(f"sqlite:///{tmp_path / 'a.db'}", *flags) as url:
        acquirer = client_for(url, attempts=30, control=FIXED)
        answers = [await authorize(acquirer, f"pay_{i}_a1") for i in range(10)]
        assert {a.outcome for a in answers} == {Outcome.APPROVED}
        assert calls(acquirer, "authorize", "error") > 0
        async with httpx.AsyncClient(base_url=url) as admin:
            for i in range(10):
                assert len(await authorizations_of(admin, f"pay_{i}")) == 1
        await acquirer.aclose()


@pytest.mark.slow
async def test_the_command_reads_its_options_from_the_environment(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "ONCEPAY_ACQUIRER_PORT": str(port),
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / 'env.db'}",
        "ONCEPAY_ACQUIRER_LATENCY_MS": "5",
        "ONCEPAY_ACQUIRER_ERROR_RATE": "0.25",
        "ONCEPAY_ACQUIRER_OUTAGE": "true",
    }
    args = [sys.executable, "-m", "oncepay.simulator.command"]
    with running(args, port, env):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as admin:
            faults = (await admin.get("/admin/faults")).json()
    assert (faults["latency_ms"], faults["error_rate"], faults["outage"]) == (5, 0.25, True)


@pytest.mark.parametrize(
    "flags", [["--error-rate", "2"], ["--database-url", "mysql://x"], ["--drop-rate", "-1"]]
)
def test_the_command_refuses_impossible_options(flags: list[str]) -> None:
    args = acquirer_args(free_port(), "sqlite:///unused.db", *flags)
    env = {**os.environ, "PYTHONPATH": PYTHONPATH}
    done = subprocess.run(args, env=env, capture_output=True, timeout=60, check=False, cwd=ROOT)
    assert done.returncode == 2, done.stderr
