"""What the dashboard reads, every query on an index (migration 9 adds the ones the searches
need), every list a keyset page (newest first, ``before`` the last ``seq`` shown): fast with a
million payments, and the same on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text
from sqlalchemy.engine import Row

from oncepay.payments.acquirers import journal
from oncepay.payments.storage import schema
from oncepay.payments.storage.idempotency import IDEMPOTENCY_TABLE
from oncepay.storage.db import Database, read, write

__all__ = [
    "PAGE",
    "PaymentFilter",
    "Timeline",
    "overview",
    "payment_rows",
    "search_payments",
    "sign_out",
    "signed_out",
    "timeline",
]

PAGE = 50
STATUSES = (
    "processing",
    "authorized",
    "captured",
    "partially_refunded",
    "refunded",
    "canceled",
    "failed",
)
# An acquirer reference is the payment id and the attempt: pay_…_a2 (see payments.storage.schema).
_REFERENCE = re.compile(r"(pay_[0-9a-f]+)_a\d+")
_PAYMENT_ID = re.compile(r"pay_[0-9a-f]+")

payments = schema.payments


@dataclass(frozen=True, slots=True)
class PaymentFilter:
    """The search form: every field optional, all given ones must hold."""

    id: str | None = None
    key: str | None = None  # an Idempotency-Key as the client sent it
    reference: str | None = None  # the acquirer's reference or authorization id
    event: str | None = None  # an event id (evt_…)
    merchant: str | None = None
    status: str | None = None
    amount_min: int | None = None
    amount_max: int | None = None
    created_from: float | None = None
    created_to: float | None = None

    def query(self) -> dict[str, str]:
        """The filter as query parameters (for the next page and the CSV link)."""
        return {
            f.name: str(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) not in (None, "")
        }


async def _payment_ids(db: Database, f: PaymentFilter) -> set[str] | None:
    """The payment ids that the id-like fields name (None: they name no restriction)."""
    found: set[str] | None = None

    def narrow(ids: set[str]) -> None:
        nonlocal found
        found = ids if found is None else found & ids

    async with read(db) as conn:
        if f.id:
            narrow({f.id})
        if f.reference:
            match = _REFERENCE.fullmatch(f.reference)
            if match:
                narrow({match.group(1)})
            else:
                rows = await conn.execute(
                    select(payments.c.id).where(payments.c.authorization_id == f.reference)
                )
                narrow(set(rows.scalars()))
        if f.event:
            row = (
                await conn.execute(
                    select(schema.events.c.object_id).where(schema.events.c.id == f.event)
                )
            ).first()
            narrow(await _to_payments(conn, {row.object_id} if row else set()))
        if f.key:
            narrow(await _to_payments(conn, await _ids_under_key(conn, f.key, f.merchant)))
    return found


async def _ids_under_key(conn: Any, key: str, merchant: str | None) -> set[str]:
    """Object ids in the recovery points of the records under ``key``: looked up by the
    primary key (scope, key) for each merchant, never by a scan of the records."""
    scopes = (
        "(:merchant)" if merchant else f"(SELECT id FROM {schema.merchants.name})"
    )  # one primary-key probe per merchant
    rows = await conn.execute(
        text(
            f"SELECT recovery_point FROM {IDEMPOTENCY_TABLE} "
            f"WHERE scope IN {scopes} AND idempotency_key = :key"
        ),
        {"key": key, "merchant": merchant},
    )
    return {point.rsplit(":", 1)[-1] for (point,) in rows if point}


async def _to_payments(conn: Any, object_ids: set[str]) -> set[str]:
    refunds = {i for i in object_ids if i.startswith("re_")}
    ids = {i for i in object_ids if _PAYMENT_ID.fullmatch(i)}
    if refunds:
        rows = await conn.execute(
            select(schema.refunds.c.payment_id).where(schema.refunds.c.id.in_(refunds))
        )
        ids |= set(rows.scalars())
    return ids


def _conditions(f: PaymentFilter, ids: set[str] | None) -> list[Any]:
    where: list[Any] = []
    if ids is not None:
        where.append(payments.c.id.in_(sorted(ids)))
    if f.merchant:
        where.append(payments.c.merchant_id == f.merchant)
    if f.status:
        where.append(payments.c.status == f.status)
    if f.amount_min is not None:
        where.append(payments.c.amount >= f.amount_min)
    if f.amount_max is not None:
        where.append(payments.c.amount <= f.amount_max)
    if f.created_from is not None:
        where.append(payments.c.created_at >= f.created_from)
    if f.created_to is not None:
        where.append(payments.c.created_at < f.created_to)
    return where


async def search_payments(
    db: Database, f: PaymentFilter, *, before: int | None = None, limit: int = PAGE
) -> tuple[list[Row[Any]], int | None]:
    """A page of payments, newest first, and the cursor of the next page (None: the last).

    Newest first is by ``seq``, except under a creation-time range: then by (``created_at``,
    ``seq``), so the (created_at, seq) index walks the range from its end and stops after a
    page, however wide the range and however few of its payments match the other fields."""
    ids = await _payment_ids(db, f)
    if ids == set():
        return [], None
    where = _conditions(f, ids)
    by_time = f.created_from is not None or f.created_to is not None
    order = (
        (payments.c.created_at.desc(), payments.c.seq.desc())
        if by_time
        else (payments.c.seq.desc(),)
    )
    async with read(db) as conn:
        if before is not None:
            where.append(await _older_than(conn, before) if by_time else payments.c.seq < before)
        query = select(payments).where(and_(True, *where)).order_by(*order).limit(limit + 1)
        rows = list((await conn.execute(query)).all())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (rows[-1].seq if more and rows else None)


async def _older_than(conn: Any, seq: int) -> Any:
    """After the payment ``seq`` in (created_at, seq) order, newest first."""
    at = (await conn.execute(select(payments.c.created_at).where(payments.c.seq == seq))).scalar()
    if at is None:
        return payments.c.seq < seq  # the cursor's payment is gone: fall back on seq alone
    return or_(payments.c.created_at < at, and_(payments.c.created_at == at, payments.c.seq < seq))


async def payment_rows(
    db: Database, f: PaymentFilter, batch: int = 1000
) -> AsyncIterator[Row[Any]]:
    """Every payment the filter matches, newest first, read a page at a time (the CSV)."""
    before: int | None = None
    while True:
        rows, before = await search_payments(db, f, before=before, limit=batch)
        for row in rows:
            yield row
        if before is None:
            return


# -- the overview ----------------------------------------------------------------------------

# The webhook success rate is the share of this many latest delivery attempts that a receiver
# answered 2xx: recent enough to show an endpoint failing now, enough to be a rate.
RATE_OVER = 1000


async def overview(
    db: Database, *, now: float | None = None, window: float = 60.0
) -> dict[str, Any]:
    """Payments of the last ``window`` seconds by status, the newest payments, webhook delivery
    health, and the open findings and discrepancies."""
    now = time.time() if now is None else now
    async with read(db) as conn:
        by_status = await _by_status(conn, db, now - window)
        recent = (
            await conn.execute(select(payments).order_by(payments.c.seq.desc()).limit(10))
        ).all()
        deliveries: dict[str, int] = dict(
            (
                await conn.execute(
                    select(schema.webhook_deliveries.c.status, func.count()).group_by(
                        schema.webhook_deliveries.c.status
                    )
                )
            ).all()
        )
        tried, succeeded = await _latest_attempts(conn)
        findings = await _count_open(conn, "insight_findings")
        discrepancies = await _count_open(conn, "reconciliation_discrepancies")
    webhooks: dict[str, Any] = {str(k): int(v) for k, v in deliveries.items()}
    webhooks["success_rate"] = round(succeeded / tried, 4) if tried else None
    webhooks["attempts_rated"] = tried
    return {
        "at": now,
        "window": window,
        "by_status": {status: int(by_status.get(status, 0)) for status in STATUSES},
        "recent": [payment_view(row) for row in recent],
        "webhooks": webhooks,
        "open_findings": findings,
        "open_discrepancies": discrepancies,
    }


async def _latest_attempts(conn: Any) -> tuple[int, int]:
    """Of the latest :data:`RATE_OVER` delivery attempts (every worker's: the database's), how
    many there are and how many a receiver answered 2xx (what delivery counts a success)."""
    attempts = schema.webhook_attempts
    latest = (
        select(attempts.c.status_code).order_by(attempts.c.seq.desc()).limit(RATE_OVER).subquery()
    )
    ok = case((latest.c.status_code.between(200, 299), 1), else_=0)
    tried, succeeded = (await conn.execute(select(func.count(), func.sum(ok)))).one()
    return int(tried), int(succeeded or 0)


async def _by_status(conn: Any, db: Database, since: float) -> dict[str, int]:
    """Payments created since ``since`` by status, read off the creation-time index. SQLite
    would rather walk the (status, seq) index over every payment for the GROUP BY (1.2 s with
    a million), and SQLAlchemy has no way to say INDEXED BY: so it is said in SQL."""
    if db.is_sqlite:
        query: Any = text(
            "SELECT status, count(*) FROM payments INDEXED BY payments_created "
            "WHERE created_at >= :since GROUP BY status"
        ).bindparams(since=since)
    else:
        query = (
            select(payments.c.status, func.count())
            .where(payments.c.created_at >= since)
            .group_by(payments.c.status)
        )
    return {str(status): int(count) for status, count in (await conn.execute(query)).all()}


async def _count_open(conn: Any, table: str) -> int | None:
    """Open rows of a queue table; None when its feature's tables are not there."""
    try:
        async with conn.begin_nested():
            value = await conn.execute(text(f"SELECT count(*) FROM {table} WHERE status = 'open'"))
            return int(value.scalar_one())
    except Exception:  # the table is not migrated in (an older database): nothing to count
        return None


