"""Reading a settlement report, streaming: bytes in, :class:`ReportLine` out, one at a time.

Everything that makes the file unreadable raises :class:`ReportError` naming the line: bytes
that are not UTF-8, an empty file, a header without a mapped column, a blank line (but at the
end of the file, as spreadsheets write them), a row with
the wrong number of cells, an unknown currency shape, a cell that is not an amount. Nothing is
ever read as zero; a caller that matches while reading sees the error before it writes
anything, since matching writes nothing."""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, tzinfo
from functools import lru_cache
from operator import itemgetter
from typing import BinaryIO, NoReturn
from zoneinfo import ZoneInfo

from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.money import parse_major, parse_minor
from oncepay.reconciliation.records import ReportLine

__all__ = ["count_lines", "read_report", "report_lines"]

_CURRENCY = re.compile(r"^[A-Z]{3}$")
# The longest cell the settlement tables keep (reconciliation/store.py): a reference, payout id
# or payment id of 255 characters, a settlement time of 40. PostgreSQL refuses more, and by
# then earlier lines of the report have settled: such a line is refused with the report.
MAX_TEXT = 255
MAX_TIME = 40
# A settlement time is ISO 8601 as datetime.fromisoformat reads it: a day, then optionally a
# time (to the hour, minute, second or fraction) and an offset. Both ways of reading a report
# check this one shape; anything else was kept as written and the payment shown settled at the
# run's time, a silent substitution.
# The month and day must be a day of the calendar (no 02-30, no 04-31); 02-29 of a year that
# is not a leap year is the one case the shape lets through: :func:`_real_day` refuses it.
_ISO_TIME = (
    r"[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
    r"|(?:0[13578]|1[02])-31|02-29)"
    r"(?:[T ](?:[01][0-9]|2[0-3])(?::[0-5][0-9](?::[0-5][0-9](?:\.[0-9]{1,9})?)?)?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3])(?::?[0-5][0-9])?)?)?"
)
_SETTLED_AT = re.compile(_ISO_TIME)
_HAS_OFFSET = re.compile(r"(?:Z|[+-][0-9:]+)$")


@lru_cache(maxsize=1024)
def _real_day(day: str) -> bool:
    """``day`` (YYYY-MM-DD, already of the right shape) is a day of the calendar: the shape
    admits 02-29 of any year."""
    if day[5:] != "02-29":
        return True
    year = int(day[:4])
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


@lru_cache(maxsize=64)
def _zone(name: str) -> tzinfo:
    if name.upper() in {"UTC", "GMT", "Z"}:
        return UTC
    return ZoneInfo(name)


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


def report_lines(report: bytes, mapping: ColumnMapping = ONCEPAY) -> Iterator[ReportLine]:
    """:func:`read_report` of ``report``'s bytes: the same lines, the same error.

    A report in :func:`counting`'s plainest shape is read a piece (~2,000 lines) at a time by
    one expression that checks each line as :func:`counting` does and cuts out its cells
    (``findall``, in C): a line's cells are then stripped and converted as the parser would,
    with none of the parser's checks left to fail (~1.5 µs a line against ~4 for the CSV
    reader and the parser). A piece with a line the expression does not take hands the report
    to the parser, which skips the lines already given and reads (or refuses) the rest."""
    plain = _plain(report, mapping)
    if plain is None:
        yield from read_report(io.BytesIO(report), mapping)
        return
    _, start, header = plain
    cells = _cells_pattern(header, _roles(mapping, header))
    order = mapping.order_column(header)
    fields = (
        mapping.reference[0],
        mapping.type,
        mapping.amount[0],
        mapping.currency,
        mapping.fee[0],
        mapping.net[0],
        mapping.settled_at,
        mapping.payout_id,
        order or mapping.type,  # no order id: a cell that is not read
    )
    pick = itemgetter(*(header.index(name) for name in fields))
    kinds = mapping.types
    new = tuple.__new__
    given = 0
    while start < len(report):
        end = report.find(b"\n", start + _LINES_PIECE)
        end = len(report) if end < 0 else end + 1
        piece = report[start:end].decode("ascii")
        found = cells.findall(piece)
        if len(found) != piece.count("\n") + (not piece.endswith("\n")):
            break  # a line the expression does not take: the parser's way from here
        number = given + 1  # the header is line 1
        for row in found:
            reference, kind, amount, currency, fee, net, settled_at, payout_id, order_id = pick(row)
            number += 1
            yield new(  # ReportLine(...) without its generated __new__: 1 µs a line less
                ReportLine,
                (
                    number,
                    reference.strip(),
                    kinds[kind.strip()],
                    int(amount),
                    currency.strip().upper(),
                    int(fee),
                    int(net),
                    settled_at.strip(),
                    payout_id.strip(),
                    order_id.strip() if order else "",
                ),
            )
        given += len(found)
        start = end
    else:
        return
    for count, line in enumerate(read_report(io.BytesIO(report), mapping)):
        if count >= given:
            yield line


