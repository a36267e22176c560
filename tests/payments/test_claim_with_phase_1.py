"""A key seen for the first time is claimed inside phase 1's own transaction (SPEC §5: the
claim and the object's creation commit together, so a payment costs two commits); every other
key goes through the gate's own claim, whose decision table answers it. The crash points of
that merged transaction are in test_recovery.py."""

from __future__ import annotations

from typing import Any

import pytest

from oncepay.idempotency.engine import Engine
from oncepay.payments.operations.refund import CreateRefund
from tests.payments.stack import Stack

BODY = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_ok"}


@pytest.fixture
def begun(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The keys the gate's own claim (Engine.begin) was asked for."""
    keys: list[str] = []
    original = Engine.begin

    async def counted(self: Engine, scope: str, key: str, *args: Any, **kwargs: Any) -> Any:
        keys.append(key)
        return await original(self, scope, key, *args, **kwargs)

    monkeypatch.setattr(Engine, "begin", counted)
    return keys


async def test_a_new_key_is_claimed_with_phase_1_and_a_known_one_by_the_gate(
    stack: Stack, begun: list[str]
) -> None:
    first = await stack.post("/v1/payments", BODY, key="once")
    assert first.status_code == 201, first.text
    assert begun == []
    record = await stack.services.engine.store.get(stack.merchant.id, "once")
    assert record is not None
    assert (record.state, record.recovery_point) == (
        "completed",
        f"finished:create:{first.json()['id']}",  # SPEC §5's last recovery point
    )
    replay = await stack.post("/v1/payments", BODY, key="once")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    reused = await stack.post("/v1/payments", {**BODY, "amount": 1}, key="once")
    assert reused.status_code == 422
    assert begun == ["once", "once"]
    assert await stack.count("payments") == 1


async def test_a_client_error_in_phase_1_is_stored_without_running_phase_1_again(
    stack: Stack, begun: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal phase 1 found is the stored answer: phase 1 is not run a second time (it
    could answer otherwise by then), and a retry replays it."""
    payment = (await stack.post("/v1/payments", BODY)).json()
    starts: list[int] = []
    original = CreateRefund.start

    async def counted(self: CreateRefund, *args: Any, **kwargs: Any) -> Any:
        starts.append(self.amount or 0)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(CreateRefund, "start", counted)
    path = f"/v1/payments/{payment['id']}/refunds"
    refused = await stack.post(path, {"amount": 9999}, key="too-much")
    assert refused.status_code == 400, refused.text
    assert refused.json()["code"] == "amount_too_large"
    assert starts == [9999]
    assert begun == []
    replay = await stack.post(path, {"amount": 9999}, key="too-much")
    assert replay.status_code == 400
    assert replay.headers["idempotent-replayed"] == "true"
    assert starts == [9999]
    assert await stack.count("refunds") == 0


async def test_every_completed_request_stands_at_finished(stack: Stack) -> None:
    """SPEC §5: recovery points go started -> <op>_created -> acquirer_called -> finished. A
    contract review found no record ever at `finished`: completed ones read `acquirer_called`.
    Phase 2 now moves the record to `finished` in the transaction that completes it, on the
    one-statement path (a new payment) and the phases' (a capture, a refund), and the
    dashboard's timeline still finds them by it."""
    held = await stack.post("/v1/payments", {**BODY, "capture_method": "manual"}, key="hold")
    pid = held.json()["id"]
    captured = await stack.post(f"/v1/payments/{pid}/capture", None, key="take")
    refunded = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 100}, key="back")
    assert (captured.status_code, refunded.status_code) == (200, 201), refunded.text
    points = {}
    for key in ("hold", "take", "back"):
        record = await stack.services.engine.store.get(stack.merchant.id, key)
        assert record is not None
        assert record.state == "completed"
        points[key] = record.recovery_point
    assert points == {
        "hold": f"finished:create:{pid}",
        "take": f"finished:capture:{pid}",
        "back": f"finished:refund:{refunded.json()['id']}",
    }