def payment_view(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "merchant": row.merchant_id,
        "amount": row.amount,
        "currency": row.currency,
        "status": row.status,
        "acquirer": row.acquirer,
        "created": row.created_at,
        "amount_settled": getattr(row, "amount_settled", 0),
        "settled_at": getattr(row, "settled_at", None),
    }


# -- a payment's timeline --------------------------------------------------------------------


@dataclass
class Timeline:
    payment: dict[str, Any]
    entries: list[dict[str, Any]]  # {"at", "kind", "title", "detail", ...}, in time order
    trace_id: str | None


async def timeline(
    db: Database, payment_id: str, hash_key: Callable[[str], str]
) -> Timeline | None:
    """Everything OncePay knows of one payment, in time order."""
    p = payments
    async with read(db) as conn:
        row = (await conn.execute(select(p).where(p.c.id == payment_id))).first()
        if row is None:
            return None
        entries: list[dict[str, Any]] = []
        refunds = (
            await conn.execute(
                select(schema.refunds).where(schema.refunds.c.payment_id == payment_id)
            )
        ).all()
        objects = [payment_id, *(r.id for r in refunds)]
        for record in await _records_of(conn, row, objects, hash_key):
            entries.append(
                {
                    "at": record.created_at,
                    "kind": "request",
                    "title": f"Idempotency-Key {record.key_hash}",
                    "detail": (
                        f"record {record.state}, recovery point {record.recovery_point or '-'}, "
                        f"fencing token {record.fence}"
                        + (f", answered {record.response_status}" if record.response_status else "")
                    ),
                }
            )
        events = (
            await conn.execute(
                select(schema.events)
                .where(schema.events.c.object_id.in_(objects))
                .order_by(schema.events.c.seq)
            )
        ).all()
        trace_id = None
        for event in events:
            traceparent = getattr(event, "traceparent", None)
            if traceparent and trace_id is None:
                trace_id = traceparent.split("-")[1] if traceparent.count("-") >= 3 else None
            entries.append(
                {
                    "at": event.created_at,
                    "kind": "event",
                    "title": event.type,
                    "detail": event.id,
                }
            )
        postings = (
            await conn.execute(
                select(
                    schema.ledger_transactions.c.id,
                    schema.ledger_transactions.c.kind,
                    schema.ledger_transactions.c.created_at,
                    schema.ledger_entries.c.account,
                    schema.ledger_entries.c.amount,
                    schema.ledger_entries.c.currency,
                )
                .join(
                    schema.ledger_entries,
                    schema.ledger_entries.c.transaction_id == schema.ledger_transactions.c.id,
                )
                .where(schema.ledger_transactions.c.payment_id == payment_id)
                .order_by(schema.ledger_transactions.c.created_at, schema.ledger_entries.c.seq)
            )
        ).all()
        by_transaction: dict[str, dict[str, Any]] = {}
        for posting in postings:
            entry = by_transaction.setdefault(
                posting.id,
                {
                    "at": posting.created_at,
                    "kind": "ledger",
                    "title": f"ledger: {posting.kind}",
                    "lines": [],
                },
            )
            entry["lines"].append(f"{posting.account} {posting.amount:+d} {posting.currency}")
        for entry in by_transaction.values():
            entry["detail"] = "; ".join(entry.pop("lines"))
            entries.append(entry)
        attempts = (
            await conn.execute(
                select(
                    schema.webhook_attempts.c.attempt,
                    schema.webhook_attempts.c.status_code,
                    schema.webhook_attempts.c.error,
                    schema.webhook_attempts.c.latency_ms,
                    schema.webhook_attempts.c.created_at,
                    schema.webhook_deliveries.c.endpoint_id,
                    schema.webhook_deliveries.c.event_id,
                )
                .join(
                    schema.webhook_deliveries,
                    schema.webhook_deliveries.c.id == schema.webhook_attempts.c.delivery_id,
                )
                .where(schema.webhook_deliveries.c.event_id.in_([e.id for e in events]))
            )
        ).all()
        for attempt in attempts:
            outcome = attempt.status_code or attempt.error or "no answer"
            entries.append(
                {
                    "at": attempt.created_at,
                    "kind": "webhook",
                    "title": f"webhook attempt {attempt.attempt} to {attempt.endpoint_id}",
                    "detail": f"{attempt.event_id}: {outcome} in {attempt.latency_ms:.0f} ms",
                }
            )
    for call in journal.attempts_of(payment_id):
        entries.append(
            {
                "at": call.at - call.seconds,
                "kind": "acquirer",
                "title": (
                    f"{call.acquirer}: {call.operation}" + (" (retry)" if call.retry else "")
                ),
                "detail": (
                    f"{call.reference}, {call.outcome} in {call.seconds * 1000:.0f} ms, "
                    f"breaker {call.breaker}"
                ),
            }
        )
    entries.append(
        {
            "at": row.created_at,
            "kind": "acquirer",
            "title": f"acquirer {row.acquirer}, attempt {row.attempt}",
            "detail": (
                f"reference {row.id}_a{row.attempt}, authorization {row.authorization_id or '-'}"
                + (", outcome unknown" if row.outcome_unknown else "")
                + (", escalated" if row.escalated else "")
            ),
        }
    )
    if getattr(row, "settled_at", None):
        entries.append(
            {
                "at": row.settled_at,
                "kind": "settlement",
                "title": "settled",
                "detail": (
                    f"{row.amount_settled} settled, {row.amount_refund_settled} refunds settled, "
                    f"fee {row.settlement_fee} ({row.currency})"
                ),
            }
        )
    entries.sort(key=lambda e: (e["at"], _ORDER.get(e["kind"], 9)))
    view = payment_view(row)
    view.update(
        description=row.description,
        metadata=json.loads(row.metadata or "{}"),
        amount_captured=row.amount_captured,
        amount_refunded=row.amount_refunded,
        failure_code=row.failure_code,
        refunds=[{"id": r.id, "amount": r.amount, "status": r.status} for r in refunds],
    )
    return Timeline(view, entries, trace_id)


