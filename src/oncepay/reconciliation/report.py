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
from collections.abc import Iterator
from typing import BinaryIO

from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.money import parse_major, parse_minor
from oncepay.reconciliation.records import ReportLine

__all__ = ["read_report"]

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_BLANK = frozenset({b"", b"\n", b"\r\n", b"\r"})


def read_report(stream: BinaryIO, mapping: ColumnMapping = ONCEPAY) -> Iterator[ReportLine]:
    """The lines of the report in ``stream`` (a binary file), in file order."""
    rows = csv.reader(_text_lines(stream), strict=True)
    parse = _Parser(mapping, _header(rows, mapping))
    try:
        for row in rows:
            line = parse(rows.line_num, row)  # the physical line, as an editor shows it
            if line is not None:
                yield line
    except csv.Error as exc:
        raise ReportError(f"line {rows.line_num}: not valid CSV ({exc})") from exc


def _text_lines(stream: BinaryIO) -> Iterator[str]:
    for number, read in enumerate(stream, start=1):
        first = number == 1 and read.startswith(codecs.BOM_UTF8)  # as Excel writes UTF-8
        raw = read[len(codecs.BOM_UTF8) :] if first else read
        if raw in _BLANK:
            raise ReportError(f"line {number}: blank line in the report")
        if b"\x00" in raw:
            raise ReportError(f"line {number}: NUL byte in the report (a binary file?)")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ReportError(f"line {number}: not UTF-8 ({exc.reason})") from exc


def _header(rows: Iterator[list[str]], mapping: ColumnMapping) -> list[str]:
    header = next(rows, None)
    if header is None:
        raise ReportError("the report is empty (no header line)")
    missing = sorted(mapping.required() - set(header))
    if missing:
        raise ReportError(f"the header lacks column(s) {', '.join(missing)} ({mapping.name})")
    return header


class _Parser:
    """One report's rows to lines: the mapping's columns resolved to positions once, so that
    a row costs list indexing and integer parsing only (a million rows go through here)."""

    def __init__(self, mapping: ColumnMapping, header: list[str]) -> None:
        at = {name: header.index(name) for name in mapping.required()}
        self.mapping, self.header, self.width = mapping, header, len(header)
        self.reference = [at[c] for c in mapping.reference]
        self.type, self.currency = at[mapping.type], at[mapping.currency]
        self.amount = [(at[c], 1) for c in mapping.amount] + [
            (at[c], -1) for c in mapping.amount_minus
        ]
        self.fee = [(at[c], 1) for c in mapping.fee]
        self.net = [(at[c], 1) for c in mapping.net] + [(at[c], -1) for c in mapping.net_minus]
        self.settled_at, self.payout_id = at[mapping.settled_at], at[mapping.payout_id]
        self.order_id = at[mapping.order_id] if mapping.order_id else None
        self.major = mapping.units == "major"

    def __call__(self, number: int, row: list[str]) -> ReportLine | None:
        if len(row) != self.width:
            raise ReportError(f"line {number}: {len(row)} cells, the header has {self.width}")
        written = row[self.type].strip()
        kind = self.mapping.types.get(written)
        if kind is None:
            if written in self.mapping.skipped:
                return None  # payouts, fees, adjustments: not a movement of a payment
            raise ReportError(f"line {number}: type {written!r} is neither a movement nor skipped")
        currency = row[self.currency].strip().upper()  # Stripe writes "eur"
        if not _CURRENCY.match(currency):
            raise ReportError(f"line {number}: {currency!r} is not a currency code")
        amount = self._sum(number, row, self.amount, currency)
        if self.mapping.signed_amounts and kind == "refund":
            amount = -amount
        if amount <= 0:
            raise ReportError(f"line {number}: amount {amount} is not positive for a {kind}")
        return ReportLine(
            line=number,
            reference=self._reference(number, row),
            type=kind,
            amount=amount,
            currency=currency,
            fee=self._sum(number, row, self.fee, currency),
            net=self._sum(number, row, self.net, currency),
            settled_at=row[self.settled_at].strip(),
            payout_id=row[self.payout_id].strip(),
            order_id="" if self.order_id is None else row[self.order_id].strip(),
        )

    def _reference(self, number: int, row: list[str]) -> str:
        if len(self.reference) == 1 and (text := row[self.reference[0]].strip()):
            return text
        found = next((v for v in (row[i].strip() for i in self.reference) if v), "")
        if not found:
            columns = ", ".join(self.mapping.reference)
            raise ReportError(f"line {number}: no reference in {columns}")
        return found

    def _sum(self, number: int, row: list[str], parts: list[tuple[int, int]], currency: str) -> int:
        """The parts' sum; blank cells are absent parts, but at least one part must be
        written: a field with no value at all is an error, not a zero."""
        if len(parts) == 1 and not self.major:  # the SPEC's own columns: the fast path
            text = row[parts[0][0]].strip()
            if text.isascii() and text.isdigit() and len(text) <= 18:
                return parts[0][1] * int(text)
        total, written = 0, False
        for index, sign in parts:
            text = row[index].strip()
            if text:
                total += sign * self._money(number, index, text, currency)
                written = True
        if not written:
            names = ", ".join(self._name(index) for index, _ in parts)
            raise ReportError(f"line {number}: no value in {names}")
        return total

    def _money(self, number: int, index: int, text: str, currency: str) -> int:
        if not self.major and text.isascii() and text.isdigit() and len(text) <= 18:
            return int(text)  # the common case, checked without a regex
        try:
            return parse_major(text, currency) if self.major else parse_minor(text)
        except ValueError as exc:
            raise ReportError(f"line {number}: {self._name(index)}: {exc}") from exc

    def _name(self, index: int) -> str:
        return self.header[index]
