"""Reads the API serves: one object of a merchant, and pages of a merchant's objects, each
typed by the view of its table's rows (``records.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Table, select

from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.records import DeliveryRow, EndpointRow, EventRow, PaymentRow, RefundRow
from oncepay.payments.storage.schema import (
    events,
    payments,
    refunds,
    webhook_deliveries,
    webhook_endpoints,
)
from oncepay.storage.db import Database, read
from oncepay.storage.ids import is_id

__all__ = [
    "DELIVERIES",
    "ENDPOINTS",
    "EVENTS",
    "PAYMENTS",
    "REFUNDS",
    "PageQuery",
    "Readable",
    "get_object",
    "page",
    "ping",
]

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Readable(Generic[R]):
    """A table the API reads, the type of its rows, and what a missing one is called."""

    table: Table
    name: str


PAYMENTS: Readable[PaymentRow] = Readable(payments, "payment")
REFUNDS: Readable[RefundRow] = Readable(refunds, "refund")
EVENTS: Readable[EventRow] = Readable(events, "event")
ENDPOINTS: Readable[EndpointRow] = Readable(webhook_endpoints, "webhook endpoint")
DELIVERIES: Readable[DeliveryRow] = Readable(webhook_deliveries, "webhook delivery")


async def get_object(db: Database, source: Readable[R], object_id: str, merchant_id: str) -> R:
    table = source.table
    if not is_id(object_id):
        raise ResourceMissing(f"no {source.name} {object_id!r}")
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(table).where(table.c.id == object_id, table.c.merchant_id == merchant_id)
            )
        ).first()
    if row is None:
        raise ResourceMissing(f"no {source.name} {object_id!r}")
    return cast(R, row)


@dataclass(frozen=True, slots=True)
class PageQuery:
    """What a list request asks for: at most ``limit`` objects, older than the one
    ``starting_after`` names (the last of the previous page)."""

    limit: int
    starting_after: str | None = None


async def page(
    db: Database,
    source: Readable[R],
    merchant_id: str,
    query: PageQuery,
    where: list[Any] | None = None,
) -> tuple[list[R], bool]:
    """One page, newest first, by the table's sequence number; one extra row says has_more."""
    table, limit, starting_after = source.table, query.limit, query.starting_after
    statement = select(table).where(table.c.merchant_id == merchant_id, *(where or []))
    if starting_after is not None and not is_id(starting_after):
        raise InvalidRequest(f"starting_after: no object {starting_after!r}")
    async with read(db) as conn:
        if starting_after is not None:
            cursor = (
                await conn.execute(
                    select(table.c.seq).where(
                        table.c.id == starting_after, table.c.merchant_id == merchant_id
                    )
                )
            ).scalar()
            if cursor is None:
                raise InvalidRequest(f"starting_after: no object {starting_after!r}")
            statement = statement.where(table.c.seq < cursor)
        rows = list(await conn.execute(statement.order_by(table.c.seq.desc()).limit(limit + 1)))
    return cast(list[R], rows[:limit]), len(rows) > limit


async def ping(db: Database) -> None:
    """One round trip to the database (raises when it does not answer)."""
    async with read(db) as conn:
        await conn.execute(select(1))
