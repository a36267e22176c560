"""The reconciliation pipeline on the payments service and its simulated acquirer, on SQLite
and PostgreSQL: every kind planted once in a day's report is found exactly once and nothing
is reported for the clean lines; matched lines are settled (ledger, payment, event) once; the
orphan is voided and the stale payment canceled; a re-run changes nothing; a report that
cannot be read writes nothing; over the cap nothing is done and one alert is raised."""

from __future__ import annotations

import asyncio
import csv
import gc
import io
import json
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update

from oncepay.payments.models import payment_public
from oncepay.payments.storage.schema import payments
from oncepay.reconciliation import bulk, pipeline, settlement, source
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE, FeeSchedule
from oncepay.reconciliation.pipeline import RunResult, reconcile
from oncepay.reconciliation.records import Kind
from oncepay.reconciliation.settlement import check_payouts
from oncepay.storage.db import read, write
from tests.payments.acquirer_helpers import auth_body, key
from tests.payments.stack import Stack, database_url, running_stack

# Every table a run may write: a re-run, or a refused report, must leave each count as it was.
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
HEADER = b"reference,type,amount,currency,fee,net,settled_at,payout_id\n"


class PlantedReports(AcquirerReports):
    """The simulator's reports, with the reconciled day's report replaced."""

    def __init__(self, stack: Stack, day: date, report: bytes) -> None:
        super().__init__("primary", stack.simulators["primary"], owned=False)
        self.day, self.report = day, report

    async def settlement_csv(self, day: date) -> bytes:
        return self.report if day == self.day else await super().settlement_csv(day)


def today() -> date:
    return datetime.now(UTC).date()


async def paid(stack: Stack, amount: int, **fields: Any) -> str:
    answer = await stack.pay(amount=amount, **fields)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


async def day_report(stack: Stack) -> list[dict[str, str]]:
    answer = await stack.simulators["primary"].get(
        "/v1/settlements", params={"date": today().isoformat(), "format": "csv"}
    )
    return list(csv.DictReader(io.StringIO(answer.text)))


def as_csv(rows: list[dict[str, str]]) -> bytes:
    out = io.StringIO()
    columns = ["reference", "type", "amount", "currency", "fee", "net", "settled_at", "payout_id"]
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def priced(row: dict[str, str], amount: int) -> dict[str, str]:
    fee = DEFAULT_SCHEDULE.fee(row["type"], amount)
    net = FeeSchedule.net(row["type"], amount, fee)
    return {**row, "amount": str(amount), "fee": str(fee), "net": str(net)}


async def counts(stack: Stack) -> dict[str, int]:
    return {table: await stack.count(table) for table in TABLES}


