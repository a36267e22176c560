"""OncePay's side of a reconciliation, read from the payments database: the money it moved
at one acquirer over some UTC days, and the payments the acquirer's authorizations name.
Read-only queries, in one read transaction each; nothing here writes.

A movement's day is the day its journal transaction was posted (the ledger is the book of
record: a capture or refund is posted when the acquirer approved it). Its reference is the one
OncePay sent: ``{payment}_a{attempt}`` for a capture made with the authorization
(``capture_method=automatic``), ``{payment}_capture`` for a separate capture, the refund's id
for a refund."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

from sqlalchemy import select

from oncepay.errors import OncePayError
from oncepay.payments.failover import reference as authorization_reference
from oncepay.payments.storage.schema import ledger_transactions, payments, refunds
from oncepay.reconciliation.records import Hold, Operation, Payment
from oncepay.storage.db import Database, read

__all__ = [
    "holds_from",
    "holds_of",
    "in_flight",
    "merchants_of",
    "operations_between",
    "payments_by_id",
]

# Payment ids per IN (...) list: well under SQLite's 32,766 bound variables and small enough
# for PostgreSQL to plan as an index lookup.
ID_BATCH = 500
# Movements read per query: the books are built a chunk of rows at a time, so a million rows
# are never held as driver tuples next to the operations made of them (peak memory).
BOOKS_CHUNK = 20_000


async def operations_between(
    db: Database,
    acquirer: str,
    first: date,
    last: date,
    *,
    after_chunk: Callable[[], object] | None = None,
) -> list[Operation]:
    """The captures and refunds posted from ``first`` to ``last`` (UTC days, inclusive) on
    payments held by ``acquirer``, ordered by reference. ``after_chunk`` is called after each
    chunk of rows is built (the pipeline freezes them out of the garbage collector's way)."""
    start, end = _midnight(first), _midnight(last + timedelta(days=1))
    tx, pay, ref = ledger_transactions, payments, refunds
    query = (
        select(
            tx.c.kind,
            tx.c.created_at,
            tx.c.refund_id,
            pay.c.id,
            pay.c.attempt,
            pay.c.capture_method,
            pay.c.amount_captured,
            pay.c.currency,
            ref.c.amount.label("refund_amount"),
            pay.c.merchant_id,
            tx.c.seq,
        )
        .join(pay, pay.c.id == tx.c.payment_id)
        .outerjoin(ref, ref.c.id == tx.c.refund_id)
        .where(
            tx.c.kind.in_(("capture", "refund")),
            tx.c.created_at >= start,
            tx.c.created_at < end,
            pay.c.acquirer == acquirer,
        )
    )
    # The few days and merchants of a million rows are shared, not a million copies each:
    # memory (the books are what a run holds) and a date conversion per row.
    days: dict[int, date] = {}
    shared: dict[str, str] = {}
    found: list[Operation] = []
    async with read(db) as conn:
        if db.is_sqlite:  # one snapshot already; chunks by keyset on seq, the rowid (read in
            # the table's own order: keyed on the id, each row cost a look-up from its index)
            # On the driver: the rows come as the tuples they are, with no result object and
            # no row made for each (~0.4 s of the books' ~3.5 s at 1M, which nothing overlaps).
            driver: Any = (await conn.get_raw_connection()).driver_connection
            sqlite: sqlite3.Connection = driver._conn
            after = -1
            while True:
                chunk = (start, end, acquirer, after, BOOKS_CHUNK)
                rows = sqlite.execute(_SQLITE_BOOKS, chunk).fetchall()
                found.extend(_operations(rows, days, shared))
                if after_chunk is not None:
                    after_chunk()
                if len(rows) < BOOKS_CHUNK:
                    break
                after = rows[-1][-1]
        else:  # one query, streamed (keyset chunks took 480 s for 1M rows at load 30)
            streamed = await conn.stream(query)
            async for part in streamed.partitions(BOOKS_CHUNK):
                rows = cast(list[tuple[Any, ...]], part)
                found.extend(_operations(rows, days, shared))
                if after_chunk is not None:
                    after_chunk()
    found.sort(key=lambda op: op.reference)
    return found


# operations_between's query on SQLite (the SQLAlchemy query's own columns and conditions),
# a keyset chunk of it.
_SQLITE_BOOKS = (
    "SELECT t.kind, t.created_at, t.refund_id, p.id, p.attempt, p.capture_method, "
    "p.amount_captured, p.currency, r.amount, p.merchant_id, t.seq "
    "FROM ledger_transactions AS t JOIN payments AS p ON p.id = t.payment_id "
    "LEFT OUTER JOIN refunds AS r ON r.id = t.refund_id "
    "WHERE t.kind IN ('capture', 'refund') AND t.created_at >= ? AND t.created_at < ? "
    "AND p.acquirer = ? AND t.seq > ? ORDER BY t.seq LIMIT ?"
)


def _operations(
    rows: list[tuple[Any, ...]], days: dict[int, date], shared: dict[str, str]
) -> list[Operation]:
    """:func:`_operation` of each row (its last column, the keyset's id, not read), the common
    row, an automatic capture, built inline: a million rows go through here before anything
    can match (a call per row with its keywords cost ~0.5 µs of the ~2)."""
    found: list[Operation] = []
    add = found.append
    new = tuple.__new__
    for row in rows:
        kind, created_at, _, payment_id, attempt, method, captured, currency, _, merchant, _ = row
        day = days.get(int(created_at // 86_400))
        if kind != "capture" or method != "automatic" or day is None:
            add(_operation(*row[:-1], days=days, shared=shared))
            continue
        add(  # Operation(...) without its generated __new__
            new(
                Operation,
                (
                    authorization_reference(payment_id, attempt),
                    payment_id,
                    "capture",
                    captured,
                    shared.setdefault(currency, currency),
                    day,
                    shared.setdefault(merchant, merchant),
                ),
            )
        )
    return found


def _operation(
    kind: str,
    created_at: float,
    refund_id: str | None,
    payment_id: str,
    attempt: int,
    capture_method: str,
    amount_captured: int,
    currency: str,
    refund_amount: int | None,
    merchant_id: str,
    *,
    days: dict[int, date],
    shared: dict[str, str],
) -> Operation:
    day = days.get(whole := int(created_at // 86_400))
    if day is None:
        day = days[whole] = datetime.fromtimestamp(whole * 86_400, UTC).date()
    merchant_id = shared.setdefault(merchant_id, merchant_id)
    currency = shared.setdefault(currency, currency)
    if kind == "refund":
        if refund_id is None or refund_amount is None:  # the ledger names a refund it lacks
            raise OncePayError(f"refund journal of payment {payment_id} has no refund row")
        return Operation(refund_id, payment_id, "refund", refund_amount, currency, day, merchant_id)
    if capture_method == "automatic":
        reference = authorization_reference(payment_id, attempt)
    else:
        reference = f"{payment_id}_capture"
    return Operation(reference, payment_id, "capture", amount_captured, currency, day, merchant_id)


async def payments_by_id(db: Database, ids: Iterable[str]) -> dict[str, Payment]:
    """The payments among ``ids`` that exist (an id OncePay never created is simply absent)."""
    wanted, found = sorted(set(ids)), {}
    async with read(db) as conn:
        for i in range(0, len(wanted), ID_BATCH):
            batch = wanted[i : i + ID_BATCH]
            query = select(payments.c.id, payments.c.status, payments.c.authorization_id).where(
                payments.c.id.in_(batch)
            )
            for row in (await conn.execute(query)).all():
                found[row.id] = Payment(row.id, row.status, row.authorization_id)
    return found


async def holds_from(db: Database, acquirer: str, before: date) -> list[Hold]:
    """Payments at ``acquirer`` still only authorized, authorized before the UTC day
    ``before``, ordered by payment id."""
    query = (
        select(
            payments.c.id,
            payments.c.attempt,
            payments.c.amount,
            payments.c.currency,
            payments.c.created_at,
        )
        .where(
            payments.c.status == "authorized",
            payments.c.acquirer == acquirer,
            payments.c.created_at < _midnight(before),
        )
        .order_by(payments.c.id)
    )
    async with read(db) as conn:
        rows = (await conn.execute(query)).all()
    return [
        Hold(pid, authorization_reference(pid, attempt), amount, currency, _day_of(created_at))
        for pid, attempt, amount, currency, created_at in rows
    ]


def _day_of(timestamp: float) -> date:
    return datetime.fromtimestamp(timestamp, UTC).date()


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


async def merchants_of(db: Database, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    """payment id -> (merchant id, authorization id), for the payments among ``ids``."""
    wanted, found = sorted(set(ids)), {}
    async with read(db) as conn:
        for i in range(0, len(wanted), ID_BATCH):
            query = select(payments.c.id, payments.c.merchant_id, payments.c.authorization_id)
            query = query.where(payments.c.id.in_(wanted[i : i + ID_BATCH]))
            for pid, merchant, authorization in (await conn.execute(query)).all():
                found[pid] = (merchant, authorization)
    return found


async def holds_of(db: Database, ids: Iterable[str], before: date) -> list[Hold]:
    """Holds of the payments among ``ids`` authorized before ``before``, whatever their status
    now (the payments reconciliation canceled as stale: a re-run finds them stale again)."""
    wanted, found = sorted(set(ids)), []
    async with read(db) as conn:
        for i in range(0, len(wanted), ID_BATCH):
            query = select(
                payments.c.id,
                payments.c.attempt,
                payments.c.amount,
                payments.c.currency,
                payments.c.created_at,
            ).where(payments.c.id.in_(wanted[i : i + ID_BATCH]))
            query = query.where(payments.c.created_at < _midnight(before))
            for pid, attempt, amount, currency, created_at in (await conn.execute(query)).all():
                reference = authorization_reference(pid, attempt)
                found.append(Hold(pid, reference, amount, currency, _day_of(created_at)))
    return found


async def in_flight(db: Database) -> frozenset[str]:
    """Payments with an acquirer call whose result OncePay has not booked yet: still
    ``processing``, a capture or cancel pending, or a refund pending. Read after the
    acquirer's report and before OncePay's movements, so that every line of the report is
    either booked in those movements or names one of these (OncePay books a movement after the
    acquirer made it): see :func:`~oncepay.reconciliation.matcher.without_in_flight`."""
    query = select(payments.c.id).where(
        (payments.c.status == "processing") | payments.c.pending_operation.is_not(None)
    )
    pending = select(refunds.c.payment_id).where(refunds.c.status == "pending")
    async with read(db) as conn:
        found = set((await conn.execute(query)).scalars())
        found.update((await conn.execute(pending)).scalars())
    return frozenset(found)
