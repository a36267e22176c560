"""Found by the acceptance review of issue 15, as a user runs the feature.

A report line whose ``net`` is not ``amount - fee`` (``-amount - fee`` for a refund) says two
different things about the money paid out: the ledger books ``amount - fee`` into settled
funds while the payout carries ``net``. Settling it anyway made ``oncepay ledger check`` fail
after a reconcile (its per-line and per-payout checks), so such a line is a ``fee_mismatch``
for a person and settles nothing, like an amount or currency mismatch."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from oncepay.reconciliation import Kind, ReportError, reconcile
from oncepay.reconciliation.report import count_lines, report_lines
from oncepay.storage.db import read
from tests.payments.stack import Stack, database_url, running_stack
from tests.reconciliation.books import DAY, SCHEDULE, clean_day
from tests.reconciliation.test_cli import reconcile as reconcile_cli
from tests.reconciliation.test_operator_api import BASE, OPERATOR, TOKEN, get, plant, post
from tests.servers import require_postgres


def test_a_line_whose_net_is_not_amount_less_fee_is_reported_and_settles_nothing() -> None:
    day = clean_day(10)
    line = day.lines[1]
    day.lines[1] = line._replace(net=line.net - 7)  # the fee as scheduled, the net not
    outcome = reconcile(day.lines, day.books(), as_of=DAY, grace_days=0, fees=SCHEDULE)
    assert [(d.kind, d.reference) for d in outcome.discrepancies] == [
        (Kind.FEE_MISMATCH, line.reference)
    ]
    assert line.reference not in {op.reference for _, op in outcome.settled}
    assert outcome.matched == len(day.lines) - 1


def test_the_same_through_the_residual_join_on_the_payment() -> None:
    day = clean_day(10)
    line = day.lines[1]
    day.lines[1] = line._replace(reference="psp_1", net=line.net + 3)  # acquirer's own ref
    outcome = reconcile(day.lines, day.books(), as_of=DAY, grace_days=3, fees=SCHEDULE)
    assert [(d.kind, d.reference) for d in outcome.discrepancies] == [(Kind.FEE_MISMATCH, "psp_1")]
    assert line.reference not in {op.reference for _, op in outcome.settled}
    assert outcome.matched == len(day.lines) - 1


def test_a_fee_that_differs_only_from_the_schedule_still_settles() -> None:
    day = clean_day(10)
    line = day.lines[1]
    day.lines[1] = line._replace(fee=line.fee + 7, net=line.net - 7)  # consistent, not scheduled
    outcome = reconcile(day.lines, day.books(), as_of=DAY, grace_days=0, fees=SCHEDULE)
    assert [d.kind for d in outcome.discrepancies] == [Kind.FEE_MISMATCH]
    assert line.reference in {op.reference for _, op in outcome.settled}
    assert outcome.matched == len(day.lines)


async def test_reconciling_such_a_report_keeps_the_ledger_check_passing(
    stack: Stack, tmp_path: Path
) -> None:
    from oncepay.payments.ledger import audit
    from oncepay.reconciliation.settlement import check_payouts

    paid = [(await stack.pay(amount=amount)).json() for amount in (2000, 3000)]
    assert [p["status"] for p in paid] == ["captured", "captured"]
    now = datetime.now(UTC).isoformat()
    rows = [
        f"{paid[0]['id']}_a1,capture,2000,USD,53,1900,{now},po_1",  # net says 1900, not 1947
        f"{paid[1]['id']}_a1,capture,3000,USD,67,2933,{now},po_1",
    ]
    report = tmp_path / "report.csv"
    header = "reference,type,amount,currency,fee,net,settled_at,payout_id"
    report.write_text("\n".join([header, *rows]) + "\n")
    result = reconcile_cli(stack, tmp_path, "--report", str(report), "--json")
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert [(d["kind"], d["reference"]) for d in document["discrepancies"]] == [
        ("fee_mismatch", f"{paid[0]['id']}_a1")
    ]
    assert document["matched"] == 1

    violations, _ = await audit(stack.db)
    async with read(stack.db) as conn:
        violations.extend(await check_payouts(conn))
    assert violations == []
    settled = [(await stack.client.get(f"/v1/payments/{p['id']}")).json() for p in paid]
    assert [p["amount_settled"] for p in settled] == [0, 3000]


async def test_reconcile_refuses_a_future_day_and_cancels_nothing(
    stack: Stack, tmp_path: Path
) -> None:
    """A day not yet over is all right (the worker reconciles today so far), but one to come
    made every live authorization look a year old: the run cancelled them as stale."""
    held = (await stack.pay(amount=900, capture_method="manual")).json()
    assert held["status"] == "authorized"
    next_year = (datetime.now(UTC).date() + timedelta(days=365)).isoformat()
    result = reconcile_cli(stack, tmp_path, "--date", next_year, "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "future" in result.stderr + result.stdout
    payment = (await stack.client.get(f"/v1/payments/{held['id']}")).json()
    assert payment["status"] == "authorized"
    assert await stack.count("reconciliation_runs") == 0


@pytest.mark.parametrize(
    "args",
    [
        ("--date", "0001-01-01"),
        ("--date", "0001-01-05", "--grace-days", "0"),
        ("--grace-days", "100000000"),
    ],
)
async def test_reconcile_refuses_days_out_of_range_with_a_message(
    stack: Stack, tmp_path: Path, args: tuple[str, ...]
) -> None:
    result = reconcile_cli(stack, tmp_path, *args, "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "OverflowError" not in result.stderr
    assert result.stdout == ""
    assert await stack.count("reconciliation_runs") == 0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def operated(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    async with running_stack(url, tmp_path, admin_token=TOKEN) as running:
        yield running


async def test_operator_api_out_of_range_input_is_a_4xx_problem_never_a_500(
    operated: Stack,
) -> None:
    refused = {
        "cursor past 64 bits": await get(
            operated, "/discrepancies", starting_after="99999999999999999999999"
        ),
        "run of year 1": await post(operated, "/runs", {"day": "0001-01-01"}, key="a"),
        "run of year 1, grace 0": await post(
            operated, "/runs", {"day": "0001-01-05", "grace_days": 0}, key="b"
        ),
    }
    for case, response in refused.items():
        assert response.status_code == 400, (case, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
    assert await operated.count("reconciliation_runs") == 0


async def test_a_nul_character_in_operator_input_is_a_4xx_never_a_500(operated: Stack) -> None:
    """PostgreSQL refuses a NUL in text (SQLite keeps it): a note, a filter, a cursor or a run
    id holding one reached the database and came back as a 500."""
    await plant(operated)
    target = (await get(operated, "/discrepancies", reference="r3")).json()["data"][0]["id"]
    refused = {
        "note": await post(operated, f"/discrepancies/{target}/resolve", {"note": "a\x00b"}),
        "reference filter": await get(operated, "/discrepancies", reference="r\x003"),
        "payment filter": await get(operated, "/discrepancies", payment_id="pay\x00"),
        "acquirer filter": await get(operated, "/runs", acquirer="prim\x00ary"),
        "run cursor": await get(operated, "/runs", starting_after="rec_\x00"),
        "run id": await operated.client.get(f"{BASE}/runs/rec_%00", headers=OPERATOR),
    }
    for case, response in refused.items():
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
    assert refused["note"].status_code == 400
    assert refused["run id"].status_code == 404
    still = (await get(operated, f"/discrepancies/{target}")).json()
    assert (still["status"], still["note"]) == ("open", None)


HEADER = b"reference,type,amount,currency,fee,net,settled_at,payout_id\n"
LONG = {
    "reference": b"g" * 256 + b",capture,100,USD,0,100,2026-12-06T10:00:00Z,po_1\n",
    "settled_at": b"r1,capture,100,USD,0,100,2026-12-06T10:00:00.000000000000000000000Z,po_1\n",
    "payout_id": b"r1,capture,100,USD,0,100,2026-12-06T10:00:00Z," + b"p" * 256 + b"\n",
}


@pytest.mark.parametrize("column", sorted(LONG))
@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
def test_a_cell_longer_than_its_column_is_a_report_error(column: str, quoted: bool) -> None:
    """The settlement tables hold a reference or payout id of 255 characters and a time of
    40; PostgreSQL refuses more, after earlier lines had settled. Both ways of reading a
    report (the one expression and, for a quoted cell, the parser) refuse the line first."""
    line = LONG[column]
    if quoted:
        line = b'"' + line.replace(b",", b'","', 7).rstrip(b"\n") + b'"\n'
    content = HEADER + b"ok_1,capture,100,USD,0,100,2026-12-06T10:00:00Z,po_1\n" + line
    with pytest.raises(ReportError, match=f"line 3: {column}"):
        count_lines(content)
    with pytest.raises(ReportError, match=f"line 3: {column}"):
        list(report_lines(content))
    at_limit = HEADER + line.replace(b"g" * 256, b"g" * 255).replace(b"p" * 256, b"p" * 255)
    if column != "settled_at":
        assert count_lines(at_limit) == 1


async def test_a_too_long_reference_settles_nothing_and_is_exit_2(
    stack: Stack, tmp_path: Path
) -> None:
    paid = (await stack.pay(amount=2000)).json()
    report = tmp_path / "report.csv"
    report.write_bytes(
        HEADER
        + f"{paid['id']}_a1,capture,2000,USD,53,1947,2026-12-06T10:00:00Z,po_1\n".encode()
        + LONG["reference"]
    )
    result = reconcile_cli(stack, tmp_path, "--report", str(report), "--json")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "line 3: reference" in result.stderr
    assert await stack.count("reconciliation_settlements") == 0
    assert await stack.count("reconciliation_runs") == 0
    payment = (await stack.client.get(f"/v1/payments/{paid['id']}")).json()
    assert payment["amount_settled"] == 0


def _capture_line(payment_id: str) -> bytes:
    return f"{payment_id}_a1,capture,2000,USD,53,1947,2026-12-06T10:00:00Z,po_1\n".encode()


async def test_a_report_file_without_lines_settled_before_finds_nothing_missing(
    stack: Stack, tmp_path: Path
) -> None:
    """A --report run has no earlier reports to tell it what settled before: the operations
    an earlier run settled were missing_at_acquirer in the next day's file."""
    paid = (await stack.pay(amount=2000)).json()
    first, later = tmp_path / "first.csv", tmp_path / "later.csv"
    first.write_bytes(HEADER + _capture_line(paid["id"]))
    later.write_bytes(HEADER)  # the next file: nothing of this payment in it
    settled = reconcile_cli(stack, tmp_path, "--report", str(first), "--grace-days", "0", "--json")
    assert (settled.returncode, json.loads(settled.stdout)) == (
        0,
        {"matched": 1, "discrepancies": []},
    )
    again = reconcile_cli(stack, tmp_path, "--report", str(later), "--grace-days", "0", "--json")
    assert (again.returncode, json.loads(again.stdout)) == (0, {"matched": 0, "discrepancies": []})


