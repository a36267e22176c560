"""SPEC §9 in the payments service: with ``usage_log`` set, every idempotency decision of the
API lands in the key-usage log, the merchant id as its tenant and the route as its template."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.payments.stack import database_url, running_stack
from tests.processes import PYTHONPATH, ROOT, free_port, oncepay_args, running


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
        assert (await stack.pay(key="k" * 300)).status_code == 400  # invalid: logged once
        payment = paid.json()["id"]
        refund = await stack.post(f"/v1/payments/{payment}/refunds", {"amount": 100}, key="r-1")
        assert refund.status_code == 201, refund.text
        merchant = stack.merchant.id
    records = lines(log_path)  # the service has stopped: its last batch is written
    assert [(r["decision"], r["status"]) for r in records] == [
        ("executed", 201),
        ("replayed", 201),
        ("reused", 422),
        ("invalid", 400),
        ("executed", 201),
    ]
    assert {r["tenant"] for r in records} == {merchant}
    assert [r["route"] for r in records] == [
        "POST /v1/payments",
        "POST /v1/payments",
        "POST /v1/payments",
        "POST /v1/payments",
        "POST /v1/payments/{id}/refunds",
    ]
    assert records[0]["key"] == records[1]["key"] != "pay-1"  # hashed, alike
    assert {r["ttl"] for r in records if r["decision"] != "invalid"} == {24 * 3600.0}
    assert [r["ttl"] for r in records if r["decision"] == "invalid"] == [None]  # none stored


@pytest.mark.slow
def test_oncepay_serve_writes_the_usage_log(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'p.db'}"
    created = subprocess.run(
        oncepay_args("merchants", "create", "Shop", "--database-url", db),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    merchant = json.loads(created.stdout)
    log_path = tmp_path / "usage.jsonl"
    port = free_port()
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
    }
    args = oncepay_args("serve", "--port", str(port), "--usage-log", str(log_path))
    headers = {"Authorization": f"Bearer {merchant['api_key']}", "Idempotency-Key": "k1"}
    payment = {"amount": 1200, "currency": "USD", "payment_method": "pm_card_ok"}
    with running(args, port, env):
        url = f"http://127.0.0.1:{port}/v1/payments"
        assert httpx.post(url, json=payment, headers=headers).status_code == 201
        assert httpx.post(url, json=payment, headers=headers).status_code == 201
    records = lines(log_path)  # the service has stopped: its last batch is written
    assert [r["decision"] for r in records] == ["executed", "replayed"]
    assert {r["tenant"] for r in records} == {merchant["id"]}
    assert {r["route"] for r in records} == {"POST /v1/payments"}
    assert {r["source"] for r in records} == {"127.0.0.1"}