_LINES_PIECE = 1 << 18  # characters per piece of report_lines (~2,000 lines: ~1.5 MB of cells)


def count_lines(report: bytes, mapping: ColumnMapping = ONCEPAY) -> int:
    """The number of lines :func:`read_report` yields for ``report``, having checked every
    line as it does: the same :class:`ReportError` for the same report."""
    return list(counting(report, mapping))[-1]


def counting(report: bytes, mapping: ColumnMapping = ONCEPAY) -> Iterator[int]:
    """:func:`count_lines` a piece at a time: the lines counted so far, after each piece (a
    caller on an event loop lets other tasks run between two); the last is the count.

    A report in the plainest shape (printable ASCII, no quotes, a mapping whose amounts are
    single columns of minor units) is checked by one regular expression, a piece of ~65,000
    lines at a time, ~0.4 µs a line against ~2.7 µs for parsing it; it accepts only lines the
    parser reads without error (every amount a plain integer, the amount above zero, a known
    type, a three-letter currency, a reference). Anything else, an error included, sends the
    whole report through the parser, which raises the error."""
    yield 0
    plain = _plain(report, mapping)
    if plain is not None:
        pattern, start, _ = plain
        count = 0
        while start < len(report):
            end = report.find(b"\n", start + _PIECE)
            end = len(report) if end < 0 else end + 1
            remains, found = pattern.subn(b"", report[start:end])
            if remains:
                break
            count, start = count + found, end
            yield count
        else:
            return
    count = 0
    for count, _ in enumerate(read_report(io.BytesIO(report), mapping), 1):
        if not count % _YIELD_EVERY:
            yield count
    yield count


_PIECE = 1 << 22  # characters of the report per piece (~4 MB, ~30 ms)
_YIELD_EVERY = 4096  # parsed lines between two counts


# A cell of printable ASCII without a quote or a comma; the same with at least one non-space.
_CELL = rb"[ !#-+\--~]*"
_FILLED = rb"[ !#-+\--~]*[!#-+\--~][ !#-+\--~]*"
_POSITIVE = rb" *[1-9][0-9]{0,17} *"  # the parser's fast path, above zero
_NATURAL = rb" *(?:0|[1-9][0-9]{0,17}) *"
_SIGNED = rb" *-?(?:0|[1-9][0-9]{0,17}) *"  # parse_minor's shape
# A cell of at most MAX_TEXT characters (a filled one), spaces included: never longer than the
# parser allows once it has stripped them; a settlement time in the parser's one shape.
_FILLED_TEXT = rb"(?=[ !#-+\--~]{0,%d}(?![ !#-+\--~]))" % MAX_TEXT + _FILLED
_TEXT = rb"[ !#-+\--~]{0,%d}" % MAX_TEXT
_TIME = rb" *" + _ISO_TIME.encode("ascii") + rb" *"  # never longer than MAX_TIME, stripped


