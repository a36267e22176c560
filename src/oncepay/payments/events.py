"""The transactional outbox (SPEC §6): every state change writes its event row in the same
transaction as the change — and, through :func:`~oncepay.payments.webhooks.outbox.fan_out`, one
delivery per subscribed webhook endpoint — so an event and its deliveries exist exactly when
the change committed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay._jsontext import encoder
from oncepay.payments import tracing
from oncepay.payments.storage.schema import events, merchants
from oncepay.payments.webhooks.outbox import endpoints_in, fan_out
from oncepay.storage.ids import new_id
from oncepay.storage.raw import Sql, raw

__all__ = ["FINDING_OPENED", "emit", "emit_many", "finding_opened"]

# The worker's live insight opened a finding (docs/insight.md): data is the finding.
FINDING_OPENED = "insight.finding_opened"

# json.dumps(data, separators=(",", ":")) with its encoder built once, not per call.
_compact = encoder()
_INSERT = events.insert()  # built once: building it costs more than running it
# The hot path's insert, raw (storage/raw.py): one event per state change.
_INSERT_ONE = Sql(
    "INSERT INTO events (id, merchant_id, type, object_id, data, created_at, traceparent) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


async def emit(
    conn: AsyncConnection,
    *,
    merchant_id: str,
    type: str,
    object_id: str,
    data: dict[str, Any] | str,
) -> str:
    """One event; ``data`` is its object, or that object's compact JSON already encoded."""
    event_id, now = new_id("evt"), time.time()
    data_json = data if isinstance(data, str) else _compact(data)
    trace = tracing.traceparent()  # its deliveries continue this trace
    args = (event_id, merchant_id, type, object_id, data_json, now, trace)
    # The endpoints are read (once a transaction) before the event is written: on PostgreSQL
    # the insert then travels with the transaction's next statement (storage/raw.py).
    await endpoints_in(conn, merchant_id)
    await (await raw(conn)).run(_INSERT_ONE, *args)
    reached = await fan_out(
        conn, merchant_id=merchant_id, event_id=event_id, event_type=type, now=now
    )
    if tracing.ENABLED:
        tracing.outbox_event(event_id, type=type, object_id=object_id, deliveries=reached)
    return event_id


async def emit_many(
    conn: AsyncConnection, found: Sequence[tuple[str, str, str, dict[str, Any]]]
) -> None:
    """Many events, each ``(merchant_id, type, object_id, data)``, in one statement (a
    reconciliation run settles thousands of payments per transaction). Each (merchant, type)
    fans out through the same endpoints within the transaction: when the first event of a
    group reached none, the rest of it is not asked again."""
    if not found:
        return
    now = time.time()
    rows: list[dict[str, Any]] = [
        {
            "id": new_id("evt"),
            "merchant_id": merchant_id,
            "type": type,
            "object_id": object_id,
            "data": _compact(data),
            "created_at": now,
        }
        for merchant_id, type, object_id, data in found
    ]
    await conn.execute(_INSERT, rows)
    unsubscribed: set[tuple[str, str]] = set()
    for row in rows:
        group = (row["merchant_id"], row["type"])
        if group in unsubscribed:
            continue
        reached = await fan_out(
            conn, merchant_id=group[0], event_id=row["id"], event_type=group[1], now=now
        )
        if not reached:
            unsubscribed.add(group)


async def finding_opened(conn: AsyncConnection, finding: dict[str, Any]) -> None:
    """The event of a finding the live insight just opened, in the transaction that inserted it
    (``oncepay.insight.store``'s ``announce``). A tenant that is no merchant (a log shared with
    a gateway) has no one to tell: its finding is stored, with no event."""
    tenant = finding["tenant"]
    if (await conn.execute(select(merchants.c.id).where(merchants.c.id == tenant))).first():
        await emit(
            conn, merchant_id=tenant, type=FINDING_OPENED, object_id=finding["id"], data=finding
        )
