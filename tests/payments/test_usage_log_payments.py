"""SPEC §9 in the payments service: with ``usage_log`` set, every idempotency decision of the
API lands in the key-usage log, the merchant id as its tenant and the route as its template."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.payments.stack import database_url, running_stack


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_the_api_logs_each_decision_by_merchant_and_route_template(tmp_path: Path) -> None:
    log_path = tmp_path / "usage.jsonl"
    url = database_url("sqlite", tmp_path)
    async with running_stack(url, tmp_path, usage_log=str(log_path)) as stack:
        paid = await stack.pay(key="pay-1")
        assert paid.status_code == 201, paid.text
        assert (await stack.pay(key="pay-1")).status_code == 201  # replayed
        assert (await stack.pay(key="pay-1", amount=5)).status_code == 422  # reused
        payment = paid.json()["id"]
        refund = await stack.post(f"/v1/payments/{payment}/refunds", {"amount": 100}, key="r-1")
        assert refund.status_code == 201, refund.text
        merchant = stack.merchant.id
    records = lines(log_path)  # the service has stopped: its last batch is written
    assert [(r["decision"], r["status"]) for r in records] == [
        ("executed", 201),
        ("replayed", 201),
        ("reused", 422),
        ("executed", 201),
    ]
    assert {r["tenant"] for r in records} == {merchant}
    assert [r["route"] for r in records] == [
        "POST /v1/payments",
        "POST /v1/payments",
        "POST /v1/payments",
        "POST /v1/payments/{payment_id}/refunds",
    ]
    assert records[0]["key"] == records[1]["key"] != "pay-1"  # hashed, alike
    assert {r["ttl"] for r in records} == {24 * 3600.0}
