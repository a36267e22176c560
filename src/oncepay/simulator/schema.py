"""The simulated acquirer's tables, created lazily (the app also runs in-process through
``httpx.ASGITransport``, which runs no lifespan) and idempotently across processes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "AuthorizationRow",
    "OperationRow",
    "authorizations",
    "create_schema",
    "metadata",
    "movements",
    "operations",
]

# Serialises schema creation across simulator processes; any fixed number will do ("acqu").
SCHEMA_LOCK = 0x61637175

metadata = MetaData()
authorizations = Table(
    "acquirer_authorizations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("reference", String(255), nullable=False, unique=True),
    Column("order_id", String(255), nullable=False, index=True),
    Column("payment_method", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64)),
    Column("captured_amount", BigInteger, nullable=False),
    Column("refunded_amount", BigInteger, nullable=False),
    Column("voided", Boolean, nullable=False),
    Column("created_at", Double, nullable=False),
)
# One row per reference, whatever it names: an authorization, capture, void, refund, or a
# fence. The primary key is what makes "operation or fence, never both" race-free.
operations = Table(
    "acquirer_operations",
    metadata,
    Column("reference", String(255), primary_key=True),
    Column("type", String(16), nullable=False),  # authorization|capture|void|refund|fence
    Column("fingerprint", String(64)),
    Column("authorization_id", String(40)),
    Column("order_id", String(255), index=True),
    Column("status", String(16), nullable=False),  # approved|declined|fenced
    Column("amount", BigInteger),
    Column("currency", String(3)),
    Column("status_code", Integer),
    Column("body", Text),
    Column("created_at", Double, nullable=False),
)
# Money that moved (captures and refunds): what the settlement report lists.
movements = Table(
    "acquirer_movements",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("authorization_id", String(40), nullable=False),
    Column("reference", String(255), nullable=False),
    Column("order_id", String(255), nullable=False),
    Column("type", String(16), nullable=False),  # capture|refund
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("created_at", Double, nullable=False, index=True),
)


class AuthorizationRow(Protocol):
    """A row of ``acquirer_authorizations``: a named tuple in column order, which its insert
    binds as it is (money.py)."""

    id: str
    reference: str
    order_id: str
    payment_method: str
    amount: int
    currency: str
    status: str  # approved|declined
    decline_code: str | None
    captured_amount: int
    refunded_amount: int
    voided: bool
    created_at: float

    def _replace(self, **changes: Any) -> AuthorizationRow: ...
    def __iter__(self) -> Iterator[Any]: ...


class OperationRow(Protocol):
    """A row of ``acquirer_operations``: a named tuple in column order, which its insert
    binds as it is (references.py)."""

    reference: str
    type: str
    fingerprint: str | None
    authorization_id: str | None
    order_id: str | None
    status: str
    amount: int | None
    currency: str | None
    status_code: int | None
    body: str | None
    created_at: float

    def __iter__(self) -> Iterator[Any]: ...


async def create_schema(conn: AsyncConnection, *, sqlite: bool, schema: str | None) -> None:
    """Create the tables in ``conn``'s write transaction: on SQLite its ``BEGIN IMMEDIATE``
    admits one creator at a time; on PostgreSQL an advisory lock does."""
    if not sqlite:
        await conn.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))
        if schema:
            await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    await conn.run_sync(metadata.create_all, checkfirst=True)
