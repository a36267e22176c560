"""Reading a settlement report, streaming: bytes in, :class:`ReportLine` out, one at a time.

Everything that makes the file unreadable raises :class:`ReportError` naming the line: bytes
that are not UTF-8, an empty file, a header without a mapped column, a blank line, a row with
the wrong number of cells, an unknown currency shape, a cell that is not an amount. Nothing is
ever read as zero; a caller that matches while reading sees the error before it writes
anything, since matching writes nothing."""

from __future__ import annotations

import codecs
import csv
import re
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.money import parse_major, parse_minor
from oncepay.reconciliation.records import ReportLine

__all__ = ["read_report"]

_CURRENCY = re.compile(r"^[A-Z]{3}$")


def read_report(stream: BinaryIO, mapping: ColumnMapping = ONCEPAY) -> Iterator[ReportLine]:
    """The lines of the report in ``stream`` (a binary file), in file order."""
    rows = csv.reader(_text_lines(stream), strict=True)
    header = _header(rows, mapping)
    index = {name: header.index(name) for name in mapping.required()}
    try:
        for number, row in enumerate(rows, start=2):
            line = _line(number, row, len(header), index, mapping)
            if line is not None:
                yield line
    except csv.Error as exc:
        raise ReportError(f"line {rows.line_num}: not valid CSV ({exc})") from exc


def _text_lines(stream: BinaryIO) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    for number, raw in enumerate(stream, start=1):
        try:
            text = decoder.decode(raw)
        except UnicodeDecodeError as exc:
            raise ReportError(f"line {number}: not UTF-8 ({exc.reason})") from exc
        if text.strip("\r\n") == "":
            raise ReportError(f"line {number}: blank line in the report")
        if "\x00" in text:
            raise ReportError(f"line {number}: NUL byte in the report (a binary file?)")
        yield text


def _header(rows: Iterator[list[str]], mapping: ColumnMapping) -> list[str]:
    header = next(rows, None)
    if header is None:
        raise ReportError("the report is empty (no header line)")
    missing = sorted(mapping.required() - set(header))
    if missing:
        raise ReportError(f"the header lacks column(s) {', '.join(missing)} ({mapping.name})")
    return header


def _line(
    number: int, row: list[str], width: int, index: dict[str, int], mapping: ColumnMapping
) -> ReportLine | None:
    if len(row) != width:
        raise ReportError(f"line {number}: {len(row)} cells, the header has {width}")
    cell = _Cells(number, row, index)
    kind = mapping.types.get(cell.text(mapping.type))
    if kind is None:
        return None  # payouts, fees, adjustments: not a movement of a payment
    currency = cell.text(mapping.currency).upper()  # Stripe writes "eur"
    if not _CURRENCY.match(currency):
        raise ReportError(f"line {number}: {mapping.currency} {currency!r} is not a currency")
    cell.currency, cell.major = currency, mapping.units == "major"
    amount = cell.amount(mapping.amount, mapping.amount_minus)
    if mapping.signed_amounts and kind == "refund":
        amount = -amount
    if amount <= 0:
        raise ReportError(f"line {number}: amount {amount} is not positive for a {kind}")
    return ReportLine(
        line=number,
        reference=cell.first(mapping.reference),
        type=kind,
        amount=amount,
        currency=currency,
        fee=cell.amount(mapping.fee, ()),
        net=cell.amount(mapping.net, mapping.net_minus),
        settled_at=cell.text(mapping.settled_at),
        payout_id=cell.text(mapping.payout_id),
        order_id=cell.text(mapping.order_id) if mapping.order_id else "",
    )


class _Cells:
    """One row's cells by column name, parsed with the line number in every error."""

    def __init__(self, number: int, row: list[str], index: dict[str, int]) -> None:
        self.number, self.row, self.index = number, row, index
        self.currency, self.major = "", False

    def text(self, column: str) -> str:
        return self.row[self.index[column]].strip()

    def first(self, columns: Iterable[str]) -> str:
        found = next((v for v in (self.text(c) for c in columns) if v), "")
        if not found:
            raise ReportError(f"line {self.number}: no reference in {', '.join(columns)}")
        return found

    def amount(self, plus: tuple[str, ...], minus: tuple[str, ...]) -> int:
        """The sum of ``plus`` less ``minus``; blank cells are absent parts, but at least one
        part must be written: a field with no value at all is an error, not a zero."""
        parts = [(c, 1) for c in plus] + [(c, -1) for c in minus]
        written = [(c, sign) for c, sign in parts if self.text(c)]
        if not written:
            raise ReportError(f"line {self.number}: no value in {', '.join(plus + minus)}")
        return sum(sign * self._money(c) for c, sign in written)

    def _money(self, column: str) -> int:
        text = self.text(column)
        try:
            return parse_major(text, self.currency) if self.major else parse_minor(text)
        except ValueError as exc:
            raise ReportError(f"line {self.number}: {column}: {exc}") from exc