def _plain(
    report: bytes, mapping: ColumnMapping
) -> tuple[re.Pattern[bytes], int, tuple[str, ...]] | None:
    """The pattern of one clean line of ``report``, where its first line after the header
    starts and the header's columns, when the report and the mapping are plain enough for it
    (the report's bytes are matched in place: no decoded copy of a 100 MB report)."""
    simple = (
        mapping.units == "minor"
        and not mapping.signed_amounts
        and not mapping.skipped
        and not mapping.amount_minus
        and not mapping.net_minus
        and all(len(g) == 1 for g in (mapping.reference, mapping.amount, mapping.fee, mapping.net))
    )
    simple = simple and all(t and t.isascii() and t == t.strip() for t in mapping.types)
    if not simple or not report.isascii() or b"\x00" in report or b'"' in report:
        return None
    if b"-02-29" in report:  # is its year a leap year? The parser checks (_real_day)
        return None
    end = report.find(b"\n")
    first, start = (report, len(report)) if end < 0 else (report[:end], end + 1)
    first = first.removesuffix(b"\r")
    if not first or b"\r" in first:
        return None
    header = tuple(first.decode("ascii").split(","))
    if not mapping.required() <= set(header):
        return None
    roles = _roles(mapping, header)
    if len({column for column, _ in roles}) != len(roles):
        return None
    return _line_pattern(header, roles), start, header


def _roles(mapping: ColumnMapping, header: Sequence[str]) -> tuple[tuple[str, bytes], ...]:
    """The plain shape of each matched column of ``header``: reference, type, currency,
    amount, fee, net, and the length of the settlement time, the payout id and the payment
    id (when the header has its column)."""
    types = b"|".join(re.escape(t.encode("ascii")) for t in sorted(mapping.types))
    column = mapping.order_column(header)
    order = ((column, _TEXT),) if column else ()
    return (
        (mapping.reference[0], _FILLED_TEXT),
        (mapping.type, b" *(?:" + types + b") *"),
        (mapping.currency, b" *[A-Za-z]{3} *"),
        (mapping.amount[0], _POSITIVE),
        (mapping.fee[0], _NATURAL),
        (mapping.net[0], _SIGNED),
        (mapping.settled_at, _TIME),
        (mapping.payout_id, _TEXT),
        *order,
    )


@lru_cache(maxsize=16)
def _line_pattern(
    header: tuple[str, ...], roles: tuple[tuple[str, bytes], ...]
) -> re.Pattern[bytes]:
    """One data line (and its end) of ``header``'s report, as the parser reads it cleanly:
    each role's column (the first of that name, as the parser takes it) by its pattern."""
    cells = [_CELL] * len(header)
    for column, pattern in roles:
        cells[header.index(column)] = pattern
    return re.compile(b",".join(cells) + rb"(?:\r?\n|\Z)")


@lru_cache(maxsize=16)
def _cells_pattern(
    header: tuple[str, ...], roles: tuple[tuple[str, bytes], ...]
) -> re.Pattern[str]:
    """:func:`_line_pattern` as text, each line anchored at its start (``MULTILINE``: a match
    is a whole line, never the end of one), every cell a group."""
    cells = [_CELL] * len(header)
    for column, pattern in roles:
        cells[header.index(column)] = pattern
    grouped = b",".join(b"(" + cell + b")" for cell in cells) + rb"(?:\r?\n|\Z)"
    return re.compile("(?m)^" + grouped.decode("ascii"))


