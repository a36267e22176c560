"""Two acquirers (SPEC §5): fail over only when the primary attempt is proven not to have
authorized; a circuit breaker per acquirer; declines are not failures."""

from __future__ import annotations

import asyncio

from oncepay.payments.acquirers.breaker import BreakerState
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import HttpAcquirer
from tests.payments.stack import Stack


def breaker_of(stack: Stack, name: str) -> BreakerState:
    acquirer = stack.services.acquirers[name]
    return acquirer.breaker.state  # type: ignore[attr-defined,no-any-return]


async def test_primary_refusing_before_acting_fails_over(two_acquirers: Stack) -> None:
    stack = two_acquirers
    await stack.faults("primary", error_rate=1.0, operations=["authorize"])
    response = await stack.pay()
    assert response.status_code == 201, response.text
    payment = response.json()
    assert (payment["status"], payment["acquirer"]) == ("captured", "secondary")
    # The primary's attempt was fenced by the look-up: it can never authorize later.
    [fenced] = await stack.operations(None, "primary")
    assert (fenced["reference"], fenced["status"]) == (f"{payment['id']}_a1", "fenced")
    assert await stack.approved_authorizations(payment["id"]) == 1
    assert await stack.ledger_violations() == []


async def test_primary_that_authorized_but_timed_out_is_not_failed_over(
    two_acquirers: Stack,
) -> None:
    stack = two_acquirers
    await stack.faults("primary", timeout_after_commit_rate=1.0, stall_seconds=5,
                       operations=["authorize"])  # fmt: skip
    payment = (await stack.pay()).json()
    assert (payment["status"], payment["acquirer"]) == ("captured", "primary")
    assert await stack.operations(payment["id"], "secondary") == []
    assert await stack.approved_authorizations(payment["id"]) == 1


async def test_unknown_at_the_primary_never_goes_to_the_secondary(two_acquirers: Stack) -> None:
    stack = two_acquirers
    await stack.faults("primary", timeout_after_commit_rate=1.0, stall_seconds=5)
    response = await stack.pay()
    assert response.status_code == 503
    assert response.json()["code"] == "acquirer_outcome_unknown"
    pid = (await stack.client.get("/v1/payments")).json()["data"][0]["id"]
    assert await stack.operations(pid, "secondary") == []


async def test_unreachable_primary_fails_over_without_a_lookup(tmp_path: object) -> None:
    """Connection refused: provably never sent, so the secondary is safe at once."""
    from pathlib import Path

    from oncepay.payments.acquirers.http import HttpAcquirer
    from oncepay.payments.acquirers.pool import AcquirerPool
    from oncepay.payments.api.app import create_app
    from oncepay.payments.bootstrap import start
    from oncepay.payments.merchants import create_merchant
    from oncepay.payments.settings import Settings
    from oncepay.simulator import create_app as create_simulator
    from tests.processes import free_port

    path = Path(str(tmp_path))
    secondary_app = create_simulator(f"sqlite:///{path / 'b.db'}")
    acquirers = AcquirerPool(
        [
            HttpAcquirer("primary", f"http://127.0.0.1:{free_port()}", timeout=0.5, attempts=2),
            HttpAcquirer("secondary", app=secondary_app, timeout=0.5, attempts=2),
        ]
    )
    settings = Settings(database_url=f"sqlite:///{path / 'p.db'}", run_worker=False)
    services = await start(settings, acquirers)
    _, key = await create_merchant(services.db, "Shop")
    import httpx

    transport = httpx.ASGITransport(app=create_app(settings, services=services))
    async with httpx.AsyncClient(transport=transport, base_url="http://p") as client:
        response = await client.post(
            "/v1/payments",
            json={"amount": 700, "currency": "GBP", "payment_method": "pm_card_ok"},
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "k"},
        )
    await services.aclose()
    assert response.status_code == 201, response.text
    assert response.json()["acquirer"] == "secondary"


async def test_only_one_acquirer_and_it_refuses_fails_cleanly(stack: Stack) -> None:
    await stack.faults(error_rate=1.0, operations=["authorize"])
    payment = (await stack.pay(key="k")).json()
    assert (payment["status"], payment["failure_code"]) == ("failed", "acquirer_unavailable")
    assert await stack.approved_authorizations(payment["id"]) == 0
    assert await stack.ledger_violations() == []


def breaker_only(stack: Stack) -> None:
    """Fixed retry control: the breaker alone decides (adaptive control would pass over the
    failing primary before its breaker trips; test_retry_control.py)."""
    for acquirer in stack.services.acquirers:
        assert isinstance(acquirer, HttpAcquirer)
        acquirer.control = RetryControl(mode="fixed")
        acquirer.budget = acquirer.throttle = None


async def test_breaker_opens_and_routes_new_payments_to_the_secondary(
    two_acquirers: Stack,
) -> None:
    stack = two_acquirers
    breaker_only(stack)
    await stack.faults("primary", error_rate=1.0, operations=["authorize"])
    first = (await stack.pay()).json()
    assert first["acquirer"] == "secondary"
    for _ in range(4):  # two failures and a successful look-up each: the failure rate trips
        await stack.pay()
    assert breaker_of(stack, "primary") is BreakerState.OPEN
    # While it is open, payments are created on the secondary straight away.
    payment = (await stack.pay()).json()
    assert payment["acquirer"] == "secondary"
    assert await stack.operations(payment["id"], "primary") == []
    # After the reset timeout a probe goes to the primary again; it answers, the breaker closes.
    await stack.faults("primary")
    stack.clock.advance(600)
    probe = (await stack.pay()).json()
    assert probe["acquirer"] == "primary"
    assert breaker_of(stack, "primary") is BreakerState.CLOSED


async def test_declines_do_not_trip_the_breaker(stack: Stack) -> None:
    results = await asyncio.gather(
        *(stack.pay(payment_method="pm_card_declined") for _ in range(12))
    )
    assert {r.json()["status"] for r in results} == {"failed"}
    assert breaker_of(stack, "primary") is BreakerState.CLOSED
    assert (await stack.pay()).json()["status"] == "captured"
