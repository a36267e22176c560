"""Bulk writes for settlement, in each database's own terms, inside the caller's transaction.

SQLAlchemy's per-row parameter processing costs more than the write itself when a run posts
a million lines (bench/reconciliation/RESULTS.md), so the rows go to the driver as tuples:
SQLite's ``executemany``; on PostgreSQL ``COPY`` for plain inserts and one statement over
``unnest`` arrays where rows must be matched (``ON CONFLICT … RETURNING``, ``UPDATE … FROM``).

:func:`insert_new` inserts only the rows whose key is not there yet and says which it
inserted. On PostgreSQL that is ``ON CONFLICT DO NOTHING RETURNING``: a concurrent transaction
inserting the same key makes this one wait for it, then skip the row. On SQLite the write
transaction (``BEGIN IMMEDIATE``) already excludes every other writer, so reading the keys
there and inserting the others is race-free."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.storage.db import Database

__all__ = ["add_settled", "insert", "insert_new"]

Row = tuple[Any, ...]
# Keys per IN (...) list on SQLite (it allows 32,766 bound variables).
_KEYS = 5000
# PostgreSQL array types of the columns written here, by name.
_PG_TYPES = {
    "amount": "bigint",
    "fee": "bigint",
    "net": "bigint",
    "created_at": "float8",
}


async def insert(
    conn: AsyncConnection, db: Database, table: str, columns: Sequence[str], rows: list[Row]
) -> None:
    if not rows:
        return
    if db.is_sqlite:
        marks = ", ".join("?" * len(columns))
        await conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
        )
        return
    driver = await _asyncpg(conn)
    await driver.copy_records_to_table(
        table, records=rows, columns=list(columns), schema_name=db.schema
    )


async def insert_new(
    conn: AsyncConnection,
    db: Database,
    table: str,
    columns: Sequence[str],
    rows: list[Row],
) -> set[str]:
    """Insert the rows whose key (the first column) is not in ``table``; the keys inserted."""
    if not rows:
        return set()
    key = columns[0]
    if db.is_sqlite:
        keys = [row[0] for row in rows]
        there: set[str] = set()
        for start in range(0, len(keys), _KEYS):
            chunk = keys[start : start + _KEYS]
            marks = ", ".join("?" * len(chunk))
            found = await conn.exec_driver_sql(
                f"SELECT {key} FROM {table} WHERE {key} IN ({marks})", tuple(chunk)
            )
            there.update(found.scalars())
        fresh, seen = [], set(there)
        for row in rows:
            if row[0] not in seen:
                seen.add(row[0])
                fresh.append(row)
        await insert(conn, db, table, columns, fresh)
        return {row[0] for row in fresh}
    arrays = [f"${n}::{_PG_TYPES.get(name, 'text')}[]" for n, name in enumerate(columns, 1)]
    statement = (
        f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({', '.join(arrays)}) "
        f"ON CONFLICT ({key}) DO NOTHING RETURNING {key}"
    )
    driver = await _asyncpg(conn)
    found = await driver.fetch(statement, *(list(column) for column in zip(*rows, strict=True)))
    return {record[0] for record in found}


async def add_settled(
    conn: AsyncConnection, db: Database, rows: list[Row], now: float, returning: Sequence[str]
) -> list[Row]:
    """Add to each payment's settlement columns; ``rows`` are (payment id, captured settled,
    refunds settled, fees, settled at). The settled time only moves forward. Returns the
    ``returning`` columns of the payments as they now are (for their events), with no second
    look-up by id on PostgreSQL (``UPDATE … RETURNING``) and a driver-level one on SQLite."""
    if not rows:
        return []
    wanted = ", ".join(returning)
    if db.is_sqlite:
        await conn.exec_driver_sql(
            "UPDATE payments SET amount_settled = amount_settled + ?, "
            "amount_refund_settled = amount_refund_settled + ?, "
            "settlement_fee = settlement_fee + ?, "
            "settled_at = max(coalesce(settled_at, 0), ?), updated_at = ? WHERE id = ?",
            [(c, r, f, at, now, pid) for pid, c, r, f, at in rows],
        )
        found: list[Row] = []
        for start in range(0, len(rows), _KEYS):
            chunk = tuple(row[0] for row in rows[start : start + _KEYS])
            marks = ", ".join("?" * len(chunk))
            result = await conn.exec_driver_sql(
                f"SELECT {wanted} FROM payments WHERE id IN ({marks})", chunk
            )
            found.extend(tuple(row) for row in result.all())
        return found
    driver = await _asyncpg(conn)
    updated = await driver.fetch(
        "UPDATE payments AS p SET amount_settled = p.amount_settled + u.c, "
        "amount_refund_settled = p.amount_refund_settled + u.r, "
        "settlement_fee = p.settlement_fee + u.f, "
        "settled_at = GREATEST(p.settled_at, u.at), updated_at = $6 "
        "FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::float8[]) "
        "AS u(id, c, r, f, at) WHERE p.id = u.id RETURNING "
        + ", ".join(f"p.{column}" for column in returning),
        *(list(column) for column in zip(*rows, strict=True)),
        now,
    )
    return [tuple(record) for record in updated]


async def _asyncpg(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, in the same transaction."""
    raw = await conn.get_raw_connection()
    return raw.driver_connection
