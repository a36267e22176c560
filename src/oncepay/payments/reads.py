"""Reads the API serves: one object of a merchant, and pages of a merchant's objects."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.storage.db import Database, read
from oncepay.storage.ids import is_id

__all__ = ["get_object", "page", "ping"]


async def get_object(db: Database, table: Any, object_id: str, merchant_id: str) -> Any:
    name = _NAMES.get(table.name, "object")
    if not is_id(object_id):
        raise ResourceMissing(f"no {name} {object_id!r}")
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(table).where(table.c.id == object_id, table.c.merchant_id == merchant_id)
            )
        ).first()
    if row is None:
        raise ResourceMissing(f"no {name} {object_id!r}")
    return row


_NAMES = {
    "payments": "payment",
    "refunds": "refund",
    "events": "event",
    "webhook_deliveries": "webhook delivery",
}


async def page(
    db: Database,
    table: Any,
    merchant_id: str,
    limit: int,
    starting_after: str | None,
    where: list[Any] | None = None,
) -> tuple[list[Any], bool]:
    """One page, newest first, by the table's sequence number; one extra row says has_more."""
    query = select(table).where(table.c.merchant_id == merchant_id, *(where or []))
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
            query = query.where(table.c.seq < cursor)
        rows = list(await conn.execute(query.order_by(table.c.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


async def ping(db: Database) -> None:
    """One round trip to the database (raises when it does not answer)."""
    async with read(db) as conn:
        await conn.execute(select(1))
