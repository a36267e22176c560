"""Runs and discrepancies, kept in the payments database: what a finance team works from.

A discrepancy is one row per (acquirer, kind, reference), whatever the number of runs that
find it: ``open`` until a person resolves it (with a note) or accepts it (with a note). A run
is one row per (acquirer, day, outcome): its id is a digest of the three, so running a day
again with the same result inserts nothing and changes nothing (idempotent, SPEC §10).

The tables are created by :func:`create_tables`, a migration of the payments database."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.reconciliation.records import Discrepancy, Outcome
from oncepay.storage.db import Database, read, write

__all__ = [
    "DiscrepancyNotOpen",
    "SavedRun",
    "close",
    "create_tables",
    "open_discrepancies",
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
    Column("matched", BigInteger, nullable=False),
    Column("discrepancies", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
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
    Column("detail", Text, nullable=False),
    Column("remediation", Text, nullable=False),
    Column("status", String(16), nullable=False),  # open|resolved|accepted
    Column("note", Text),
    Column("run_id", String(40), nullable=False),  # the run that opened it
    Column("opened_at", Float, nullable=False),
    Column("closed_at", Float),
    UniqueConstraint("acquirer", "kind", "reference", name="reconciliation_discrepancy_once"),
)
# One row per settled reference: the guard that posts a settlement to the ledger once.
settlements = Table(
    "reconciliation_settlements",
    metadata,
    Column("reference", String(255), primary_key=True),
    Column("payment_id", String(40), nullable=False),
    Column("payout_id", String(255), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("net", BigInteger, nullable=False),
    Column("settled_at", String(40), nullable=False),
    Column("transaction_id", String(40), nullable=False),
    Column("created_at", Float, nullable=False),
)
_CLOSED = frozenset({"resolved", "accepted"})


class DiscrepancyNotOpen(LookupError):
    """No open discrepancy has that id (it never existed, or was closed already)."""


@dataclass(frozen=True, slots=True)
class SavedRun:
    run_id: str
    opened: int  # discrepancies seen for the first time by this run
    new_run: bool  # False: the same day gave the same outcome before, nothing was written


async def create_tables(conn: AsyncConnection, db: Database) -> None:
    """The migration that adds the reconciliation tables."""
    await conn.run_sync(metadata.create_all)


def run_id(acquirer: str, day: date, outcome: Outcome) -> str:
    document = json.dumps([acquirer, day.isoformat(), outcome.as_json()], sort_keys=True)
    return "rec_" + hashlib.sha256(document.encode()).hexdigest()[:24]


async def save_run(
    db: Database, acquirer: str, day: date, outcome: Outcome, *, now: float
) -> SavedRun:
    """Record the run and open its new discrepancies, in one transaction."""
    rid = run_id(acquirer, day, outcome)
    async with write(db) as conn:
        if (await conn.execute(select(runs.c.id).where(runs.c.id == rid))).first():
            return SavedRun(rid, 0, new_run=False)
        row = {
            "id": rid,
            "acquirer": acquirer,
            "day": day.isoformat(),
            "matched": outcome.matched,
            "discrepancies": len(outcome.discrepancies),
            "created_at": now,
        }
        await conn.execute(runs.insert().values(**row))
        opened = 0
        for found in outcome.discrepancies:
            opened += await _open(conn, acquirer, found, rid, now)
    return SavedRun(rid, opened, new_run=True)


async def _open(
    conn: AsyncConnection, acquirer: str, found: Discrepancy, rid: str, now: float
) -> int:
    """1 if ``found`` is new; a known one (open or closed) is left as it is."""
    key = (
        discrepancies.c.acquirer == acquirer,
        discrepancies.c.kind == found.kind.value,
        discrepancies.c.reference == found.reference,
    )
    if (await conn.execute(select(discrepancies.c.id).where(*key))).first():
        return 0
    await conn.execute(
        discrepancies.insert().values(
            acquirer=acquirer,
            kind=found.kind.value,
            reference=found.reference,
            payment_id=found.payment_id,
            detail=found.detail,
            remediation=found.remediation,
            status="open",
            run_id=rid,
            opened_at=now,
        )
    )
    return 1


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


async def open_discrepancies(db: Database, acquirer: str | None = None) -> list[dict[str, Any]]:
    query = select(discrepancies).where(discrepancies.c.status == "open")
    if acquirer is not None:
        query = query.where(discrepancies.c.acquirer == acquirer)
    async with read(db) as conn:
        rows = (await conn.execute(query.order_by(discrepancies.c.id))).mappings().all()
    return [dict(row) for row in rows]
