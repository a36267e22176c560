"""The simulated acquirer's settlement report is the SPEC's: its CSV reads through the
``oncepay`` mapping, fees follow the configured schedule, a payout per day and currency sums
its lines' nets, and the day's authorizations are served so that orphans can be found."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx

from oncepay.reconciliation import (
    Authorization,
    Books,
    FeeRate,
    FeeSchedule,
    Operation,
    Payment,
    read_report,
    reconcile,
)
from oncepay.simulator import create_app
from tests.payments.acquirer_helpers import auth_body, in_process, key

DAY = date(2026, 12, 1)
SCHEDULE = FeeSchedule(capture=FeeRate(basis_points=200, fixed=10), refund=FeeRate(fixed=5))


async def post(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = await client.post(path, json=body, headers=key(body["reference"]))
    assert answer.status_code == 201, answer.text
    result: dict[str, Any] = answer.json()
    return result


async def test_the_simulator_report_reconciles_and_its_payouts_sum_to_net(tmp_path: Path) -> None:
    noon = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()
    app = create_app(f"sqlite:///{tmp_path / 'acq.db'}", clock=lambda: noon, fees=SCHEDULE)
    async with in_process(app) as client:
        body = auth_body("pay_1_a1", order_id="pay_1", amount=1000, capture=True)
        paid = await post(client, "/v1/authorizations", body)
        base = f"/v1/authorizations/{paid['id']}"
        await post(client, f"{base}/refunds", {"reference": "re_1", "amount": 400})
        usd = auth_body("pay_2_a1", order_id="pay_2", amount=2500, currency="USD", capture=True)
        await post(client, "/v1/authorizations", usd)
        orphan = await post(client, "/v1/authorizations", auth_body("pay_9_a1", order_id="pay_9"))
        report = (await client.get(f"/v1/settlements?date={DAY}")).json()
        csv_text = (await client.get(f"/v1/settlements?date={DAY}&format=csv")).text
        day_auths = (await client.get(f"/v1/settlements/authorizations?date={DAY}")).json()

    lines = list(read_report(io.BytesIO(csv_text.encode())))
    assert [(x.reference, x.fee, x.net) for x in lines] == [
        ("pay_1_a1", 30, 970),
        ("pay_2_a1", 60, 2440),
        ("re_1", 5, -405),
    ]
    assert report["payouts"] == [
        {"id": "po_20261201_EUR", "currency": "EUR", "net": 970 - 405, "lines": 2},
        {"id": "po_20261201_USD", "currency": "USD", "net": 2440, "lines": 1},
    ]
    assert [a["reference"] for a in day_auths["authorizations"]] == [
        "pay_1_a1",
        "pay_2_a1",
        "pay_9_a1",
    ]
    assert report["authorizations"] == day_auths["authorizations"]

    books = Books(
        [
            Operation("pay_1_a1", "pay_1", "capture", 1000, "EUR", DAY),
            Operation("re_1", "pay_1", "refund", 400, "EUR", DAY),
            Operation("pay_2_a1", "pay_2", "capture", 2500, "USD", DAY),
        ],
        {p: Payment(p, "captured", None) for p in ("pay_1", "pay_2")},
    )
    approved = [
        Authorization(a["id"], a["reference"], a["order_id"], a["amount"], a["currency"])
        for a in day_auths["authorizations"]
        if a["status"] == "approved" and not a["voided"]
    ]
    outcome = reconcile(lines, books, approved, as_of=DAY, grace_days=0, fees=SCHEDULE)
    assert outcome.matched == 3
    assert [(d.kind.value, d.reference) for d in outcome.discrepancies] == [
        ("orphaned_authorization", "pay_9_a1")
    ]
    assert orphan["id"] in outcome.discrepancies[0].detail
