"""Reading settlement reports: the SPEC's CSV and the two real formats through their column
mappings, each on a sample file; every malformed report is a clear error, never a zero."""

from __future__ import annotations

import io
from datetime import date
from pathlib import Path

import pytest

from oncepay.reconciliation import (
    MAPPINGS,
    Books,
    FeeSchedule,
    Operation,
    ReportError,
    ReportLine,
    read_report,
    reconcile,
)
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE

DATA = Path(__file__).parent / "data"
SAMPLES = {
    "oncepay": "oncepay.csv",
    "adyen": "adyen_settlement_details.csv",
    "stripe": "stripe_balance_itemized.csv",
}
DAY = date(2026, 12, 1)
# What OncePay did on the sample day: the three movements every sample settles.
OPERATIONS = [
    Operation("pay_A_capture", "pay_A", "capture", 10000, "EUR", DAY),
    Operation("re_B", "pay_B", "refund", 3000, "EUR", DAY),
    Operation("pay_C_capture", "pay_C", "capture", 1500, "JPY", DAY),
]


def lines_of(name: str) -> list[ReportLine]:
    with (DATA / SAMPLES[name]).open("rb") as stream:
        return list(read_report(stream, MAPPINGS[name]))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_format_reads_to_the_same_movements_in_minor_units(name: str) -> None:
    lines = lines_of(name)
    assert [(x.reference, x.type, x.amount, x.currency, x.fee, x.net) for x in lines] == [
        ("pay_A_capture", "capture", 10000, "EUR", 165, 9835),
        ("re_B", "refund", 3000, "EUR", 0, -3000),
        ("pay_C_capture", "capture", 1500, "JPY", 46, 1454),
    ]
    assert all(line.payout_id for line in lines)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_sample_reconciles_cleanly_against_the_fee_schedule(name: str) -> None:
    outcome = reconcile(lines_of(name), Books(OPERATIONS), as_of=DAY, fees=DEFAULT_SCHEDULE)
    assert (outcome.matched, outcome.discrepancies) == (3, ())


def test_the_sample_payouts_sum_to_the_nets() -> None:
    nets: dict[str, int] = {}
    for line in lines_of("oncepay"):
        nets[line.payout_id] = nets.get(line.payout_id, 0) + line.net
    assert nets == {"po_20261201_EUR": 9835 - 3000, "po_20261201_JPY": 1454}
    assert FeeSchedule.net("refund", 3000, 0) == -3000


HEADER = b"reference,type,amount,currency,fee,net,settled_at,payout_id\n"
GOOD = b"r1,capture,1000,EUR,39,961,2026-12-01T10:00:00Z,po_1\n"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "the report is empty"),
        (b"reference,type,amount,currency,fee,net\n" + GOOD, "lacks column(s) payout_id"),
        (HEADER + GOOD.replace(b"1000", b"10.00"), "line 2: amount: '10.00' is not an integer"),
        (HEADER + GOOD.replace(b"1000", b""), "line 2: no value in amount"),
        (HEADER + GOOD.replace(b"1000", b"1e3"), "line 2: amount"),
        (HEADER + GOOD.replace(b",39,", b",abc,"), "line 2: fee"),
        (HEADER + GOOD.replace(b"1000", b"-1000"), "line 2: amount -1000 is not positive"),
        (HEADER + GOOD.replace(b"EUR", b"E1"), "is not a currency"),
        (HEADER + GOOD.replace(b"r1,", b","), "line 2: no reference"),
        (HEADER + GOOD + b"\n" + GOOD, "line 3: blank line"),
        (HEADER + GOOD + b"r2,capture\n", "line 3: 2 cells, the header has 8"),
        (HEADER + "r\u00e9f,capture".encode("latin-1") + GOOD[2:], "line 2: not UTF-8"),
        (HEADER + b'"r1,capture,1000\n', "not valid CSV"),
        (HEADER + b"\x00\n", "line 2: NUL byte"),
        ((HEADER + GOOD).decode().encode("utf-16"), "the report is UTF-16"),  # with its BOM
        ((HEADER + GOOD).decode().encode("utf-16-be"), "or UTF-16 without a byte order mark"),
        (HEADER + b'"r\n1",capture,x,EUR,39,961,t,po\n', "line 3: amount"),  # physical line
        (HEADER + GOOD.replace(b"capture", b"captrue"), "line 2: type 'captrue' is neither"),
    ],
)
def test_a_malformed_report_is_a_clear_error(content: bytes, message: str) -> None:
    with pytest.raises(ReportError) as caught:
        list(read_report(io.BytesIO(content)))
    assert message in caught.value.detail


def test_an_error_late_in_the_report_stops_before_any_outcome() -> None:
    """Matching consumes the stream; a bad last line means no outcome at all, not a partial
    one (a caller persists only an outcome)."""
    report = io.BytesIO(HEADER + GOOD * 3 + GOOD.replace(b"1000", b"x"))
    with pytest.raises(ReportError, match="line 5"):
        reconcile(read_report(report), Books([]), as_of=DAY)


def test_major_units_finer_than_the_currency_allows_are_refused() -> None:
    header = (DATA / SAMPLES["stripe"]).read_bytes().splitlines()[0] + b"\n"
    row = b"t,2026-12-01,2026-12-01,jpy,15.5,0,15.5,charge,ch,d,po,ref,pay,\n"
    with pytest.raises(ReportError, match="more decimals than JPY allows"):
        list(read_report(io.BytesIO(header + row), MAPPINGS["stripe"]))


def test_a_byte_order_mark_and_crlf_lines_are_read() -> None:
    content = b"\xef\xbb\xbf" + (HEADER + GOOD).replace(b"\n", b"\r\n")
    assert [line.amount for line in read_report(io.BytesIO(content))] == [1000]


def test_an_adyen_line_without_a_modification_reference_joins_through_the_residual() -> None:
    """An automatic capture at Adyen carries only the payment's merchant reference: the line
    joins OncePay's capture ``{payment}_a1`` by payment, type, currency and amount."""
    text = (DATA / SAMPLES["adyen"]).read_text().replace(",pay_A_capture,41", ",,41")
    lines = list(read_report(io.BytesIO(text.encode()), MAPPINGS["adyen"]))
    assert (lines[0].reference, lines[0].order_id) == ("pay_A", "pay_A")
    books = Books([OPERATIONS[0]._replace(reference="pay_A_a1"), *OPERATIONS[1:]])
    outcome = reconcile(lines, books, as_of=DAY, fees=DEFAULT_SCHEDULE)
    assert (outcome.matched, outcome.discrepancies) == (3, ())
