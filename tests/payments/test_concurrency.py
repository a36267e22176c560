"""Concurrent requests on one payment (SPEC §5): many tasks at once, real database
connections (PostgreSQL runs them in parallel; SQLite serialises writers across connections)."""

from __future__ import annotations

import asyncio

from tests.payments.stack import Stack


async def test_concurrent_partial_refunds_never_exceed_the_captured_amount(stack: Stack) -> None:
    pid = (await stack.pay(amount=1000)).json()["id"]
    responses = await asyncio.gather(
        *(stack.post(f"/v1/payments/{pid}/refunds", {"amount": 150}) for _ in range(12))
    )
    statuses = sorted(r.status_code for r in responses)
    # 6 x 150 = 900 fit; a seventh would need 1050. A request that met another's phase 1 may be
    # told to retry (409 in progress) instead of being refused; none may overdraw.
    succeeded = [r for r in responses if r.status_code == 201]
    assert len(succeeded) == 6, statuses
    refused = [r for r in responses if r.status_code == 400]
    assert all(r.json()["code"] == "amount_too_large" for r in refused)
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (payment["amount_refunded"], payment["status"]) == (900, "partially_refunded")
    assert await stack.ledger_violations() == []


async def test_same_key_sent_at_once_runs_once(stack: Stack) -> None:
    responses = await asyncio.gather(*(stack.pay(key="storm") for _ in range(30)))
    created = [r for r in responses if r.status_code == 201]
    busy = [r for r in responses if r.status_code == 409]
    assert len(created) + len(busy) == 30
    assert {r.json()["id"] for r in created} == {created[0].json()["id"]}
    assert all(r.json()["code"] == "idempotency_request_in_progress" for r in busy)
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(created[0].json()["id"]) == 1


async def test_capture_and_cancel_race_one_wins(stack: Stack) -> None:
    pid = (await stack.pay(capture_method="manual")).json()["id"]
    capture, cancel = await asyncio.gather(
        stack.post(f"/v1/payments/{pid}/capture"), stack.post(f"/v1/payments/{pid}/cancel")
    )
    codes = sorted([capture.status_code, cancel.status_code])
    assert codes[0] == 200  # one of them went through...
    assert codes[1] == 409  # ...the other was told it is in progress or no longer allowed
    final = (await stack.client.get(f"/v1/payments/{pid}")).json()["status"]
    assert final in {"captured", "canceled"}
    assert await stack.ledger_violations() == []


async def test_full_refunds_racing_one_another_refund_once_and_say_why_the_rest_cannot(
    stack: Stack,
) -> None:
    """Found by a black-box review: the losers of a race of full refunds (no amount) were told
    "cannot refund 0", an amount nobody sent."""
    pid = (await stack.pay(amount=1000)).json()["id"]
    responses = await asyncio.gather(
        *(stack.post(f"/v1/payments/{pid}/refunds", {}) for _ in range(20))
    )
    succeeded = [r for r in responses if r.status_code == 201]
    assert len(succeeded) == 1
    assert succeeded[0].json()["amount"] == 1000
    for refused in (r for r in responses if r.status_code != 201):
        assert refused.status_code == 409, refused.text
        problem = refused.json()
        assert problem["code"] in {"invalid_state_transition", "payment_operation_in_progress"}
        assert "cannot refund 0" not in problem["detail"]
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (payment["amount_refunded"], payment["status"]) == (1000, "refunded")
    assert await stack.ledger_violations() == []