def _text_lines(stream: BinaryIO) -> Iterator[str]:
    blank = 0  # the first of the blank lines just read: allowed at the end of the file only
    for number, read in enumerate(stream, start=1):
        first = number == 1 and read.startswith(codecs.BOM_UTF8)  # as Excel writes UTF-8
        raw = read[len(codecs.BOM_UTF8) :] if first else read
        if raw in _BLANK:
            blank = blank or number
            continue
        if blank:
            raise ReportError(f"line {blank}: blank line in the report")
        if number == 1 and read.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            raise ReportError(
                "the report is UTF-16 (its byte order mark says so): save it as UTF-8"
            )
        if b"\x00" in raw:
            raise ReportError(
                f"line {number}: NUL byte in the report (a binary file, or UTF-16 without a "
                "byte order mark?)"
            )
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
        order_column = mapping.order_column(header)
        self.mapping, self.header, self.width = mapping, header, len(header)
        self.reference = [at[c] for c in mapping.reference]
        self.type, self.currency = at[mapping.type], at[mapping.currency]
        self.amount = [(at[c], 1) for c in mapping.amount] + [
            (at[c], -1) for c in mapping.amount_minus
        ]
        self.fee = [(at[c], 1) for c in mapping.fee]
        self.net = [(at[c], 1) for c in mapping.net] + [(at[c], -1) for c in mapping.net_minus]
        self.settled_at, self.payout_id = at[mapping.settled_at], at[mapping.payout_id]
        self.order_id = header.index(order_column) if order_column else None
        self.major = mapping.units == "major"
        zone_column = mapping.zone_column(header)
        self.zone = header.index(zone_column) if zone_column else None

    def _zoned(self, number: int, row: list[str], settled_at: str, column: int) -> str:
        """A time written without an offset, in the time zone the row's zone column names
        (Adyen's ``TimeZone``), as ISO 8601 with that offset; a time with an offset, or a row
        whose zone cell is blank, as written (a time without an offset is UTC)."""
        written = row[column].strip()
        if not written or len(settled_at) <= 10 or _HAS_OFFSET.search(settled_at[10:]):
            return settled_at
        try:
            zone = _zone(written)
        except (ValueError, KeyError):
            raise ReportError(
                f"line {number}: time zone {written!r} ({self.mapping.time_zone}) is not one "
                "this machine's time zone database knows"
            ) from None
        if zone is UTC:
            return settled_at  # a time without an offset is UTC already
        return datetime.fromisoformat(settled_at).replace(tzinfo=zone).isoformat()

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
        reference = self._reference(number, row)
        settled_at = row[self.settled_at].strip()
        payout_id = row[self.payout_id].strip()
        order_id = "" if self.order_id is None else row[self.order_id].strip()
        if not _SETTLED_AT.fullmatch(settled_at) or not _real_day(settled_at[:10]):
            column = self.mapping.settled_at
            where = "" if column == "settled_at" else f" ({column})"
            raise ReportError(
                f"line {number}: settled_at{where} {settled_at!r} is not an ISO 8601 time "
                "(a day of the calendar, then optionally a time and an offset)"
            )
        if self.zone is not None:
            settled_at = self._zoned(number, row, settled_at, self.zone)
        if (
            len(reference) > MAX_TEXT
            or len(settled_at) > MAX_TIME
            or len(payout_id) > MAX_TEXT
            or len(order_id) > MAX_TEXT
        ):
            self._too_long(number, reference, settled_at, payout_id, order_id)
        return ReportLine(
            line=number,
            reference=reference,
            type=kind,
            amount=amount,
            currency=currency,
            fee=self._sum(number, row, self.fee, currency),
            net=self._sum(number, row, self.net, currency),
            settled_at=settled_at,
            payout_id=payout_id,
            order_id=order_id,
        )

    def _too_long(
        self, number: int, reference: str, settled_at: str, payout_id: str, order_id: str
    ) -> NoReturn:
        m = self.mapping
        for field, column, value, limit in (
            ("reference", ", ".join(m.reference), reference, MAX_TEXT),
            ("settled_at", m.settled_at, settled_at, MAX_TIME),
            ("payout_id", m.payout_id, payout_id, MAX_TEXT),
            ("order_id", m.order_id, order_id, MAX_TEXT),
        ):
            if len(value) > limit:
                where = "" if column == field else f" ({column})"
                raise ReportError(
                    f"line {number}: {field}{where} is {len(value)} characters long, "
                    f"more than {limit}"
                )
        raise AssertionError("no cell is too long")  # pragma: no cover

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