async def business_with_every_kind(stack: Stack) -> tuple[bytes, dict[str, str]]:
    """A day of payments, and its report with one discrepancy of each kind planted; returns
    the report and kind -> reference."""
    ids = [await paid(stack, 1000 + 100 * n) for n in range(8)]
    manual = await paid(stack, 2500, capture_method="manual")
    assert (await stack.post(f"/v1/payments/{manual}/capture", {})).status_code == 200
    refund = await stack.post(f"/v1/payments/{ids[7]}/refunds", {"amount": 300})
    assert refund.status_code == 201, refund.text
    canceled = await paid(stack, 900, capture_method="manual")
    assert (await stack.post(f"/v1/payments/{canceled}/cancel")).status_code == 200
    held = await paid(stack, 700, capture_method="manual")
    async with write(stack.db) as conn:  # authorized eight days ago: past the validity window
        eight_days_ago = datetime.now(UTC).timestamp() - 8 * 86400
        await conn.execute(
            update(payments).where(payments.c.id == held).values(created_at=eight_days_ago)
        )
    sim = stack.simulators["primary"]
    orphan = auth_body("pay_nobody_a1", order_id="pay_nobody")
    answer = await sim.post("/v1/authorizations", json=orphan, headers=key("pay_nobody_a1"))
    assert answer.status_code == 201

    rows = await day_report(stack)
    by_reference = {row["reference"]: row for row in rows}
    ref = [f"{pid}_a1" for pid in ids]
    planted = {
        Kind.AMOUNT_MISMATCH.value: ref[0],
        Kind.CURRENCY_MISMATCH.value: ref[1],
        Kind.FEE_MISMATCH.value: ref[2],
        Kind.TYPE_MISMATCH.value: ref[3],
        Kind.MISSING_AT_ACQUIRER.value: ref[4],
        Kind.DUPLICATE_SETTLEMENT.value: ref[5],
        Kind.UNKNOWN_AT_ONCEPAY.value: "ghost_capture",
        Kind.SETTLED_ON_CANCELED_PAYMENT.value: f"{canceled}_capture",
        Kind.ORPHANED_AUTHORIZATION.value: "pay_nobody_a1",
        Kind.STALE_AUTHORIZATION.value: f"{held}_a1",
    }
    row = by_reference[ref[0]]
    by_reference[ref[0]] = priced(row, int(row["amount"]) + 1)
    by_reference[ref[1]] = {**by_reference[ref[1]], "currency": "GBP"}
    row = by_reference[ref[2]]
    fee, net = int(row["fee"]) + 7, int(row["net"]) - 7
    by_reference[ref[2]] = {**row, "fee": str(fee), "net": str(net)}
    row = by_reference[ref[3]]
    as_refund = FeeSchedule.net("refund", int(row["amount"]), int(row["fee"]))
    by_reference[ref[3]] = {**row, "type": "refund", "net": str(as_refund)}
    del by_reference[ref[4]]
    lines = list(by_reference.values())
    lines.append(dict(by_reference[ref[5]]))
    template = by_reference[ref[6]]
    lines.append(priced({**template, "reference": "ghost_capture"}, 4200))
    lines.append(priced({**template, "reference": f"{canceled}_capture"}, 900))
    return as_csv(lines), planted


async def run(stack: Stack, report: bytes, **options: Any) -> RunResult:
    reports = PlantedReports(stack, today(), report)
    return await reconcile(stack.services, "primary", grace_days=0, reports=reports, **options)


async def test_every_kind_is_found_once_and_the_clean_lines_settle(stack: Stack) -> None:
    report, planted = await business_with_every_kind(stack)
    result = await run(stack, report)

    assert sorted((d.kind.value, d.reference) for d in result.discrepancies) == sorted(
        planted.items()
    )
    clean = 3 + 1 + 1  # ids[6], ids[7] (+ its refund), the manual capture
    fee_only = 1  # a fee mismatch still settles its line
    assert result.matched == result.settled == clean + fee_only
    assert (result.opened, result.new_run) == (len(planted), True)
    assert (result.actions_taken, result.actions_withheld) == (2, 0)
    assert result.still_open == len(planted) - 2  # the orphan voided, the stale one canceled

    orphan_voids = [op for op in await stack.operations("pay_nobody") if op["type"] == "void"]
    assert len(orphan_voids) == 1
    held = planted[Kind.STALE_AUTHORIZATION.value].removesuffix("_a1")
    payment = (await stack.client.get(f"/v1/payments/{held}")).json()
    assert payment["status"] == "canceled"
    assert await stack.ledger_violations() == []
    async with read(stack.db) as conn:
        assert await check_payouts(conn) == []


async def test_settled_payments_show_it_and_get_one_event(stack: Stack) -> None:
    pid = await paid(stack, 5000)
    refund = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 1200})
    assert refund.status_code == 201
    before = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (before["amount_settled"], before["settled"]) == (0, None)
    report = as_csv(await day_report(stack))

    result = await run(stack, report)

    assert (result.matched, result.settled, result.discrepancies) == (2, 2, ())
    after = (await stack.client.get(f"/v1/payments/{pid}")).json()
    capture_fee = DEFAULT_SCHEDULE.fee("capture", 5000)
    assert after["amount_settled"] == 5000
    assert after["amount_refund_settled"] == 1200
    assert after["settlement_fee"] == capture_fee
    assert isinstance(after["settled"], int)
    events = (await stack.client.get("/v1/events", params={"type": "payment.settled"})).json()
    assert [e["data"]["object"]["id"] for e in events["data"]] == [pid]
    assert events["data"][0]["data"]["object"]["amount_settled"] == 5000
    async with read(stack.db) as conn:
        balances: dict[str, int] = dict(
            (
                await conn.execute(
                    text(
                        "SELECT account, sum(amount) FROM ledger_entries WHERE payment_id = :p "
                        "GROUP BY account"
                    ),
                    {"p": pid},
                )
            ).all()
        )
    assert balances["settled_funds"] == 5000 - capture_fee - 1200
    assert balances["acquirer_fees"] == capture_fee
    assert balances["acquirer_receivable"] == 0  # all the acquirer owed has settled
    assert await stack.ledger_violations() == []


