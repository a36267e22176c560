"""A capture settled twice by two reports (two files, or two days' reports): SPEC §10's
``duplicate_settlement``, on SQLite and PostgreSQL.

A line whose reference an earlier run settled with the same (type, amount, payout, settled_at)
is the same settlement read again (a re-run): skipped, as before. One that an earlier run
settled with another payout or time is the money paid out a second time: a
``duplicate_settlement`` found once, with the settlement before as evidence; it posts nothing
and is not matched. Re-running either report changes nothing (every table's rows, the JSON).
Found by the review of issue 15: the second file was ``matched 1`` with no discrepancy (the
posting dropped the line silently, as it drops a re-run's)."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from oncepay.reconciliation import pipeline, settlement
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE
from oncepay.reconciliation.pipeline import reconcile
from tests.payments.stack import Stack
from tests.processes import oncepay_args
from tests.reconciliation.test_cli import reconcile as reconcile_cli

HEADER = "reference,type,amount,currency,fee,net,settled_at,payout_id\n"
TABLES = (
    "reconciliation_runs",
    "reconciliation_discrepancies",
    "reconciliation_settlements",
    "reconciliation_actions",
    "ledger_transactions",
    "ledger_entries",
    "events",
    "payments",
    "oncepay_idempotency",
)
FIRST = ("po_first", "2026-12-06T10:00:00Z")
SECOND = ("po_second", "2026-12-07T10:00:00Z")


async def paid(stack: Stack, amount: int) -> str:
    answer = await stack.pay(amount=amount)
    assert answer.status_code == 201, answer.text
    assert answer.json()["status"] == "captured"
    return str(answer.json()["id"])


def line(payment_id: str, amount: int, payout: tuple[str, str]) -> str:
    fee = DEFAULT_SCHEDULE.fee("capture", amount)
    return f"{payment_id}_a1,capture,{amount},USD,{fee},{amount - fee},{payout[1]},{payout[0]}\n"


def report(*lines: str) -> bytes:
    return (HEADER + "".join(lines)).encode()


async def counts(stack: Stack) -> dict[str, int]:
    return {table: await stack.count(table) for table in TABLES}


async def duplicates(stack: Stack) -> list[tuple[str, str]]:
    from sqlalchemy import text

    from oncepay.storage.db import read

    async with read(stack.db) as conn:
        rows = await conn.execute(
            text(
                "SELECT reference, detail FROM reconciliation_discrepancies "
                "WHERE kind = 'duplicate_settlement' ORDER BY reference"
            )
        )
        return [(str(a), str(b)) for a, b in rows.all()]


def ledger_check(stack: Stack) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ONCEPAY_DATABASE_URL": stack.services.settings.database_url}
    return subprocess.run(
        oncepay_args("ledger", "check"),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


async def test_a_capture_settled_again_by_a_second_file_is_one_duplicate(
    stack: Stack, tmp_path: Path
) -> None:
    """``oncepay reconcile --report A``, then ``--report B``: B settles one capture of A
    again under another payout (a duplicate), repeats another exactly as A had it (settled
    before: skipped), and settles a capture of its own."""
    again, same = [await paid(stack, amount) for amount in (2000, 3000)]
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_bytes(report(line(again, 2000, FIRST), line(same, 3000, FIRST)))
    args = ("--grace-days", "0", "--json")
    a = reconcile_cli(stack, tmp_path, "--report", str(first), *args)
    assert (a.returncode, json.loads(a.stdout)) == (0, {"matched": 2, "discrepancies": []})

    new = await paid(stack, 4000)  # after A's run: not missing from it
    second.write_bytes(
        report(line(same, 3000, FIRST), line(again, 2000, SECOND), line(new, 4000, SECOND))
    )
    b = reconcile_cli(stack, tmp_path, "--report", str(second), *args)
    assert b.returncode == 1, (b.stdout, b.stderr)
    document = json.loads(b.stdout)
    assert document["matched"] == 2  # the line repeated as settled, and the new capture
    assert [(d["kind"], d["reference"], d["payment_id"]) for d in document["discrepancies"]] == [
        ("duplicate_settlement", f"{again}_a1", again)
    ]
    detail = document["discrepancies"][0]["detail"]
    for evidence in (*FIRST, *SECOND, "line 3", "txn_"):
        assert evidence in detail, detail
    assert len(await duplicates(stack)) == 1
    assert await stack.count("reconciliation_settlements") == 3
    settled = {
        pid: (await stack.client.get(f"/v1/payments/{pid}")).json()["amount_settled"]
        for pid in (again, same, new)
    }
    assert settled == {again: 2000, same: 3000, new: 4000}
    check = ledger_check(stack)
    assert check.returncode == 0, check.stdout + check.stderr

    # Either file again: the same document, byte for byte, and not a row more anywhere.
    before = await counts(stack)
    b_again = reconcile_cli(stack, tmp_path, "--report", str(second), *args)
    assert (b_again.returncode, b_again.stdout) == (1, b.stdout)
    a_again = reconcile_cli(stack, tmp_path, "--report", str(first), *args)
    assert (a_again.returncode, a_again.stdout) == (0, a.stdout)
    assert await counts(stack) == before
    assert len(await duplicates(stack)) == 1
    check = ledger_check(stack)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("batch", [2, 1], ids=["posting", "re-run-check"])
async def test_the_duplicate_is_found_by_a_run_that_checks_before_it_writes(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Once a batch found all its lines settled (a re-run), the next batches are checked in a
    read-only transaction before anything is staged: that check finds the duplicate too."""
    ids = [await paid(stack, 1000 + n) for n in range(4)]
    first = report(*(line(pid, 1000 + n, FIRST) for n, pid in enumerate(ids)))
    # ids[0] exactly as before (a whole batch when batch is 1), then ids[1] and ids[3] again
    second = report(
        line(ids[0], 1000, FIRST),
        line(ids[1], 1001, SECOND),
        line(ids[2], 1002, FIRST),
        line(ids[3], 1003, ("po_first", "2026-12-06T10:00:01Z")),  # the time alone differs
    )
    monkeypatch.setattr(pipeline, "BATCH", batch)
    monkeypatch.setattr(settlement, "BATCH", batch)
    services = stack.services

    a = await reconcile(services, "primary", report=first, grace_days=0)
    assert (a.matched, a.settled, a.discrepancies) == (4, 4, ())
    b = await reconcile(services, "primary", report=second, grace_days=0)
    assert (b.matched, b.settled) == (2, 0)
    assert [(d.kind.value, d.reference) for d in b.discrepancies] == sorted(
        [("duplicate_settlement", f"{ids[1]}_a1"), ("duplicate_settlement", f"{ids[3]}_a1")],
        key=lambda kind_reference: kind_reference[1],
    )
    assert b.opened == 2
    before = await counts(stack)
    b_again = await reconcile(services, "primary", report=second, grace_days=0)
    assert json.dumps(b_again.as_json()) == json.dumps(b.as_json())
    assert (b_again.opened, b_again.new_run, b_again.settled) == (0, False, 0)
    assert await counts(stack) == before
    assert len(await duplicates(stack)) == 2
    assert await stack.ledger_violations() == []