_ORDER = {"request": 0, "acquirer": 1, "ledger": 2, "event": 3, "webhook": 4, "settlement": 5}


@dataclass(frozen=True, slots=True)
class _Record:
    key_hash: str
    state: str
    recovery_point: str | None
    fence: int
    created_at: float
    response_status: int | None


async def _records_of(
    conn: Any, payment: Row[Any], objects: Sequence[str], hash_key: Callable[[str], str]
) -> list[_Record]:
    """The idempotency records whose recovery point names the payment or one of its refunds,
    found by equality on the recovery point (every point an operation can leave), on the
    index :func:`~oncepay.payments.storage.idempotency.idempotency_store` keeps."""
    points = _points(objects)
    names = [f"p{i}" for i in range(len(points))]
    params: dict[str, Any] = dict(zip(names, points, strict=True))
    # No "AND scope = …" in SQL: SQLite would then walk the merchant's records by the primary
    # key instead of probing the recovery-point index. The scope is checked on the rows.
    found = await conn.execute(
        text(
            "SELECT scope, idempotency_key, state, recovery_point, fence, created_at, "
            f"response_status FROM {IDEMPOTENCY_TABLE} WHERE recovery_point IN "
            f"({', '.join(':' + n for n in names)})"
        ),
        params,
    )
    rows = [r for r in found if r.scope == payment.merchant_id]
    return [
        _Record(
            hash_key(r.idempotency_key),
            r.state,
            r.recovery_point,
            r.fence,
            r.created_at,
            r.response_status,
        )
        for r in rows
    ]