async def test_yesterdays_report_file_matches_with_grace_days_0(
    stack: Stack, tmp_path: Path
) -> None:
    """`--report` is the file of today (SPEC §7: --date or --report); with --grace-days 0 the
    books were today's only, and every line of a file of yesterday, for payments OncePay
    holds, was unknown_at_oncepay."""
    from sqlalchemy import update

    from oncepay.payments.storage.schema import ledger_transactions
    from oncepay.storage.db import write

    paid = (await stack.pay(amount=2000)).json()
    async with write(stack.db) as conn:  # captured yesterday
        await conn.execute(
            update(ledger_transactions)
            .where(ledger_transactions.c.payment_id == paid["id"])
            .values(created_at=ledger_transactions.c.created_at - 86400)
        )
    report = tmp_path / "yesterday.csv"
    report.write_bytes(HEADER + _capture_line(paid["id"]))
    result = reconcile_cli(stack, tmp_path, "--report", str(report), "--grace-days", "0", "--json")
    assert (result.returncode, json.loads(result.stdout)) == (
        0,
        {"matched": 1, "discrepancies": []},
    )


def _with_time(settled_at: str, quoted: bool) -> bytes:
    cells = ["r1", "capture", "100", "USD", "0", "100", settled_at, "po_1"]
    if quoted:
        cells = [f'"{cell}"' for cell in cells]
    return (
        HEADER
        + b"ok_1,capture,100,USD,0,100,2026-12-06T10:00:00Z,po_1\n"
        + (",".join(cells).encode() + b"\n")
    )