async def test_settled_events_are_the_payments_snapshots_byte_for_byte(stack: Stack) -> None:
    """The ``payment.settled`` events (written by the database on SQLite) hold exactly
    ``json.dumps(payment_public(row))`` of the settled payment, whatever its free text holds
    (quotes, non-ASCII, control characters), and each reaches the merchant's endpoint once."""
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["payment.settled"]}
    assert (await stack.post("/v1/webhook_endpoints", hook)).status_code == 201
    texts = [
        ("plain", {"order": "1"}),
        ('"quoted" \\ back/slash', {}),
        ("café ☕ 𝄞", {"note": "naïve", "k": "v\n"}),
        ("line\nbreak\ttab\x7f", {"a": "1", "b": "€"}),
    ]
    ids = [
        await paid(stack, 1000 + n, description=text_, metadata=meta)
        for n, (text_, meta) in enumerate(texts)
    ]
    result = await run(stack, as_csv(await day_report(stack)))
    assert (result.settled, result.discrepancies) == (len(ids), ())
    async with read(stack.db) as conn:
        rows = {row.id: row for row in await conn.execute(payments.select())}
        events = (
            await conn.execute(
                text("SELECT id, object_id, data FROM events WHERE type = 'payment.settled'")
            )
        ).all()
        deliveries: dict[str, int] = dict(
            (
                await conn.execute(
                    text("SELECT event_id, count(*) FROM webhook_deliveries GROUP BY event_id")
                )
            ).all()
        )
    assert sorted(object_id for _, object_id, _ in events) == sorted(ids)
    for event_id, object_id, data in events:
        assert data == json.dumps(payment_public(rows[object_id]), separators=(",", ":"))
        assert deliveries.get(event_id) == 1


async def test_a_batchs_ids_number_its_lines_and_its_payments_from_zero(stack: Stack) -> None:
    """A batch's journals are its head and the line's place in the batch (8 hex digits, from
    00000000, in the report's order); its ``payment.settled`` events the head of the batch's
    events and the payment's place among the batch's payments by id."""
    ids = [await paid(stack, 1000 + n) for n in range(3)]
    refund = await stack.post(f"/v1/payments/{ids[1]}/refunds", {"amount": 300})
    assert refund.status_code == 201, refund.text
    rows = list(reversed(await day_report(stack)))  # not in the payments' order
    result = await run(stack, as_csv(rows))
    assert (result.settled, result.discrepancies) == (4, ())
    async with read(stack.db) as conn:
        guards: dict[str, str] = dict(
            (
                await conn.execute(
                    text("SELECT reference, transaction_id FROM reconciliation_settlements")
                )
            ).all()
        )
        events = (
            await conn.execute(
                text("SELECT id, object_id FROM events WHERE type = 'payment.settled' ORDER BY id")
            )
        ).all()
    journals = [guards[row["reference"]] for row in rows]
    assert len({journal[:-8] for journal in journals}) == 1  # one batch
    assert [journal[-8:] for journal in journals] == [f"{n:08x}" for n in range(4)]
    assert len({event_id[:-8] for event_id, _ in events}) == 1
    assert [(event_id[-8:], pid) for event_id, pid in events] == [
        (f"{n:08x}", pid) for n, pid in enumerate(sorted(ids))
    ]


