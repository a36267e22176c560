"""A reconciliation run end to end on the payments service and its simulated acquirer, on
SQLite and PostgreSQL: OncePay's captures (with the authorization and separate) and refunds
match the simulator's report; an authorization made at the acquirer behind OncePay's back is
the one discrepancy; a canceled payment's voided authorization is not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from oncepay.payments.storage.schema import ledger_entries, payments
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.remediation import void_orphans
from oncepay.reconciliation.run import reconcile_day, reconcile_file
from oncepay.reconciliation.settlement import post_settlements
from oncepay.reconciliation.store import create_tables
from oncepay.storage.db import read, write
from tests.payments.acquirer_helpers import auth_body, key
from tests.payments.stack import Stack, database_url, running_stack
from tests.servers import require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    async with running_stack(database_url(request.param, tmp_path), tmp_path) as running:
        yield running


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
        ("orphaned_authorization", "pay_nobody_a1", "pay_nobody")
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


async def test_an_orphan_is_voided_once_even_when_two_runs_void_it(stack: Stack) -> None:
    await business(stack)
    today = datetime.now(UTC).date()
    reports = AcquirerReports("primary", stack.simulators["primary"])
    outcome = await reconcile_day(stack.db, reports, today, grace_days=0)
    assert [auth.reference for auth in outcome.orphans] == ["pay_nobody_a1"]
    acquirer = stack.services.acquirers["primary"]
    first, second = await asyncio.gather(
        void_orphans(acquirer, outcome.orphans), void_orphans(acquirer, outcome.orphans)
    )
    orphan_id = outcome.orphans[0].id
    assert first.voided == second.voided == (orphan_id,)
    voids = [op for op in await stack.operations("pay_nobody") if op["type"] == "void"]
    assert len(voids) == 1
    again = await reconcile_day(stack.db, reports, today, grace_days=0)
    assert (again.matched, again.discrepancies) == (3, ())


async def test_over_the_cap_no_orphan_is_voided_and_one_alert_is_raised(stack: Stack) -> None:
    await business(stack)
    reports = AcquirerReports("primary", stack.simulators["primary"])
    outcome = await reconcile_day(stack.db, reports, datetime.now(UTC).date(), grace_days=0)
    done = await void_orphans(stack.services.acquirers["primary"], outcome.orphans, cap=0)
    assert (done.withheld, done.voided) == (True, ())
    assert "over the cap of 0" in done.alert
    assert [op for op in await stack.operations("pay_nobody") if op["type"] == "void"] == []


async def test_matched_lines_post_their_settlement_once_and_the_ledger_still_checks(
    stack: Stack,
) -> None:
    await business(stack)
    async with write(stack.db) as conn:
        await create_tables(conn, stack.db)
    reports = AcquirerReports("primary", stack.simulators["primary"])
    outcome = await reconcile_day(stack.db, reports, datetime.now(UTC).date(), grace_days=0)
    assert await post_settlements(stack.db, outcome.settled, now=1.0) == 3
    assert await post_settlements(stack.db, outcome.settled, now=2.0) == 0  # a re-run
    async with read(stack.db) as conn:
        balances = dict(
            (
                await conn.execute(
                    select(ledger_entries.c.account, func.sum(ledger_entries.c.amount))
                    .where(ledger_entries.c.account.in_(["settled_funds", "acquirer_fees"]))
                    .group_by(ledger_entries.c.account)
                )
            ).all()
        )
    lines = [line for line, _ in outcome.settled]
    assert balances["settled_funds"] == sum(line.net for line in lines)
    assert balances["acquirer_fees"] == sum(line.fee for line in lines)
    assert await stack.ledger_violations() == []


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
