"""The metrics issue 17 added (docs/observability.md, "Metrics"): idempotency decisions by SPEC
§9 name and route, key-seconds stored, and ``/metrics`` behind the operator token when asked
(SQLite and PostgreSQL, through the API)."""

from __future__ import annotations

from pathlib import Path

from oncepay.payments.metrics import REGISTRY
from tests.payments.stack import Stack, running_stack

PAYMENTS = "POST /v1/payments"
REFUNDS = "POST /v1/payments/{id}/refunds"
TOKEN = "operator-token-0123456789"


def _decisions(decision: str, route: str) -> float:
    labels = {"decision": decision, "route": route}
    return REGISTRY.get_sample_value("oncepay_idempotency_route_decisions_total", labels) or 0.0


def _key_seconds() -> float:
    return REGISTRY.get_sample_value("oncepay_idempotency_key_seconds_total") or 0.0


async def test_decisions_are_counted_by_kind_and_route_and_key_seconds_by_ttl(
    stack: Stack,
) -> None:
    wanted = [
        ("executed", PAYMENTS),
        ("replayed", PAYMENTS),
        ("reused", PAYMENTS),
        ("executed", REFUNDS),
        ("invalid", PAYMENTS),
    ]
    before = {pair: _decisions(*pair) for pair in wanted}
    seconds = _key_seconds()
    paid = await stack.pay(key="m-1")
    assert paid.status_code == 201, paid.text
    assert (await stack.pay(key="m-1")).status_code == 201  # replayed
    assert (await stack.pay(key="m-1", amount=5)).status_code == 422  # reused
    assert (await stack.pay(key="k" * 256)).status_code == 400  # invalid: 1-255 characters
    refund = await stack.post(f"/v1/payments/{paid.json()['id']}/refunds", {"amount": 100})
    assert refund.status_code == 201, refund.text
    assert {pair: _decisions(*pair) - before[pair] for pair in wanted} == dict.fromkeys(wanted, 1.0)
    # Two stored answers (the payment, the refund), each kept for the key TTL (24 h), and the
    # reuse's 422 (stored under no key) adds nothing.
    assert _key_seconds() - seconds == 2 * 24 * 3600.0

    exposed = (await stack.client.get("/metrics")).text
    assert (
        'oncepay_idempotency_route_decisions_total{decision="replayed",route="POST /v1/payments"}'
        in exposed
    )
    assert "oncepay_idempotency_key_seconds_total" in exposed


async def test_metrics_can_require_the_operator_token(payments_url: str, tmp_path: Path) -> None:
    async with running_stack(
        payments_url, tmp_path, admin_token=TOKEN, metrics_require_token=True
    ) as stack:
        client = stack.client
        anonymous = await client.get("/metrics", headers={"Authorization": ""})
        merchant = await client.get("/metrics")  # the merchant's API key is not the token
        operator = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert anonymous.status_code == 401, anonymous.text
    assert merchant.status_code == 401
    assert anonymous.headers["content-type"] == "application/problem+json"
    assert operator.status_code == 200
    assert "oncepay_idempotency_route_decisions_total" in operator.text


async def test_metrics_are_open_by_default(stack: Stack) -> None:
    answer = await stack.client.get("/metrics", headers={"Authorization": ""})
    assert answer.status_code == 200
