"""What operators ask of the kept runs and discrepancies (the operator API, docs/
reconciliation.md "Operator API"): pages of runs and of discrepancies under filters, one of
each with its evidence, and the closing of a discrepancy inside a caller's transaction (so the
change and the answer stored under the request's Idempotency-Key commit together).

Rows are answered with every column their table has, so a column a migration adds shows up
without a change here. Pages are newest first with a cursor (``starting_after``: the last
object of the previous page), as in the merchants' API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.context import Services
from oncepay.payments.metrics import (
    RECONCILIATION_ACTIONS,
    RECONCILIATION_DISCREPANCIES,
    RECONCILIATION_LINES,
    RECONCILIATION_OPEN,
    RECONCILIATION_RUNS,
)
from oncepay.payments.storage.schema import payments
from oncepay.reconciliation import pipeline
from oncepay.reconciliation.pipeline import RunResult
from oncepay.reconciliation.store import discrepancies, runs, settlements
from oncepay.storage.db import Database, read

__all__ = [
    "CLOSED",
    "STATUSES",
    "DiscrepancyClosed",
    "DiscrepancyFilter",
    "Observed",
    "RunFilter",
    "close_in",
    "count_open",
    "discrepancy",
    "discrepancy_page",
    "evidence",
    "observe",
    "observe_failure",
    "observe_open",
    "observe_run",
    "observed",
    "result_document",
    "run",
    "run_page",
]

STATUSES = ("open", "resolved", "accepted")
CLOSED = ("resolved", "accepted")


class DiscrepancyClosed(LookupError):
    """The discrepancy was closed already (its row says how and why)."""

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__(f"discrepancy {row['id']} is {row['status']} already")
        self.row = row


@dataclass(frozen=True, slots=True)
class RunFilter:
    acquirer: str | None = None
    day_from: date | None = None
    day_to: date | None = None


@dataclass(frozen=True, slots=True)
class DiscrepancyFilter:
    kind: str | None = None
    status: str | None = None
    acquirer: str | None = None
    payment_id: str | None = None
    reference: str | None = None
    day_from: date | None = None  # the UTC day of the run that opened it
    day_to: date | None = None


def _days(column: Any, first: date | None, last: date | None) -> list[ColumnElement[bool]]:
    # Days are kept as ISO strings: their order is the days' order.
    found: list[ColumnElement[bool]] = []
    if first is not None:
        found.append(column >= first.isoformat())
    if last is not None:
        found.append(column <= last.isoformat())
    return found


async def run_page(
    db: Database, where: RunFilter, limit: int, starting_after: str | None
) -> tuple[list[dict[str, Any]], bool] | None:
    """A page of runs, newest first; None when ``starting_after`` names no run."""
    conditions = _days(runs.c.day, where.day_from, where.day_to)
    if where.acquirer is not None:
        conditions.append(runs.c.acquirer == where.acquirer)
    async with read(db) as conn:
        if starting_after is not None:
            cursor = (
                await conn.execute(
                    select(runs.c.created_at, runs.c.id).where(runs.c.id == starting_after)
                )
            ).first()
            if cursor is None:
                return None
            at, rid = cursor
            conditions.append(
                or_(runs.c.created_at < at, and_(runs.c.created_at == at, runs.c.id < rid))
            )
        query = (
            select(runs)
            .where(*conditions)
            .order_by(runs.c.created_at.desc(), runs.c.id.desc())
            .limit(limit + 1)
        )
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    return rows[:limit], len(rows) > limit


async def run(db: Database, run_id: str) -> dict[str, Any] | None:
    async with read(db) as conn:
        row = (await conn.execute(select(runs).where(runs.c.id == run_id))).mappings().first()
        if row is None:
            return None
        counts = await conn.execute(
            select(discrepancies.c.status, func.count())
            .where(discrepancies.c.run_id == run_id)
            .group_by(discrepancies.c.status)
        )
        opened = {status: int(n) for status, n in counts}
    # How the discrepancies this run opened stand now.
    return {**row, "opened": {status: opened.get(status, 0) for status in STATUSES}}


def _with_day() -> Any:
    """Discrepancies with the day of the run that opened them (unless the table keeps one)."""
    if "day" in discrepancies.c:
        return select(discrepancies), discrepancies.c.day
    joined = discrepancies.outerjoin(runs, runs.c.id == discrepancies.c.run_id)
    return select(discrepancies, runs.c.day).select_from(joined), runs.c.day


async def discrepancy_page(
    db: Database, where: DiscrepancyFilter, limit: int, starting_after: int | None
) -> tuple[list[dict[str, Any]], bool]:
    """A page of discrepancies, newest first (by id)."""
    query, day = _with_day()
    conditions = _days(day, where.day_from, where.day_to)
    for column, value in (
        (discrepancies.c.kind, where.kind),
        (discrepancies.c.status, where.status),
        (discrepancies.c.acquirer, where.acquirer),
        (discrepancies.c.payment_id, where.payment_id),
        (discrepancies.c.reference, where.reference),
    ):
        if value is not None:
            conditions.append(column == value)
    if starting_after is not None:
        conditions.append(discrepancies.c.id < starting_after)
    query = query.where(*conditions).order_by(discrepancies.c.id.desc()).limit(limit + 1)
    async with read(db) as conn:
        rows = [dict(row) for row in (await conn.execute(query)).mappings()]
    return rows[:limit], len(rows) > limit


async def discrepancy(db: Database, discrepancy_id: int) -> dict[str, Any] | None:
    query, _ = _with_day()
    async with read(db) as conn:
        found = await conn.execute(query.where(discrepancies.c.id == discrepancy_id))
        row = found.mappings().first()
    return None if row is None else dict(row)


async def evidence(db: Database, row: dict[str, Any]) -> dict[str, Any]:
    """The records behind a discrepancy: the run that opened it, the payment it names (as
    OncePay holds it now) and the settlement booked under its reference, if any."""
    async with read(db) as conn:
        opened_by = (
            (await conn.execute(select(runs).where(runs.c.id == row["run_id"]))).mappings().first()
        )
        payment = None
        if row.get("payment_id"):
            payment = (
                (await conn.execute(select(payments).where(payments.c.id == row["payment_id"])))
                .mappings()
                .first()
            )
        settled = (
            (
                await conn.execute(
                    select(settlements).where(settlements.c.reference == row["reference"])
                )
            )
            .mappings()
            .first()
        )
    return {
        "detail": row["detail"],
        "run": None if opened_by is None else dict(opened_by),
        "payment": None if payment is None else _payment(payment),
        "settlement": None if settled is None else dict(settled),
    }


def _payment(row: Any) -> dict[str, Any]:
    keep = (
        "id",
        "merchant_id",
        "amount",
        "currency",
        "status",
        "amount_captured",
        "amount_refunded",
        "acquirer",
        "attempt",
        "authorization_id",
        "created_at",
        "updated_at",
    )
    found = {key: row[key] for key in keep}
    # Settlement fields, when the payments table has them (issue 15's migration adds them).
    found |= {key: value for key, value in row.items() if "settle" in key}
    return found


async def close_in(
    conn: AsyncConnection, discrepancy_id: int, status: str, note: str, *, now: float
) -> dict[str, Any] | None:
    """Close an open discrepancy as ``status`` with ``note``, in the caller's transaction.
    None when there is no such discrepancy; :class:`DiscrepancyClosed` when it is closed."""
    if status not in CLOSED or not note.strip():
        raise ValueError("a discrepancy is closed as resolved or accepted, with a note")
    done = await conn.execute(
        update(discrepancies)
        .where(discrepancies.c.id == discrepancy_id, discrepancies.c.status == "open")
        .values(status=status, note=note, closed_at=now)
    )
    query, _ = _with_day()
    row = (await conn.execute(query.where(discrepancies.c.id == discrepancy_id))).mappings().first()
    if row is None:
        return None
    if done.rowcount != 1:
        raise DiscrepancyClosed(dict(row))
    return dict(row)


async def count_open(db: Database) -> dict[tuple[str, str], int]:
    """Open discrepancies by (acquirer, kind): the metrics' gauge."""
    query = (
        select(discrepancies.c.acquirer, discrepancies.c.kind, func.count())
        .where(discrepancies.c.status == "open")
        .group_by(discrepancies.c.acquirer, discrepancies.c.kind)
    )
    async with read(db) as conn:
        return {(acquirer, kind): int(n) for acquirer, kind, n in await conn.execute(query)}


