"""Runs, discrepancies, settlements and remediation actions, kept in the payments database:
what a finance team works from (migration 4, :func:`create_tables`).

* A **run** is one row per (acquirer, day, outcome): its id is a digest of the three, so
  running a day again with the same result inserts nothing (idempotent, SPEC §10).
* A **discrepancy** is one row per (acquirer, kind, reference), whatever the number of runs
  that find it: ``open`` until a person resolves it or accepts it (with a note), or until the
  safe remediation did it (resolved, its note says how).
* A **settlement** is one row per settled reference: the guard that posts a line to the ledger
  once, written in the same transaction as the posting.
* An **action** is one row per remediation (an orphan's void, a stale payment's cancel),
  keyed by what it acts on, so no run repeats one.

Every insert here is ``INSERT … ON CONFLICT DO NOTHING``: two runs at once write each row
once, and the one that did not write it learns so from ``RETURNING``."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.reconciliation.records import Discrepancy, Outcome
from oncepay.storage.db import Database, read, write

__all__ = [
    "DiscrepancyNotOpen",
    "OpenedDiscrepancy",
    "SavedRun",
    "actions",
    "close",
    "create_tables",
    "discrepancies",
    "insert_new",
    "open_discrepancies",
    "run_id",
    "runs",
    "save_run",
    "settlements",
]

metadata = MetaData()
runs = Table(
    "reconciliation_runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("acquirer", String(32), nullable=False),
    Column("day", String(10), nullable=False),
    Column("lines", BigInteger, nullable=False, server_default="0"),
    Column("matched", BigInteger, nullable=False),
    Column("discrepancies", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("reconciliation_runs_day", "acquirer", "day"),
)
discrepancies = Table(
    "reconciliation_discrepancies",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("acquirer", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("reference", String(255), nullable=False),
    Column("payment_id", String(255)),  # a report may name any payment, even no real one
    Column("merchant_id", String(40)),  # the payment's merchant, when OncePay knows it
    Column("day", String(10)),  # the day of the run that opened it
    Column("detail", Text, nullable=False),
    Column("remediation", Text, nullable=False),
    Column("status", String(16), nullable=False),  # open|resolved|accepted
    Column("note", Text),
    Column("run_id", String(40), nullable=False),  # the run that opened it
    Column("opened_at", Float, nullable=False),
    Column("closed_at", Float),
    UniqueConstraint("acquirer", "kind", "reference", name="reconciliation_discrepancy_once"),
    Index("reconciliation_discrepancies_status", "status", "kind"),
)
# One row per settled reference: the guard that posts a settlement to the ledger once.
settlements = Table(
    "reconciliation_settlements",
    metadata,
    Column("reference", String(255), primary_key=True),
    Column("acquirer", String(32), nullable=False, server_default="primary"),
    Column("payment_id", String(40), nullable=False),
    Column("type", String(8), nullable=False, server_default="capture"),
    Column("currency", String(3), nullable=False, server_default=""),
    Column("payout_id", String(255), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("net", BigInteger, nullable=False),
    Column("settled_at", String(40), nullable=False),
    Column("transaction_id", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("reconciliation_settlements_payout", "payout_id"),
)
# One row per remediation: what it acts on decides its id, so it is taken once.
actions = Table(
    "reconciliation_actions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("acquirer", String(32), nullable=False),
    Column("kind", String(32), nullable=False),  # void_orphan|cancel_stale
    Column("reference", String(255), nullable=False),  # the discrepancy's
    Column("authorization_id", String(64), nullable=False),
    Column("payment_id", String(255)),
    Column("merchant_id", String(40)),  # cancel_stale: the payment's merchant, its key's scope
    Column("action_reference", String(255), nullable=False),  # the key sent to the acquirer
    Column("status", String(16), nullable=False),  # pending|done|refused
    Column("detail", Text),
    Column("run_id", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
_CLOSED = frozenset({"resolved", "accepted"})
# The settlement columns migration 4 adds to ``payments`` (schema.py declares them): on a
# database created before it they are added; on a new one migration 1 created them already.
_PAYMENT_COLUMNS = {
    "amount_settled": "BIGINT NOT NULL DEFAULT 0",
    "amount_refund_settled": "BIGINT NOT NULL DEFAULT 0",
    "settlement_fee": "BIGINT NOT NULL DEFAULT 0",
    "settled_at": "DOUBLE PRECISION",
}


class DiscrepancyNotOpen(LookupError):
    """No open discrepancy has that id (it never existed, or was closed already)."""


@dataclass(frozen=True, slots=True)
class OpenedDiscrepancy:
    """A discrepancy this run inserted (no earlier run had found it)."""

    id: int
    found: Discrepancy


@dataclass(frozen=True, slots=True)
class SavedRun:
    run_id: str
    opened: int  # discrepancies seen for the first time by this run
    new_run: bool  # False: the same day gave the same outcome before, no run row was written
    opened_rows: tuple[OpenedDiscrepancy, ...] = ()


async def create_tables(conn: AsyncConnection, db: Database) -> None:
    """Migration 4: the reconciliation tables, and the settlement columns of ``payments``."""
    await conn.run_sync(metadata.create_all)
    have = await conn.run_sync(
        lambda sync: {c["name"] for c in inspect(sync).get_columns("payments")}
    )
    for name, ddl in _PAYMENT_COLUMNS.items():
        if name not in have:
            await conn.execute(text(f"ALTER TABLE payments ADD COLUMN {name} {ddl}"))


def insert_new(db: Database, table: Table, keys: Sequence[str]) -> Any:
    """``INSERT … ON CONFLICT (keys) DO NOTHING`` in the database's dialect."""
    dialect = sqlite if db.is_sqlite else postgresql
    return dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys))


