"""Reads the API serves: one object of a merchant, and pages of a merchant's objects, each
typed by the view of its table's rows (``records.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import Table, bindparam, select, text
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncConnection

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
    "Range",
    "Readable",
    "get_object",
    "metadata_is",
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
class Range:
    """A range over a whole-number column as the API shows it (``created`` in Unix seconds,
    ``amount`` in minor units): any of Stripe's ``gt``, ``gte``, ``lt``, ``lte``."""

    gt: int | None = None
    gte: int | None = None
    lt: int | None = None
    lte: int | None = None

    def conditions(self, column: Any, *, seconds: bool = False) -> list[Any]:
        """The range over ``column``. With ``seconds`` the column holds fractional seconds
        shown truncated (``created`` 1700000000 stands for any time in that second), so
        ``lte`` and ``gt`` take the whole second."""
        step = 1 if seconds else 0
        found = []
        if self.gt is not None:
            found.append(column >= self.gt + step if seconds else column > self.gt)
        if self.gte is not None:
            found.append(column >= self.gte)
        if self.lt is not None:
            found.append(column < self.lt)
        if self.lte is not None:
            found.append(column < self.lte + step if seconds else column <= self.lte)
        return found


@dataclass(frozen=True, slots=True)
class PageQuery:
    """What a list request asks for: at most ``limit`` objects created in ``created``, older
    than the one ``starting_after`` names (the last of the previous page) or newer than the one
    ``ending_before`` names (the first of the next page), never both."""

    limit: int
    starting_after: str | None = None
    ending_before: str | None = None
    created: Range = field(default_factory=Range)


def metadata_is(db: Database, column: Any, key: str, value: str, n: int) -> Any:
    """``column`` (a JSON object of strings, stored as text) holds ``key`` with ``value``.
    ``n`` keeps the bound names of several such conditions apart."""
    if db.is_sqlite:
        # json_each, not json_extract: a JSON path cannot name every key (a '"' in it, say).
        return text(
            f"EXISTS (SELECT 1 FROM json_each({column.table.name}.{column.name}) AS m "
            f"WHERE m.key = :mk{n} AND m.type = 'text' AND m.value = :mv{n})"
        ).bindparams(bindparam(f"mk{n}", key), bindparam(f"mv{n}", value))
    return sql_cast(column, JSONB)[key].as_string() == value


async def page(
    db: Database,
    source: Readable[R],
    merchant_id: str,
    query: PageQuery,
    where: Sequence[Any] = (),
    *,
    scope: Sequence[Any] = (),
) -> tuple[list[R], bool]:
    """One page, newest first, by the table's sequence number; one extra row says has_more
    (more older objects after ``starting_after`` or a first page, more newer ones before
    ``ending_before``).

    ``scope`` are the conditions that define the list (its parent, filters on what never
    changes), ``where`` those that may stop holding (a status): a cursor must be an object of
    this merchant's list meeting ``scope`` and the ``created`` range, or the request is a 400,
    so a cursor from another list, or another merchant's, reveals nothing."""
    table = source.table
    fixed = [
        table.c.merchant_id == merchant_id,
        *scope,
        *query.created.conditions(table.c.created_at, seconds=True),
    ]
    statement = select(table).where(*fixed, *where)
    if query.starting_after is not None and query.ending_before is not None:
        raise InvalidRequest("pass starting_after or ending_before, not both")
    name, cursor_id = (
        ("ending_before", query.ending_before)
        if query.ending_before is not None
        else ("starting_after", query.starting_after)
    )
    backwards = query.ending_before is not None
    order = table.c.seq.asc() if backwards else table.c.seq.desc()
    async with read(db) as conn:
        if cursor_id is not None:
            cursor = await _cursor(conn, table, cursor_id, fixed)
            if cursor is None:
                raise InvalidRequest(
                    f"{name}: {cursor_id!r} is not an object of this list "
                    "(a cursor must come from the same list, with the same filters)"
                )
            statement = statement.where(table.c.seq > cursor if backwards else table.c.seq < cursor)
        rows = list(await conn.execute(statement.order_by(order).limit(query.limit + 1)))
    more, rows = len(rows) > query.limit, rows[: query.limit]
    if backwards:
        rows.reverse()
    return cast(list[R], rows), more


async def _cursor(
    conn: AsyncConnection, table: Table, object_id: str, fixed: list[Any]
) -> int | None:
    if not is_id(object_id):
        return None
    found = await conn.execute(select(table.c.seq).where(table.c.id == object_id, *fixed))
    return cast("int | None", found.scalar())


async def ping(db: Database) -> None:
    """One round trip to the database (raises when it does not answer)."""
    async with read(db) as conn:
        await conn.execute(select(1))
