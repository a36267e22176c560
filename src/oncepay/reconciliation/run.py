"""One reconciliation run, end to end: OncePay's books from the payments database, the
acquirer's report (fetched for a day, or a file), the matcher, and the outcome. Nothing is
written here: keeping the run (``store``), posting (``settlement``) and voiding orphans
(``remediation``) are the caller's steps.

For day ``D`` with ``grace_days`` ``g``: OncePay's movements of days ``D-g`` to ``D+1`` are in
scope (``D+1`` because OncePay posts a movement after the acquirer made it: one made at
23:59:59.9 may be in the acquirer's report of ``D`` and in OncePay's books of ``D+1``; such a
movement is not due yet, so it is never reported missing early). The acquirer's reports of
``D-g`` to ``D-1`` say what was settled before (a reference settled again on ``D`` is a
duplicate), and the report of ``D`` is matched line by line. A movement of day ``D-g``
settled by none of them is missing; younger ones are not due yet; older ones were judged by
an earlier run."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path

from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.matcher import DEFAULT_VALIDITY_DAYS, Books, reconcile
from oncepay.reconciliation.records import Authorization, Outcome, ReportLine
from oncepay.reconciliation.report import read_report
from oncepay.reconciliation.source import holds_from, operations_between, payments_by_id
from oncepay.storage.db import Database

__all__ = ["reconcile_day", "reconcile_file"]


async def reconcile_day(
    db: Database, acquirer: AcquirerReports, day: date, grace_days: int
) -> Outcome:
    """The acquirer's report of ``day`` against OncePay's books, orphans included; fees
    checked against the simulator's schedule."""
    first = day - timedelta(days=grace_days)
    earlier: set[str] = set()
    for past in _days(first, day - timedelta(days=1)):
        earlier.update(line.reference for line in _lines(await acquirer.settlement_csv(past)))
    report = await acquirer.settlement_csv(day)
    authorizations = await acquirer.authorizations(day)
    last = day + timedelta(days=1)
    books = await _books(db, acquirer.name, first, last, authorizations, frozenset(earlier))
    lines = _lines(report)
    return reconcile(
        lines, books, authorizations, as_of=day, grace_days=grace_days, fees=DEFAULT_SCHEDULE
    )


async def reconcile_file(
    db: Database,
    acquirer: str,
    path: Path,
    day: date,
    grace_days: int,
    mapping: ColumnMapping = ONCEPAY,
) -> Outcome:
    """A report file (a real processor's, read through ``mapping``) as the report of ``day``:
    no authorizations (orphans need the acquirer), no earlier reports, and the fee checked
    only for ``net = amount - fee`` (a processor's own schedule is not known here)."""
    first, last = day - timedelta(days=grace_days), day + timedelta(days=1)
    books = await _books(db, acquirer, first, last, [], frozenset())
    with path.open("rb") as stream:
        return reconcile(read_report(stream, mapping), books, as_of=day, grace_days=grace_days)


async def _books(
    db: Database,
    acquirer: str,
    first: date,
    last: date,
    authorizations: list[Authorization],
    settled_before: frozenset[str],
) -> Books:
    operations = await operations_between(db, acquirer, first, last)
    payments = await payments_by_id(db, (a.order_id for a in authorizations))
    stale_from = last - timedelta(days=DEFAULT_VALIDITY_DAYS)
    holds = await holds_from(db, acquirer, stale_from)
    return Books(operations, payments, settled_before, holds)


def _lines(report: bytes) -> Iterator[ReportLine]:
    return read_report(io.BytesIO(report), ONCEPAY)


def _days(first: date, last: date) -> Iterator[date]:
    while first <= last:
        yield first
        first += timedelta(days=1)
