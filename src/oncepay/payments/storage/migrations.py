"""Versioned schema migrations, run on start by every process that opens the database.

Each migration is a numbered function applied once, inside one transaction together with the
row that records it, under a lock (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``),
so several API processes starting at once migrate exactly once and none sees half a schema.
Add a migration by appending to :data:`MIGRATIONS`; never edit one that has shipped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from sqlalchemy import Column, Float, Integer, MetaData, Table, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.insight.store import create_tables as insight_tables
from oncepay.payments.storage import schema
from oncepay.reconciliation.store import create_tables as reconciliation_tables
from oncepay.storage.db import Database, write

__all__ = ["ADVISORY_LOCK", "MIGRATIONS", "migrate", "migrated"]

# Any 64-bit number the service owns; it keeps concurrent migrators apart on PostgreSQL.
ADVISORY_LOCK = 0x0CE9A7_0001

_versions = Table(
    "oncepay_schema_migrations",
    MetaData(),
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=False),
)


async def _v1_tables(conn: AsyncConnection, db: Database) -> None:
    tables = [
        schema.merchants,
        schema.api_keys,
        schema.payments,
        schema.refunds,
        schema.ledger_transactions,
        schema.ledger_entries,
        schema.events,
    ]
    await conn.run_sync(lambda sync: schema.metadata.create_all(sync, tables=tables))


async def _v2_immutable_ledger(conn: AsyncConnection, db: Database) -> None:
    """Ledger entries are never updated or deleted: the database refuses it, not just us."""
    if db.is_sqlite:
        for op in ("UPDATE", "DELETE"):
            await conn.execute(
                text(
                    f"CREATE TRIGGER ledger_entries_no_{op.lower()} BEFORE {op} ON ledger_entries "
                    "BEGIN SELECT RAISE(ABORT, 'ledger entries are immutable'); END"
                )
            )
        return
    await conn.execute(
        text(
            "CREATE FUNCTION oncepay_ledger_immutable() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'ledger entries are immutable'; END $$"
        )
    )
    await conn.execute(
        text(
            "CREATE TRIGGER ledger_entries_immutable BEFORE UPDATE OR DELETE ON ledger_entries "
            "FOR EACH ROW EXECUTE FUNCTION oncepay_ledger_immutable()"
        )
    )


async def _v3_webhooks(conn: AsyncConnection, db: Database) -> None:
    tables = [schema.webhook_endpoints, schema.webhook_deliveries, schema.webhook_attempts]
    await conn.run_sync(lambda sync: schema.metadata.create_all(sync, tables=tables))


async def _v6_api_keys(conn: AsyncConnection, db: Database) -> None:
    """Key names, restricted scopes, rolled keys' overlap, last use; the keys' audit trail. A
    database created after these columns joined ``schema.api_keys`` has them from version 1."""
    present = await conn.run_sync(
        lambda sync: {c["name"] for c in inspect(sync).get_columns("api_keys")}
    )
    for name, kind in (
        ("name", "TEXT"),
        ("scopes", "TEXT"),
        ("expires_at", "DOUBLE PRECISION"),
        ("last_used_at", "DOUBLE PRECISION"),
    ):
        if name not in present:
            await conn.execute(text(f"ALTER TABLE api_keys ADD COLUMN {name} {kind}"))
    tables = [schema.api_key_audit]
    await conn.run_sync(lambda sync: schema.metadata.create_all(sync, tables=tables))


async def _v8_event_traceparent(conn: AsyncConnection, db: Database) -> None:
    """Each event's traceparent (tracing.py); a database created after the column joined
    ``schema.events`` has it from version 1."""
    present = await conn.run_sync(
        lambda sync: {c["name"] for c in inspect(sync).get_columns("events")}
    )
    if "traceparent" not in present:
        await conn.execute(text("ALTER TABLE events ADD COLUMN traceparent VARCHAR(64)"))


# The lists' filters and cursors (reads.page, issue 14): each list reads its rows by the
# merchant or the parent, newest first by seq, narrowed by status, type or creation time.
_V7_INDEXES = {
    "payments_merchant_status": "payments (merchant_id, status, seq)",
    "payments_merchant_created": "payments (merchant_id, created_at)",
    "refunds_merchant_seq": "refunds (merchant_id, seq)",
    "refunds_payment_seq": "refunds (payment_id, seq)",
    "events_merchant_type": "events (merchant_id, type, seq)",
    "events_merchant_created": "events (merchant_id, created_at)",
    "webhook_deliveries_endpoint_seq": "webhook_deliveries (endpoint_id, seq)",
    "webhook_deliveries_event_seq": "webhook_deliveries (event_id, seq)",
}


async def _v7_list_indexes(conn: AsyncConnection, db: Database) -> None:
    for name, columns in _V7_INDEXES.items():
        await conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {columns}"))


# The operator's searches and a payment's timeline (the dashboard) cross merchants.
_V9_INDEXES = {
    "payments_created": "payments (created_at, seq)",
    "payments_amount": "payments (amount, seq)",
    "payments_status_seq": "payments (status, seq)",
    "payments_authorization": "payments (authorization_id)",
    "events_object": "events (object_id, seq)",
    "ledger_transactions_payment": "ledger_transactions (payment_id)",
}


async def _v9_operator_indexes(conn: AsyncConnection, db: Database) -> None:
    for name, columns in _V9_INDEXES.items():
        await conn.execute(text(f"CREATE INDEX IF NOT EXISTS {name} ON {columns}"))


async def _v10_dashboard_signouts(conn: AsyncConnection, db: Database) -> None:
    tables = [schema.dashboard_signouts]
    await conn.run_sync(lambda sync: schema.metadata.create_all(sync, tables=tables))


Migration = Callable[[AsyncConnection, Database], Awaitable[None]]
MIGRATIONS: list[tuple[int, Migration]] = [
    (1, _v1_tables),
    (2, _v2_immutable_ledger),
    (3, _v3_webhooks),
    (4, reconciliation_tables),  # runs, discrepancies, settlements, actions; settled columns
    (5, insight_tables),  # insight_findings: the worker's live findings
    (6, _v6_api_keys),
    (7, _v7_list_indexes),  # the lists' filters and cursors
    (8, _v8_event_traceparent),  # events.traceparent
    (9, _v9_operator_indexes),  # the dashboard's searches and timelines
    (10, _v10_dashboard_signouts),  # a signed-out dashboard session is refused everywhere
]


async def migrate(db: Database) -> list[int]:
    """Apply every migration not yet applied; return the versions applied now."""
    async with write(db) as conn:
        if not db.is_sqlite:
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"))
            if db.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
        await conn.run_sync(_versions.metadata.create_all)
        done = set((await conn.execute(select(_versions.c.version))).scalars())
        applied = []
        for version, migration in MIGRATIONS:
            if version in done:
                continue
            await migration(conn, db)
            await conn.execute(_versions.insert().values(version=version, applied_at=time.time()))
            applied.append(version)
        return applied


@asynccontextmanager
async def migrated(url: str) -> AsyncIterator[Database]:
    """The database at ``url``, migrated, closed when the block ends (the commands that use
    the database without starting the whole service)."""
    db = Database.from_url(url)
    try:
        await migrate(db)
        yield db
    finally:
        await db.aclose()
