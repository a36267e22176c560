"""The pipeline's first pass, :func:`count_lines`: for every report, the count the parser
would give or the very error it would raise, whether the report took the one-expression way
(plain ASCII in the SPEC's columns) or the parser's."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from oncepay.reconciliation import MAPPINGS, ReportError, ReportLine, read_report, report
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.report import count_lines, counting, report_lines

DATA = Path(__file__).parent / "data"
HEADER = b"reference,type,amount,currency,fee,net,settled_at,payout_id\n"
GOOD = b"r1,capture,1000,EUR,39,961,2026-12-01T10:00:00Z,po_1\n"
REFUND = b"re_2,refund,500,EUR,0,-500,2026-12-01T10:00:00Z,po_1\n"


def parsed(content: bytes, mapping: ColumnMapping = ONCEPAY) -> int | str:
    try:
        return sum(1 for _ in read_report(io.BytesIO(content), mapping))
    except ReportError as exc:
        return f"error: {exc.detail}"


def counted(content: bytes, mapping: ColumnMapping = ONCEPAY) -> int | str:
    try:
        return count_lines(content, mapping)
    except ReportError as exc:
        return f"error: {exc.detail}"


REPORTS = [
    HEADER,
    HEADER.rstrip(b"\n"),
    HEADER + GOOD,
    HEADER + GOOD + REFUND,
    HEADER + GOOD + REFUND.rstrip(b"\n"),
    (HEADER + GOOD + REFUND).replace(b"\n", b"\r\n"),
    b"\xef\xbb\xbf" + HEADER + GOOD,
    HEADER + GOOD.replace(b"1000", b"0100"),  # leading zeros: the parser's way, still valid
    HEADER + GOOD.replace(b",39,", b",039,"),
    HEADER + GOOD.replace(b"1000", b" 1000 "),
    HEADER + GOOD.replace(b"EUR", b"eur"),
    HEADER + GOOD.replace(b"r1,", b" r1 ,"),
    HEADER + GOOD.replace(b"capture", b" capture "),
    HEADER + GOOD.replace(b",961,", b",-0,"),
    HEADER + GOOD.replace(b"1000", b"123456789012345678"),
    # errors, each the parser's own
    b"",
    b"\n" + GOOD,
    b"reference,type,amount,currency,fee,net\n" + GOOD,
    HEADER + GOOD.replace(b"1000", b"0"),
    HEADER + GOOD.replace(b"1000", b"000"),
    HEADER + GOOD.replace(b"1000", b"-1000"),
    HEADER + GOOD.replace(b"1000", b"1234567890123456789"),
    HEADER + GOOD.replace(b"1000", b"10.00"),
    HEADER + GOOD.replace(b"1000", b""),
    HEADER + GOOD.replace(b",39,", b",-39,"),
    HEADER + GOOD.replace(b",961,", b",,"),
    HEADER + GOOD.replace(b"EUR", b"EU"),
    HEADER + GOOD.replace(b"EUR", b"E1R"),
    HEADER + GOOD.replace(b"r1,", b","),
    HEADER + GOOD.replace(b"r1,", b"  ,"),
    HEADER + GOOD.replace(b"capture", b"captrue"),
    HEADER + GOOD.replace(b"capture", b""),
    HEADER + GOOD + b"\n" + GOOD,
    HEADER + GOOD + b"\r\n" + GOOD,
    HEADER + GOOD + b"\r",
    HEADER + GOOD + b"r2,capture\n",
    HEADER + GOOD.replace(b"\n", b",extra\n"),
    HEADER + GOOD.replace(b"po_1", b"po\t1"),
    HEADER + GOOD.replace(b"po_1", b"p\ro_1"),
    HEADER + "r\u00e9f,capture".encode() + GOOD[2:],
    HEADER + "r\u00e9f,capture".encode("latin-1") + GOOD[2:],
    HEADER + b'"r1,capture,1000\n',
    HEADER + b'"r1",capture,1000,EUR,39,961,t,po\n',
    HEADER + b"\x00\n",
    HEADER + GOOD * 3 + GOOD.replace(b"1000", b"x"),
]


@pytest.mark.parametrize("content", REPORTS)
def test_the_count_is_the_parsers_or_its_error(content: bytes) -> None:
    assert counted(content) == parsed(content)


@pytest.mark.parametrize("name", ["adyen_settlement_details.csv", "stripe_balance_itemized.csv"])
def test_the_real_formats_are_counted_by_the_parser(name: str) -> None:
    content = (DATA / name).read_bytes()
    mapping = MAPPINGS[name.split("_", maxsplit=1)[0]]
    assert counted(content, mapping) == parsed(content, mapping)
    assert isinstance(counted(content, mapping), int)


def test_a_plain_report_is_counted_without_the_parser_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The fast way is taken (the parser is not called) and a big report is counted in
    pieces, each a point where the pipeline lets its other tasks run."""
    content = HEADER + (GOOD + REFUND) * 50_000
    monkeypatch.setattr(report, "_PIECE", 1 << 20)

    def no_parser(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser was called")

    monkeypatch.setattr(report, "read_report", no_parser)
    counts = list(counting(content))
    assert counts[-1] == 100_000
    assert len(counts) > 3
    assert counts == sorted(counts)


def test_a_bad_line_late_in_a_plain_report_is_the_parsers_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(report, "_PIECE", 1 << 12)
    content = HEADER + GOOD * 5_000 + GOOD.replace(b"1000", b"1O00") + GOOD
    assert (
        counted(content)
        == parsed(content)
        == "error: line 5002: amount: '1O00' is not an integer amount in minor units"
    )


# -- the second pass: report_lines -------------------------------------------------------------


def lines_or_error(read: Iterator[ReportLine]) -> list[ReportLine] | str:
    try:
        return list(read)
    except ReportError as exc:
        return f"error: {exc.detail}"


ORDERED = ColumnMapping(  # the SPEC's columns in another order, with an order id
    name="ordered",
    reference=("ref",),
    type="kind",
    types={"sale": "capture", "refund": "refund"},
    currency="cur",
    amount=("gross",),
    fee=("fee",),
    net=("net",),
    settled_at="at",
    payout_id="payout",
    order_id="order",
)
ORDERED_REPORT = (
    b"payout,order,net,x,ref,fee,gross,cur,kind,at\n"
    b"po_1,pay_1 ,961,,r1,39,1000,eur, sale ,2026-12-01\n"
    b"po_1,,-500,y, re_2 ,0,500,EUR,refund,2026-12-01\r\n"
)


@pytest.mark.parametrize("content", REPORTS)
@pytest.mark.parametrize("name", sorted(MAPPINGS))
def test_report_lines_are_the_parsers_lines_or_its_error(content: bytes, name: str) -> None:
    mapping = MAPPINGS[name]
    assert lines_or_error(report_lines(content, mapping)) == lines_or_error(
        read_report(io.BytesIO(content), mapping)
    )


def test_report_lines_read_columns_in_any_order(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = list(read_report(io.BytesIO(ORDERED_REPORT), ORDERED))
    monkeypatch.setattr(report, "read_report", None)  # the fast way, not the parser's
    assert list(report_lines(ORDERED_REPORT, ORDERED)) == expected
    assert [line.order_id for line in expected] == ["pay_1", ""]


def test_a_plain_report_is_read_without_the_parser_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    content = HEADER + (GOOD + REFUND) * 5_000
    expected = list(read_report(io.BytesIO(content)))
    monkeypatch.setattr(report, "_LINES_PIECE", 1 << 12)

    def no_parser(*args: object, **kwargs: object) -> None:
        raise AssertionError("the parser was called")

    monkeypatch.setattr(report, "read_report", no_parser)
    assert list(report_lines(content)) == expected


def test_a_bad_line_late_hands_the_rest_to_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces before the bad line are given by the fast way, once; the parser gives the lines
    after them, then raises its own error at the bad line (a quoted line: read, not refused)."""
    monkeypatch.setattr(report, "_LINES_PIECE", 1 << 12)
    tail = GOOD.replace(b"1000", b"1O00") + GOOD
    content = HEADER + GOOD * 5_000 + tail
    assert lines_or_error(report_lines(content)) == lines_or_error(read_report(io.BytesIO(content)))
    quoted = HEADER + GOOD * 5_000 + b'"r9",capture,7,EUR,25,-18,2026-12-01,po\n' + REFUND
    given = list(report_lines(quoted))
    assert given == list(read_report(io.BytesIO(quoted)))
    assert len(given) == 5_002
    assert [line.line for line in given][-3:] == [5_001, 5_002, 5_003]
