"""Reconciliation in the chaos audit (``oncepay.chaos.reconcile``): orphaned authorizations
injected at both acquirers are found by reconciling every day, each voided exactly once, and
nothing else is found, on SQLite and PostgreSQL with the persisting pipeline; the checks are
not toothless (planted violations are reported). The whole ``oncepay chaos`` run, which
injects orphans too, is in ``tests/test_chaos.py``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest

from oncepay.chaos.reconcile import (
    ACQUIRERS,
    Injected,
    Reconciled,
    checks,
    days_between,
    inject_orphans,
    reconcile_all,
    summary,
)
from oncepay.payments.recovery import recover_once
from oncepay.reconciliation import pipeline
from oncepay.reconciliation.matcher import without_in_flight
from oncepay.reconciliation.records import Discrepancy, Kind, Outcome
from tests.payments.stack import BACKOFF, Stack, database_url, running_stack
from tests.servers import require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def two(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    async with running_stack(url, tmp_path, acquirers=ACQUIRERS) as stack:
        yield stack


async def operations(stack: Stack) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in ACQUIRERS:
        found += [{**op, "acquirer": name} for op in await stack.operations(None, name)]
    return found


async def test_injected_orphans_are_found_and_voided_once_and_nothing_else(two: Stack) -> None:
    for amount in (500, 1200, 3300):
        paid = await two.pay(amount=amount)
        assert paid.status_code == 201, paid.text
    refunded = await two.post(f"/v1/payments/{paid.json()['id']}/refunds", {"amount": 300})
    assert refunded.status_code == 201, refunded.text
    held = await two.pay(capture_method="manual")  # authorized, not captured: not an orphan
    assert held.json()["status"] == "authorized"
    declined = await two.pay(payment_method="pm_card_declined")
    assert declined.json()["status"] == "failed"

    injected = await inject_orphans(two.simulators, 2)
    assert len(injected) == 4
    assert {i.acquirer for i in injected} == set(ACQUIRERS)
    today = datetime.now(UTC).date()
    reconciled = await reconcile_all(two.services, [today])

    found = checks(injected, reconciled, await operations(two))
    assert found == {check: [] for check in found}, found
    assert summary(injected, reconciled)["discrepancies: orphaned_authorization"] == 4
    assert reconciled.runs == reconciled.runs_again == 2  # one a day and acquirer
    assert await two.ledger_violations() == []


async def test_an_orphan_voided_before_is_not_voided_again(two: Stack) -> None:
    """Reconciling after a run that voided the orphans (the chaos audit's second pass, or the
    worker's schedule before it) voids nothing more."""
    injected = await inject_orphans(two.simulators, 1)
    today = datetime.now(UTC).date()
    await reconcile_all(two.services, [today])
    again = await reconcile_all(two.services, [today])
    found = checks(injected, again, await operations(two))
    assert found["each injected orphan voided exactly once"] == []


def test_the_checks_report_planted_violations() -> None:
    orphan = Injected("primary", "auth_1", "pay_x_a1", "pay_x")
    unseen = Injected("secondary", "auth_2", "pay_y_a1", "pay_y")

    def row(kind: str, reference: str, acquirer: str = "primary") -> dict[str, Any]:
        return {"acquirer": acquirer, "kind": kind, "reference": reference, "detail": "d"}

    def void(auth: str, reference: str, acquirer: str = "primary") -> dict[str, Any]:
        return {
            "acquirer": acquirer,
            "type": "void",
            "status": "approved",
            "authorization_id": auth,
            "reference": reference,
        }

    reconciled = Reconciled(
        days=["2026-12-01"],
        runs=2,
        discrepancies=[
            row("orphaned_authorization", "pay_x_a1"),
            row("unknown_at_oncepay", "pay_z_capture"),
        ],
        runs_again=3,
        discrepancies_again=2,
        failures=["secondary 2026-12-01: boom"],
    )
    found = checks(
        [orphan, unseen],
        reconciled,
        [
            void("auth_1", "pay_x_a1_orphan_void"),
            void("auth_1", "pay_x_a1_orphan_void_2"),
            void("auth_9", "pay_9_a1_orphan_void"),
        ],
    )
    assert found["reconciliation finds only the injected orphans"] == [
        "a run failed: secondary 2026-12-01: boom",
        "primary unknown_at_oncepay pay_z_capture: d",
        "secondary pay_y_a1: the injected orphan was not found",
    ]
    assert found["each injected orphan voided exactly once"] == [
        "primary auth_1 (pay_x_a1): voided 2 times",
        "secondary auth_2 (pay_y_a1): voided 0 times",
        "primary pay_9_a1_orphan_void: reconciliation voided OncePay's own authorization",
    ]
    assert found["reconciling again changes nothing"] == ["runs: 2 after the first pass, 3 after"]


def test_every_day_of_a_run_is_reconciled() -> None:
    midnight = datetime(2026, 12, 2, tzinfo=UTC).timestamp()
    assert days_between(midnight - 10, midnight + 10) == [date(2026, 12, 1), date(2026, 12, 2)]
    assert days_between(midnight, midnight + 10) == [date(2026, 12, 2)]


async def test_money_in_flight_is_not_unknown_and_is_matched_once_booked(two: Stack) -> None:
    """What the chaos audit found: the acquirer captured, OncePay has not booked the answer
    yet (the call timed out after the acquirer committed; recovery will ask). A run then must
    not call the capture unknown for good; once recovery books it, a run matches it."""
    await two.faults(timeout_after_commit_rate=1.0, stall_seconds=5)
    stuck = await two.pay(amount=4321, key="in-flight")
    assert stuck.status_code == 503, stuck.text
    await two.faults()
    [payment] = (await two.client.get("/v1/payments")).json()["data"]
    assert payment["status"] == "processing"
    today = datetime.now(UTC).date()
    first = await pipeline.reconcile(two.services, "primary", day=today, grace_days=0)
    assert (first.lines, first.matched, first.discrepancies) == (1, 0, ())

    two.clock.advance(BACKOFF[0] + 0.1)
    assert dict((await recover_once(two.services, now=two.clock())).results) == {"finished": 1}
    second = await pipeline.reconcile(two.services, "primary", day=today, grace_days=0)
    assert (second.lines, second.matched, second.settled, second.discrepancies) == (1, 1, 1, ())
    assert await two.ledger_violations() == []


def test_only_unknown_money_of_a_payment_in_flight_is_left_out() -> None:
    unknown = Discrepancy(Kind.UNKNOWN_AT_ONCEPAY, "pay_a_a1", "pay_a", "d", "r")
    other = Discrepancy(Kind.UNKNOWN_AT_ONCEPAY, "pay_b_a1", "pay_b", "d", "r")
    mismatch = Discrepancy(Kind.AMOUNT_MISMATCH, "pay_a_capture", "pay_a", "d", "r")
    outcome = Outcome(3, (unknown, other, mismatch))
    assert without_in_flight(outcome, {"pay_a"}).discrepancies == (other, mismatch)
    assert without_in_flight(outcome, set()) is outcome