class Days(AcquirerReports):
    """The simulator's authorizations, and a planted report per day."""

    def __init__(self, stack: Stack, reports: dict[date, bytes]) -> None:
        super().__init__("primary", stack.simulators["primary"], owned=False)
        self.reports = reports

    async def settlement_csv(self, day: date) -> bytes:
        return self.reports.get(day, HEADER.encode())


async def test_a_capture_settled_again_on_another_day_is_a_duplicate(stack: Stack) -> None:
    """``oncepay reconcile --date``: the capture settled in yesterday's report comes again in
    today's under another payout, and today's run reads no earlier report (grace 0)."""
    pid = await paid(stack, 2500)
    today = datetime.now(UTC).date()
    yesterday = today - timedelta(days=1)
    days = Days(
        stack,
        {yesterday: report(line(pid, 2500, FIRST)), today: report(line(pid, 2500, SECOND))},
    )
    services = stack.services
    first = await reconcile(services, "primary", day=yesterday, grace_days=0, reports=days)
    assert (first.matched, first.settled, first.discrepancies) == (1, 1, ())
    second = await reconcile(services, "primary", day=today, grace_days=0, reports=days)
    assert (second.matched, second.settled) == (0, 0)
    assert [(d.kind.value, d.reference) for d in second.discrepancies] == [
        ("duplicate_settlement", f"{pid}_a1")
    ]
    before = await counts(stack)
    for day, result in ((today, second), (yesterday, first)):
        again = await reconcile(services, "primary", day=day, grace_days=0, reports=days)
        assert json.dumps(again.as_json()) == json.dumps(result.as_json())
    assert await counts(stack) == before
    assert len(await duplicates(stack)) == 1
    assert (await stack.client.get(f"/v1/payments/{pid}")).json()["amount_settled"] == 2500
    assert await stack.ledger_violations() == []


async def test_a_duplicate_within_one_file_is_still_found_once(
    stack: Stack, tmp_path: Path
) -> None:
    pid = await paid(stack, 1800)
    twice = tmp_path / "twice.csv"
    twice.write_bytes(report(line(pid, 1800, FIRST), line(pid, 1800, SECOND)))
    args = ("--report", str(twice), "--grace-days", "0", "--json")
    result = reconcile_cli(stack, tmp_path, *args)
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["matched"] == 1
    assert [(d["kind"], d["reference"]) for d in document["discrepancies"]] == [
        ("duplicate_settlement", f"{pid}_a1")
    ]
    assert "line 3" in document["discrepancies"][0]["detail"]
    assert await stack.count("reconciliation_settlements") == 1
    before = await counts(stack)
    again = reconcile_cli(stack, tmp_path, *args)
    assert (again.returncode, again.stdout) == (1, result.stdout)
    assert await counts(stack) == before
    assert len(await duplicates(stack)) == 1
    check = ledger_check(stack)
    assert check.returncode == 0, check.stdout + check.stderr


async def test_a_settled_capture_repeated_twice_in_the_next_report_is_one_duplicate(
    stack: Stack,
) -> None:
    """The second report holds an already-settled capture twice, both under new payouts: one
    ``duplicate_settlement`` for the reference (the database keeps one), not one from the
    report's own repeat and another from the settlement before; neither line matched."""
    pid = await paid(stack, 2500)
    services = stack.services
    first = await reconcile(services, "primary", report=report(line(pid, 2500, FIRST)))
    assert (first.matched, first.settled) == (1, 1)
    third = ("po_third", "2026-12-08T10:00:00Z")
    again = report(line(pid, 2500, SECOND), line(pid, 2500, third))
    second = await reconcile(services, "primary", report=again, grace_days=0)
    assert second.matched == 0
    assert [(d.kind.value, d.reference) for d in second.discrepancies] == [
        ("duplicate_settlement", f"{pid}_a1")
    ]
    assert len(await duplicates(stack)) == 1
    rerun = await reconcile(services, "primary", report=again, grace_days=0)
    assert json.dumps(rerun.as_json()) == json.dumps(second.as_json())
