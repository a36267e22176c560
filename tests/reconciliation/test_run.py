"""A reconciliation run end to end on the payments service and its simulated acquirer, on
SQLite and PostgreSQL: OncePay's captures (with the authorization and separate) and refunds
match the simulator's report; an authorization made at the acquirer behind OncePay's back is
the one discrepancy; a canceled payment's voided authorization is not."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import update

from oncepay.payments.storage.schema import payments
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.run import reconcile_day, reconcile_file
from oncepay.storage.db import write
from tests.payments.acquirer_helpers import auth_body, key
from tests.payments.stack import Stack


async def business(stack: Stack) -> dict[str, str]:
    auto = (await stack.pay(amount=1200)).json()
    manual = (await stack.pay(amount=800, capture_method="manual")).json()
    assert (await stack.post(f"/v1/payments/{manual['id']}/capture", {})).status_code == 200
    refund = await stack.post(f"/v1/payments/{auto['id']}/refunds", {"amount": 200})
    assert refund.status_code == 201, refund.text
    canceled = (await stack.pay(capture_method="manual")).json()
    assert (await stack.post(f"/v1/payments/{canceled['id']}/cancel")).status_code == 200
    orphan = auth_body("pay_nobody_a1", order_id="pay_nobody")
    sim = stack.simulators["primary"]
    answer = await sim.post("/v1/authorizations", json=orphan, headers=key("pay_nobody_a1"))
    assert answer.status_code == 201
    return {"auto": auto["id"], "manual": manual["id"]}


async def test_a_day_of_business_matches_and_only_the_orphan_is_reported(stack: Stack) -> None:
    await business(stack)
    today = datetime.now(UTC).date()
    reports = AcquirerReports("primary", stack.simulators["primary"])
    outcome = await reconcile_day(stack.db, reports, today, grace_days=0)
    assert outcome.matched == 3
    assert [(d.kind.value, d.reference, d.payment_id) for d in outcome.discrepancies] == [
        ("orphaned_authorization", "pay_nobody_a1", None)  # no payment at OncePay
    ]


async def test_a_movement_the_report_lacks_is_missing_once_due(
    stack: Stack, tmp_path: Path
) -> None:
    ids = await business(stack)
    today = datetime.now(UTC).date()
    report = tmp_path / "report.csv"
    lines = (
        await stack.simulators["primary"].get(
            "/v1/settlements", params={"date": today.isoformat(), "format": "csv"}
        )
    ).text.splitlines()
    kept = [line for line in lines if not line.startswith(f"{ids['manual']}_capture,")]
    report.write_text("\n".join(kept) + "\n")
    outcome = await reconcile_file(stack.db, "primary", report, today, grace_days=0)
    assert outcome.matched == 2
    assert [(d.kind.value, d.reference) for d in outcome.discrepancies] == [
        ("missing_at_acquirer", f"{ids['manual']}_capture")
    ]
    not_due = await reconcile_file(stack.db, "primary", report, today, grace_days=3)
    assert not_due.discrepancies == ()


async def test_a_payment_authorized_past_the_validity_window_is_stale(stack: Stack) -> None:
    held = (await stack.pay(capture_method="manual")).json()
    fresh = (await stack.pay(capture_method="manual")).json()
    assert held["status"] == fresh["status"] == "authorized"
    eight_days_ago = datetime.now(UTC).timestamp() - 8 * 86400
    async with write(stack.db) as conn:
        await conn.execute(
            update(payments).where(payments.c.id == held["id"]).values(created_at=eight_days_ago)
        )
    reports = AcquirerReports("primary", stack.simulators["primary"])
    outcome = await reconcile_day(stack.db, reports, datetime.now(UTC).date(), grace_days=0)
    assert [(d.kind.value, d.reference, d.payment_id) for d in outcome.discrepancies] == [
        ("stale_authorization", f"{held['id']}_a1", held["id"])
    ]