# -- metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    """What one run did, as the metrics count it."""

    acquirer: str
    new_run: bool  # False: the day gave the same outcome before, nothing was written
    lines: int  # report lines read
    discrepancies: int  # found by the run (open, closed or new)
    opened: tuple[str, ...] = ()  # kinds of the discrepancies opened for the first time
    voided: int = 0
    void_failures: int = 0
    withheld: int = 0  # actions withheld over the cap


def observe_run(seen: Observed) -> None:
    acquirer = seen.acquirer
    if not seen.new_run:
        outcome = "unchanged"
    else:
        outcome = "discrepancies" if seen.discrepancies else "clean"
    RECONCILIATION_RUNS.labels(acquirer, outcome).inc()
    RECONCILIATION_LINES.labels(acquirer).inc(seen.lines)
    for kind in seen.opened:
        RECONCILIATION_DISCREPANCIES.labels(acquirer, kind).inc()
    for result, n in (
        ("taken", seen.voided),
        ("failed", seen.void_failures),
        ("withheld", seen.withheld),
    ):
        if n:
            RECONCILIATION_ACTIONS.labels(acquirer, result).inc(n)


def observe(result: RunResult) -> None:
    """Count a run of the pipeline (:func:`observe_open` then sets the open gauge)."""
    opened = tuple(kind for kind, n in sorted(result.opened_kinds.items()) for _ in range(n))
    observe_run(
        Observed(
            result.acquirer,
            result.new_run,
            result.lines,
            len(result.discrepancies),
            opened,
            voided=result.actions_taken,
            void_failures=result.actions_refused,
            withheld=result.actions_withheld,
        )
    )