@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
@pytest.mark.parametrize(
    "settled_at", ["yesterday", "", "06/12/2026", "2026-12-06T25:00:00Z", "2026-13-01"]
)
def test_a_settlement_time_that_is_not_iso_8601_is_a_report_error(
    settled_at: str, quoted: bool
) -> None:
    """An unreadable settled_at was kept as written and the payment shown settled at the
    run's time instead: a silent substitution, where every other unreadable cell is an error."""
    content = _with_time(settled_at, quoted)
    with pytest.raises(ReportError, match="line 3: settled_at"):
        count_lines(content)
    with pytest.raises(ReportError, match="line 3: settled_at"):
        list(report_lines(content))


@pytest.mark.parametrize("quoted", [False, True], ids=["plain", "quoted"])
@pytest.mark.parametrize(
    "settled_at",
    [
        "2026-12-06",
        "2026-12-06 10:00:00",
        "2026-12-06T10:00:00.710Z",
        "2026-12-06T10:00:00+01:00",
        " 2026-12-06T10:00Z ",
    ],
)
def test_iso_8601_settlement_times_are_read(settled_at: str, quoted: bool) -> None:
    content = _with_time(settled_at, quoted)
    assert count_lines(content) == 2
    assert [line.settled_at for line in report_lines(content)][1] == settled_at.strip()