def run_id(acquirer: str, day: date, outcome: Outcome) -> str:
    document = json.dumps([acquirer, day.isoformat(), outcome.as_json()], sort_keys=True)
    return "rec_" + hashlib.sha256(document.encode()).hexdigest()[:24]


async def save_run(
    db: Database,
    acquirer: str,
    day: date,
    outcome: Outcome,
    *,
    now: float,
    lines: int = 0,
    merchants: dict[str, str] | None = None,
) -> SavedRun:
    """Record the run and open its new discrepancies, in one transaction."""
    async with write(db) as conn:
        return await save_run_in(conn, db, acquirer, day, outcome, now, lines, merchants or {})


async def save_run_in(
    conn: AsyncConnection,
    db: Database,
    acquirer: str,
    day: date,
    outcome: Outcome,
    now: float,
    lines: int,
    merchants: dict[str, str],
) -> SavedRun:
    """:func:`save_run` inside the caller's transaction (``merchants``: payment -> merchant)."""
    rid = run_id(acquirer, day, outcome)
    row = {
        "id": rid,
        "acquirer": acquirer,
        "day": day.isoformat(),
        "lines": lines,
        "matched": outcome.matched,
        "discrepancies": len(outcome.discrepancies),
        "created_at": now,
    }
    inserted = await conn.execute(insert_new(db, runs, ["id"]).returning(runs.c.id), [row])
    new_run = bool(inserted.all())
    opened: list[OpenedDiscrepancy] = []
    for found in outcome.discrepancies:
        merchant = merchants.get(found.payment_id or "")
        statement = insert_new(db, discrepancies, ["acquirer", "kind", "reference"])
        values = _discrepancy_row(acquirer, day, found, rid, now, merchant)
        new = (await conn.execute(statement.returning(discrepancies.c.id), [values])).first()
        if new is not None:
            opened.append(OpenedDiscrepancy(int(new[0]), found))
    return SavedRun(rid, len(opened), new_run, tuple(opened))


def _discrepancy_row(
    acquirer: str, day: date, found: Discrepancy, rid: str, now: float, merchant: str | None
) -> dict[str, Any]:
    return {
        "acquirer": acquirer,
        "kind": found.kind.value,
        "reference": found.reference,
        "payment_id": found.payment_id,
        "merchant_id": merchant,
        "day": day.isoformat(),
        "detail": found.detail,
        "remediation": found.remediation,
        "status": "open",
        "note": None,
        "run_id": rid,
        "opened_at": now,
        "closed_at": None,
    }


async def close(db: Database, discrepancy_id: int, status: str, note: str, *, now: float) -> None:
    """Resolve or accept an open discrepancy, with the note that says why."""
    if status not in _CLOSED or not note.strip():
        raise ValueError("a discrepancy is closed as resolved or accepted, with a note")
    async with write(db) as conn:
        done = await conn.execute(
            update(discrepancies)
            .where(discrepancies.c.id == discrepancy_id, discrepancies.c.status == "open")
            .values(status=status, note=note, closed_at=now)
        )
    if done.rowcount != 1:
        raise DiscrepancyNotOpen(f"no open discrepancy {discrepancy_id}")


async def resolve_in(
    conn: AsyncConnection, acquirer: str, kind: str, reference: str, note: str, now: float
) -> None:
    """Resolve the open discrepancy (acquirer, kind, reference), if any, with ``note``: what
    the remediation did."""
    await conn.execute(
        update(discrepancies)
        .where(
            discrepancies.c.acquirer == acquirer,
            discrepancies.c.kind == kind,
            discrepancies.c.reference == reference,
            discrepancies.c.status == "open",
        )
        .values(status="resolved", note=note, closed_at=now)
    )


async def open_discrepancies(db: Database, acquirer: str | None = None) -> list[dict[str, Any]]:
    query = select(discrepancies).where(discrepancies.c.status == "open")
    if acquirer is not None:
        query = query.where(discrepancies.c.acquirer == acquirer)
    async with read(db) as conn:
        rows = (await conn.execute(query.order_by(discrepancies.c.id))).mappings().all()
    return [dict(row) for row in rows]


async def statuses(
    db: Database, acquirer: str, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], str]:
    """The status of each (kind, reference) discrepancy of ``acquirer`` that exists."""
    found: dict[tuple[str, str], str] = {}
    references = sorted({reference for _, reference in keys})
    async with read(db) as conn:
        for start in range(0, len(references), 500):
            query = select(
                discrepancies.c.kind, discrepancies.c.reference, discrepancies.c.status
            ).where(
                discrepancies.c.acquirer == acquirer,
                discrepancies.c.reference.in_(references[start : start + 500]),
            )
            for kind, reference, status in (await conn.execute(query)).all():
                found[(kind, reference)] = status
    return found