def result_document(result: RunResult) -> dict[str, Any]:
    """A run as the operator API answers it."""
    return {
        "id": result.run_id,
        "object": "reconciliation_run",
        "acquirer": result.acquirer,
        "day": result.day.isoformat(),
        "new_run": result.new_run,
        "lines": result.lines,
        "matched": result.matched,
        "settled": result.settled,
        "opened": result.opened,
        "still_open": result.still_open,
        "actions": {
            "taken": result.actions_taken,
            "withheld": result.actions_withheld,
            "pending": result.actions_pending,
            "refused": result.actions_refused,
        },
        "discrepancies": [d.as_json() for d in result.discrepancies],
    }


def observe_failure(acquirer: str) -> None:
    RECONCILIATION_RUNS.labels(acquirer, "failed").inc()


async def observed(services: Services, acquirer: str, **options: Any) -> RunResult:
    """:func:`~oncepay.reconciliation.pipeline.reconcile`, counted in the metrics: the paths
    that run the pipeline in a process whose ``/metrics`` is scraped (the operator API, the
    worker's schedule) call it through here."""
    try:
        result = await pipeline.reconcile(services, acquirer, **options)
    except Exception:
        observe_failure(acquirer)
        raise
    observe(result)
    await observe_open(services.db)
    return result


async def observe_open(db: Database) -> None:
    """The open-discrepancies gauge from the database: every (acquirer, kind) seen so far is
    set, to 0 when none is open any more."""
    counts = await count_open(db)
    for labels, n in counts.items():
        RECONCILIATION_OPEN.labels(*labels).set(n)
    for metric in RECONCILIATION_OPEN.collect():
        for sample in metric.samples:
            labels = (sample.labels["acquirer"], sample.labels["kind"])
            if labels not in counts:
                RECONCILIATION_OPEN.labels(*labels).set(0)
