"""Findings kept in the payments database (migration 5, :func:`create_tables`): what the worker's
live detectors found, for ``GET /v1/insight/findings`` and the operators.

One row per anomaly: a tenant (the merchant id), a kind, and the window its evidence spans.
A finding is ``open`` while its anomaly goes on and ``closed`` once its evidence has stopped
for :data:`QUIET` seconds of the log's time. At most one finding of a tenant and kind is open
(a partial unique index says so, on SQLite and PostgreSQL alike), so:

* a continuing anomaly **extends** its finding (the window, the events, the evidence), it never
  makes a second one; an episode whose window overlaps a finding's (within a bucket) is that
  finding, whoever reports it: a worker that restarts and reads the log again, or another
  worker process reading the same log, finds it and extends it (or leaves it as it is);
* a new anomaly after a quiet spell closes the old finding and opens a new one.

Several workers at once: each finding is written in a transaction of its own; two that insert
the same new finding meet at the unique index, and the one that loses rolls back (its event
with it) and tries again, finding the winner's row to extend. The ``announce`` callback writes
the ``insight.finding_opened`` event in the inserting transaction (the transactional outbox):
the event exists exactly when the finding does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
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
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.insight.findings import Finding
from oncepay.storage.db import Database, read, write
from oncepay.storage.ids import new_id

__all__ = [
    "CLOSED",
    "OPEN",
    "QUIET",
    "Announce",
    "Reported",
    "close_quiet",
    "create_tables",
    "every_tenant",
    "filters",
    "findings",
    "public",
    "record",
]

OPEN, CLOSED = "open", "closed"
# A finding closes once its evidence has stopped for an hour of the log's time: longer than the
# quiet buckets an episode may span (four of ten minutes), so an anomaly that pauses and goes
# on is still the same finding.
QUIET = 3600.0
# Windows this close (one bucket) are the same anomaly: an episode's edges move a little as
# the tenant's baseline learns.
SLACK = 600.0

Seq = BigInteger().with_variant(Integer(), "sqlite")
metadata = MetaData()
findings = Table(
    "insight_findings",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    # The tenant of the key-usage log: the merchant id in the payments service.
    Column("merchant_id", String(255), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("first_at", Float, nullable=False),
    Column("last_at", Float, nullable=False),
    Column("events", Integer, nullable=False),
    Column("detail", Text, nullable=False),
    Column("evidence", Text, nullable=False),  # JSON: example keys (hashes), sources, expected
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("insight_findings_merchant_seq", "merchant_id", "seq"),
    Index("insight_findings_window", "merchant_id", "kind", "last_at"),
    Index(
        "insight_findings_one_open",
        "merchant_id",
        "kind",
        unique=True,
        sqlite_where=text("status = 'open'"),
        postgresql_where=text("status = 'open'"),
    ),
)

# Writes the event of a newly opened finding, in the transaction that inserted it.
Announce = Callable[[AsyncConnection, dict[str, Any]], Awaitable[None]]


async def create_tables(conn: AsyncConnection, db: Database) -> None:
    """Migration 5."""
    await conn.run_sync(metadata.create_all)


@dataclass(frozen=True, slots=True)
class Reported:
    """What became of a finding handed to :func:`record`."""

    id: str
    opened: bool  # a new finding (and its event); False: an existing one extended or kept


async def record(
    db: Database,
    finding: Finding,
    evidence: dict[str, Any],
    *,
    announce: Announce | None = None,
    now: float | None = None,
) -> Reported:
    """Store ``finding``: extend the one its window overlaps, else open a new one (closing the
    tenant's older open finding of that kind). Safe to call again with the same or a grown
    finding, from any number of workers at once."""
    for attempt in range(3):
        try:
            async with write(db) as conn:
                return await _record(conn, finding, evidence, announce, now or time.time())
        except IntegrityError:  # another worker opened it first: extend theirs
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _record(
    conn: AsyncConnection,
    finding: Finding,
    evidence: dict[str, Any],
    announce: Announce | None,
    now: float,
) -> Reported:
    c = findings.c
    same = (
        await conn.execute(
            select(c.id, c.first_at, c.last_at, c.events)
            .where(
                c.merchant_id == finding.tenant,
                c.kind == finding.kind,
                c.last_at >= finding.first_at - SLACK,
                c.first_at <= finding.last_at + SLACK,
            )
            .order_by(c.seq.desc())
            .limit(1)
        )
    ).first()
    if same is not None:
        if finding.last_at > same.last_at or finding.events > same.events:
            await conn.execute(
                update(findings)
                .where(c.id == same.id)
                .values(
                    first_at=min(same.first_at, finding.first_at),
                    last_at=max(same.last_at, finding.last_at),
                    events=max(same.events, finding.events),
                    detail=finding.detail,
                    evidence=_json(evidence),
                    updated_at=now,
                )
            )
        return Reported(same.id, opened=False)
    await conn.execute(  # an anomaly before this one, now over
        update(findings)
        .where(
            c.merchant_id == finding.tenant,
            c.kind == finding.kind,
            c.status == OPEN,
            # Only one this finding does not overlap: under read committed, another worker's
            # overlapping finding may have committed since the select above; closing it would
            # open a second one. Left open, it makes the insert below fail on the unique
            # index, and the retry extends it.
            or_(c.last_at < finding.first_at - SLACK, c.first_at > finding.last_at + SLACK),
        )
        .values(status=CLOSED, updated_at=now)
    )
    finding_id = new_id("ins")
    row: dict[str, Any] = {
        "id": finding_id,
        "merchant_id": finding.tenant,
        "kind": finding.kind,
        "status": OPEN,
        "first_at": finding.first_at,
        "last_at": finding.last_at,
        "events": finding.events,
        "detail": finding.detail,
        "evidence": _json(evidence),
        "created_at": now,
        "updated_at": now,
    }
    await conn.execute(findings.insert().values(**row))
    if announce is not None:
        await announce(conn, _public_of(row))
    return Reported(finding_id, opened=True)


async def close_quiet(db: Database, before: float, *, now: float | None = None) -> int:
    """Close the open findings whose evidence stopped before ``before`` (the log's time
    less :data:`QUIET`); how many."""
    async with write(db) as conn:
        result = await conn.execute(
            update(findings)
            .where(findings.c.status == OPEN, findings.c.last_at < before)
            .values(status=CLOSED, updated_at=now or time.time())
        )
        return int(result.rowcount or 0)


def public(row: Any) -> dict[str, Any]:
    """A finding as the API shows it."""
    return _public_of(dict(row._mapping))


def _public_of(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "object": "insight_finding",
        "tenant": row["merchant_id"],
        "kind": row["kind"],
        "status": row["status"],
        "first_at": row["first_at"],
        "last_at": row["last_at"],
        "events": row["events"],
        "detail": row["detail"],
        "evidence": json.loads(row["evidence"]),
        "created": int(row["created_at"]),
        "updated": int(row["updated_at"]),
    }


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def filters(kind: str | None, status: str | None) -> Sequence[Any]:
    """The conditions of a list's ``kind`` and ``status`` query parameters."""
    where = []
    if kind is not None:
        where.append(findings.c.kind == kind)
    if status is not None:
        where.append(findings.c.status == status)
    return where


async def every_tenant(
    db: Database, limit: int, starting_after: str | None, where: Sequence[Any] = ()
) -> tuple[list[Any], bool] | None:
    """A page of every tenant's findings, newest first (the operators' list); None when
    ``starting_after`` names no finding of this list."""
    c = findings.c
    statement = select(findings).where(*where)
    async with read(db) as conn:
        if starting_after is not None:
            cursor = (
                await conn.execute(select(c.seq).where(c.id == starting_after, *where))
            ).scalar()
            if cursor is None:
                return None
            statement = statement.where(c.seq < cursor)
        rows = list(await conn.execute(statement.order_by(c.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