def _points(objects: Sequence[str]) -> list[str]:
    """Every recovery point that can name one of ``objects``."""
    from oncepay.payments.operations import cancel, capture, create, refund
    from oncepay.payments.phases import ACQUIRER_CALLED, FINISHED

    found = []
    for op in (create.CreatePayment, capture.Capture, cancel.Cancel, refund.CreateRefund):
        named = {f.name: f.default for f in dataclasses.fields(op)}  # slotted: no class attrs
        for at in (named["created"], ACQUIRER_CALLED, FINISHED):
            found += [f"{at}:{named['name']}:{o}" for o in objects]
    return found


# -- signed-out sessions ------------------------------------------------------------------------


async def sign_out(db: Database, session: str, expires_at: float, *, now: float) -> None:
    """Record a session as signed out (again: nothing more), and forget the ones that have
    expired since: the table holds only sessions that would still be valid."""
    table = schema.dashboard_signouts
    async with write(db) as conn:
        await conn.execute(table.delete().where(table.c.expires_at < now))
        known = await conn.execute(select(table.c.session).where(table.c.session == session))
        if known.first() is None:
            await conn.execute(table.insert().values(session=session, expires_at=expires_at))


async def signed_out(db: Database, session: str) -> bool:
    table = schema.dashboard_signouts
    async with read(db) as conn:
        found = await conn.execute(select(table.c.session).where(table.c.session == session))
        return found.first() is not None