async def test_a_batch_staged_many_rows_a_statement_keeps_its_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite stages a batch ``_STAGE_AT_ONCE`` rows a statement and the rest a row at a time:
    with three a statement, a batch of four lines (a statement and one row) is numbered in the
    report's order, as one statement numbers it (the ids test above)."""
    monkeypatch.setattr(bulk, "_STAGE_AT_ONCE", 3)
    monkeypatch.setattr(
        bulk,
        "_STAGE_ROWS",
        bulk._STAGE_ROW.replace(bulk._STAGED_VALUES, ", ".join([bulk._STAGED_VALUES] * 3)),
    )
    async with running_stack(database_url("sqlite", tmp_path), tmp_path) as stack:
        await test_a_batchs_ids_number_its_lines_and_its_payments_from_zero(stack)


async def test_the_books_read_in_chunks_are_the_books_read_at_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The books are read a chunk at a time (SQLite: keyset on the journals' seq): chunks of
    two rows give every movement once, the refund's included, as one chunk does."""
    ids = [await paid(stack, 1000 + n) for n in range(5)]
    manual = await paid(stack, 700, capture_method="manual")
    assert (await stack.post(f"/v1/payments/{manual}/capture", {})).status_code == 200
    refund = await stack.post(f"/v1/payments/{ids[2]}/refunds", {"amount": 300})
    assert refund.status_code == 201, refund.text
    day = today()
    async with write(stack.db) as conn:  # one capture booked ten days ago: not in the books
        await conn.execute(
            text(
                "UPDATE ledger_transactions SET created_at = created_at - 864000 "
                "WHERE payment_id = :p"
            ),
            {"p": ids[4]},
        )
    whole = await source.operations_between(stack.db, "primary", day, day)
    monkeypatch.setattr(source, "BOOKS_CHUNK", 2)
    chunks: list[int] = []
    chunked = await source.operations_between(
        stack.db, "primary", day, day, after_chunk=lambda: chunks.append(1)
    )
    assert chunked == whole
    # four captures with the authorization (the fifth is older), one separate, one refund
    assert len(whole) == 6
    assert ids[4] not in {op.payment_id for op in whole}
    assert {op.type for op in whole} == {"capture", "refund"}
    assert [op.reference for op in whole] == sorted(op.reference for op in whole)
    assert len(chunks) >= 3


async def test_a_rerun_changes_nothing(stack: Stack) -> None:
    report, _ = await business_with_every_kind(stack)
    first = await run(stack, report)
    after_first = await counts(stack)
    again = await run(stack, report)
    assert await counts(stack) == after_first
    assert again.run_id == first.run_id
    assert again.discrepancies == first.discrepancies
    assert (again.new_run, again.opened, again.settled, again.actions_taken) == (False, 0, 0, 0)
    assert again.still_open == first.still_open


async def test_two_runs_at_once_settle_each_line_once(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs of the same report at the same time, their batches small enough to
    interleave: each line is posted by exactly one of them (its guard, journal and event
    once), and the ledger balances."""
    ids = [await paid(stack, 1000 + n) for n in range(12)]
    report = as_csv(await day_report(stack))
    monkeypatch.setattr(pipeline, "BATCH", 2)
    monkeypatch.setattr(settlement, "BATCH", 2)
    first, second = await asyncio.gather(run(stack, report), run(stack, report))
    assert first.settled + second.settled == len(ids)
    assert await stack.count("reconciliation_settlements") == len(ids)
    async with read(stack.db) as conn:
        settled_events = (
            await conn.execute(text("SELECT count(*) FROM events WHERE type = 'payment.settled'"))
        ).scalar_one()
        journals = (
            await conn.execute(
                text("SELECT count(*) FROM ledger_transactions WHERE kind = 'settlement'")
            )
        ).scalar_one()
    assert (settled_events, journals) == (len(ids), len(ids))
    assert await stack.ledger_violations() == []


async def test_the_opened_discrepancies_tell_the_merchant(stack: Stack) -> None:
    report, planted = await business_with_every_kind(stack)
    await run(stack, report)
    answer = await stack.client.get(
        "/v1/events", params={"type": "reconciliation.discrepancy_opened", "limit": 100}
    )
    told = sorted(
        (e["data"]["object"]["kind"], e["data"]["object"]["reference"])
        for e in answer.json()["data"]
    )
    # the ghost line and the orphan name no payment of this merchant: operators see them
    nameless = {Kind.UNKNOWN_AT_ONCEPAY.value, Kind.ORPHANED_AUTHORIZATION.value}
    assert told == sorted((k, r) for k, r in planted.items() if k not in nameless)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (HEADER + b"r1,capture,12.50,EUR,0,1250,2026-12-01T00:00:00Z,po\n", "line 2: amount"),
        (b"reference,type,amount,currency,fee,net,settled_at\n", r"lacks column\(s\) payout_id"),
        (HEADER + "r1,capture,100,EUR,0,100,caf\xe9,po\n".encode("latin-1"), "not UTF-8"),
        (b"", "empty"),
        (HEADER + b"\nr1,capture,100,EUR,0,100,2026-12-01T00:00:00Z,po\n", "blank line"),
    ],
    ids=["bad-amount", "missing-column", "latin-1", "empty-file", "0-byte-line"],
)
async def test_a_report_that_cannot_be_read_writes_nothing(
    stack: Stack, content: bytes, reason: str
) -> None:
    await business_with_every_kind(stack)
    before = await counts(stack)
    with pytest.raises(ReportError, match=reason):
        await run(stack, content)
    with pytest.raises(ReportError, match=reason):
        await reconcile(stack.services, "primary", report=content, grace_days=0)
    assert await counts(stack) == before


async def test_over_the_cap_nothing_is_done_and_one_alert_is_raised(stack: Stack) -> None:
    report, _ = await business_with_every_kind(stack)
    stack.services.settings.reconcile_action_cap = 1  # the orphan and the stale one: 2
    result = await run(stack, report)
    assert (result.actions_taken, result.actions_withheld) == (0, 2)
    alerts = [d for d in result.discrepancies if d.kind is Kind.REMEDIATION_WITHHELD]
    assert [d.reference for d in alerts] == [f"primary:{today().isoformat()}"]
    assert "2 remediation actions" in alerts[0].detail
    assert [op for op in await stack.operations("pay_nobody") if op["type"] == "void"] == []
    assert await stack.count("reconciliation_actions") == 0
    again = await run(stack, report)
    assert (again.opened, again.new_run) == (0, False)  # one alert, however many runs


async def test_the_worker_schedule_reconciles_yesterday_and_today(stack: Stack) -> None:
    from oncepay.reconciliation.pipeline import reconcile_recent

    pid = await paid(stack, 1300)
    results = await reconcile_recent(stack.services)
    assert [(r.acquirer, r.day) for r in results] == [
        ("primary", date.fromordinal(today().toordinal() - 1)),
        ("primary", today()),
    ]
    assert [r.settled for r in results] == [0, 1]
    again = await reconcile_recent(stack.services)
    assert [(r.new_run, r.settled) for r in again] == [(False, 0), (False, 0)]
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert payment["amount_settled"] == 1300


async def test_a_scheduled_day_that_fails_is_counted_and_the_others_still_run(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncepay.payments.metrics import RECONCILIATION_RUNS
    from oncepay.payments.recovery import reconciliation_failed
    from oncepay.reconciliation.pipeline import reconcile_recent

    pid = await paid(stack, 1700)
    yesterday = date.fromordinal(today().toordinal() - 1)
    real = pipeline.reconcile

    async def unreachable_yesterday(services: Any, acquirer: str, **options: Any) -> RunResult:
        if options["day"] == yesterday:
            raise ConnectionError("the acquirer's report server is down")
        return await real(services, acquirer, **options)

    monkeypatch.setattr(pipeline, "reconcile", unreachable_yesterday)
    with pytest.raises(ConnectionError):  # without a handler the error is the caller's
        await reconcile_recent(stack.services)
    failed = RECONCILIATION_RUNS.labels("primary", "failed")
    before = failed._value.get()
    results = await reconcile_recent(stack.services, failed=reconciliation_failed)
    assert [(r.day, r.settled) for r in results] == [(today(), 1)]  # today still reconciled
    assert failed._value.get() == before + 1
    payment = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert payment["amount_settled"] == 1700


def test_run_results_say_what_the_spec_document_says() -> None:
    result = RunResult("rec_1", "primary", date(2026, 12, 1), 3, 2, 2, (), 0, 0, True)
    assert json.loads(json.dumps(result.as_json())) == {"matched": 2, "discrepancies": []}


async def test_ledger_check_catches_a_settlement_out_of_line(stack: Stack) -> None:
    pid = await paid(stack, 4000)
    await run(stack, as_csv(await day_report(stack)))
    assert await stack.ledger_violations() == []
    async with write(stack.db) as conn:
        await conn.execute(update(payments).where(payments.c.id == pid).values(settlement_fee=1))
        await conn.execute(text("UPDATE reconciliation_settlements SET net = net + 5"))
    problems = [v.problem for v in await stack.ledger_violations()]
    assert any(p.startswith("settled_funds") for p in problems), problems
    assert any(p.startswith("acquirer_fees") for p in problems), problems
    async with read(stack.db) as conn:
        payouts = [v.problem for v in await check_payouts(conn)]
    assert any("is not capture 4000" in p for p in payouts), payouts
    assert any("lines sum to net" in p for p in payouts), payouts


async def test_the_report_streams_through_in_batches(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Matched lines are posted every BATCH pairs while the report streams through (memory
    holds a batch, not the report's pairs): batches of two, each posted while the next is
    matched, settle the same lines, once, with the ledger and the payouts in balance."""
    monkeypatch.setattr(pipeline, "BATCH", 2)
    monkeypatch.setattr(settlement, "BATCH", 2)
    batches: list[int] = []
    post = settlement.post_settlements

    async def counted(*args: Any, **kwargs: Any) -> Any:
        batches.append(len(args[2]))
        return await post(*args, **kwargs)

    monkeypatch.setattr(pipeline, "post_settlements", counted)
    report, planted = await business_with_every_kind(stack)
    result = await run(stack, report)

    assert sorted((d.kind.value, d.reference) for d in result.discrepancies) == sorted(
        planted.items()
    )
    assert result.matched == result.settled == 6
    assert len(batches) >= 3
    assert max(batches) <= 2
    assert sum(batches) == 6
    assert await stack.count("reconciliation_settlements") == 6
    assert await stack.ledger_violations() == []
    async with read(stack.db) as conn:
        assert await check_payouts(conn) == []
    again = await run(stack, report)
    assert (again.settled, again.new_run) == (0, False)


class _Died(Exception):
    """A process killed between a batch's statements, as far as its transaction can tell."""


async def test_a_batch_dying_after_its_settling_writes_nothing_and_a_rerun_settles_it(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is one transaction: when it dies after the guards, journals, payments and
    events were written but before the webhook deliveries, nothing of it stays (on
    PostgreSQL the settling statement once ran on the bare driver before SQLAlchemy had
    begun the transaction, so it committed on its own: a long chaos run found guards
    without settled payments and events without deliveries). A re-run then settles every
    line, each event with its delivery."""
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["payment.settled"]}
    assert (await stack.post("/v1/webhook_endpoints", hook)).status_code == 201
    ids = [await paid(stack, 1000 + n) for n in range(4)]
    report = as_csv(await day_report(stack))
    before = await counts(stack)

    async def dies(*args: Any, **kwargs: Any) -> None:
        raise _Died

    monkeypatch.setattr(settlement, "_fan_out", dies)
    with pytest.raises(_Died):
        await run(stack, report)
    after = await counts(stack)
    assert {t: after[t] for t in TABLES if t != "reconciliation_runs"} == {
        t: before[t] for t in TABLES if t != "reconciliation_runs"
    }
    async with read(stack.db) as conn:
        settled = (
            await conn.execute(text("SELECT count(*) FROM payments WHERE settled_at IS NOT NULL"))
        ).scalar_one()
    assert settled == 0

    monkeypatch.undo()
    result = await run(stack, report)
    assert result.settled == len(ids)
    async with read(stack.db) as conn:
        undelivered = (
            await conn.execute(
                text(
                    "SELECT count(*) FROM events e WHERE e.type = 'payment.settled' AND NOT "
                    "EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id)"
                )
            )
        ).scalar_one()
        events = (
            await conn.execute(text("SELECT count(*) FROM events WHERE type = 'payment.settled'"))
        ).scalar_one()
    assert (events, undelivered) == (len(ids), 0)
    assert await stack.ledger_violations() == []


async def test_a_rerun_checks_its_batches_before_writing_and_settles_what_is_left(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a batch finds every line settled (a re-run), the next batches are checked in a
    read-only transaction first: only their unsettled lines reach a write transaction. A
    re-run after a run that settled part of the report posts exactly the rest."""
    monkeypatch.setattr(pipeline, "BATCH", 2)
    monkeypatch.setattr(settlement, "BATCH", 2)
    ids = [await paid(stack, 1000 + n) for n in range(8)]
    report = as_csv(await day_report(stack))
    lines = report.splitlines(keepends=True)
    first = await run(stack, b"".join(lines[:5]))  # the header and four lines
    assert first.settled == 4
    posted: list[list[str]] = []
    post = settlement.post_settlements

    async def counted(*args: Any, **kwargs: Any) -> Any:
        posted.append(sorted(op.reference for _, op in args[2]))
        return await post(*args, **kwargs)

    monkeypatch.setattr(pipeline, "post_settlements", counted)
    rest = await run(stack, report)
    assert rest.settled == len(ids) - 4
    # The first two batches were settled before: the first is posted (and writes nothing),
    # the second is checked first and not posted; the others are posted after their check.
    # The second batch may be in flight before the first one's answer (two at once).
    early = 2
    assert 2 + early - 1 <= len(posted) <= 2 + early, posted
    again = await run(stack, report)
    assert (again.settled, again.new_run) == (0, False)
    assert len(posted) <= 2 + early + early, posted  # the re-run's first batch(es) only
    assert await stack.count("reconciliation_settlements") == len(ids)
    assert await stack.ledger_violations() == []


async def test_a_run_spaces_young_collections_and_gives_the_thresholds_back(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a run matches and posts, the collector's young collections are rarer (the first
    threshold is pipeline._YOUNG, the others as they were); after it, after a run whose report
    cannot be read and after two runs at once, the thresholds are what they were."""
    await paid(stack, 1000)
    report = as_csv(await day_report(stack))
    before = gc.get_threshold()
    during: list[tuple[int, int, int]] = []
    match_and_post = pipeline._match_and_post

    async def recorded(*args: Any, **kwargs: Any) -> Any:
        during.append(gc.get_threshold())
        return await match_and_post(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_match_and_post", recorded)
    assert (await run(stack, report)).settled == 1
    assert during == [(pipeline._YOUNG, *before[1:])]
    assert gc.get_threshold() == before
    with pytest.raises(ReportError):
        await run(stack, HEADER + b"\nr1,capture,100,EUR,0,100,2026-12-01T00:00:00Z,po\n")
    assert gc.get_threshold() == before
    await asyncio.gather(run(stack, report), run(stack, report))  # nested: the last gives back
    assert gc.get_threshold() == before


async def test_sqlite_stages_a_batch_while_another_transaction_holds_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch is staged in its connection's TEMP tables before the write lock is asked for
    (so the pipeline stages one batch while the one before writes): staging goes through
    while another transaction holds the lock, the batch's writes wait for it, then post."""
    async with running_stack(database_url("sqlite", tmp_path), tmp_path) as stack:
        ids = [await paid(stack, 1000 + n) for n in range(3)]
        report = as_csv(await day_report(stack))
        staged = asyncio.Event()
        stage = bulk.stage_sqlite

        async def recorded(conn: Any, rows: list[Any]) -> None:
            await stage(conn, rows)
            staged.set()

        monkeypatch.setattr(bulk, "stage_sqlite", recorded)
        holding, release = asyncio.Event(), asyncio.Event()

        async def hold() -> None:
            async with write(stack.db):  # BEGIN IMMEDIATE: SQLite's write lock
                holding.set()
                await release.wait()

        holder = asyncio.ensure_future(hold())
        await holding.wait()
        running = asyncio.ensure_future(run(stack, report))
        async with asyncio.timeout(60):
            await staged.wait()  # staged with the lock held by the other transaction
        assert not running.done()
        assert await stack.count("reconciliation_settlements") == 0
        release.set()
        await holder
        result = await running
        assert result.settled == len(ids)
        assert await stack.count("reconciliation_settlements") == len(ids)
        assert await stack.ledger_violations() == []
