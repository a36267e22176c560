"""The outbox's fan-out (SPEC §6).

**Outbox.** :func:`fan_out` runs inside the transaction that writes an event, so a delivery row
exists exactly when its event committed, for every enabled endpoint subscribed to its type.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.errors import InvalidRequest
from oncepay.payments.storage.schema import events, webhook_deliveries, webhook_endpoints
from oncepay.storage.ids import new_id
from oncepay.storage.raw import Sql, raw

__all__ = [
    "ENDPOINTS_ALONGSIDE",
    "deliver_to",
    "endpoints_in",
    "fan_out",
    "keep_endpoints",
    "new_secret",
    "redeliver",
    "subscribed",
]


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def subscribed(endpoint_events: str, event_type: str) -> bool:
    wanted = json.loads(endpoint_events)
    return "*" in wanted or event_type in wanted


async def fan_out(
    conn: AsyncConnection, *, merchant_id: str, event_id: str, event_type: str, now: float
) -> int:
    """Queue the event for every enabled endpoint of the merchant that wants its type."""
    endpoints = await endpoints_in(conn, merchant_id)
    if not endpoints:
        return 0
    targets = [
        endpoint_id for endpoint_id, types in endpoints if "*" in types or event_type in types
    ]
    if targets:
        rows = [
            (new_id("whd"), merchant_id, event_id, endpoint_id, now, now, now)
            for endpoint_id in targets
        ]
        await (await raw(conn)).many(_INSERT_DELIVERY, rows)
    return len(targets)


async def endpoints_in(conn: AsyncConnection, merchant_id: str) -> list[tuple[str, frozenset[str]]]:
    """The merchant's enabled endpoints and the event types each wants, read once per
    transaction: a payment writes three events in one transaction, and every one of them fans
    out to the same endpoints (an endpoint created meanwhile commits before or after the whole
    transaction, never between two of its events). Never kept beyond the transaction: the
    next one reads them again, so an endpoint created, disabled or deleted by any process is
    seen by every event committed after it."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection else None
    kept = conn.info.get(_ENDPOINTS_KEY)
    if kept is not None and kept[0] is transaction and kept[1] == merchant_id:
        return kept[2]  # type: ignore[no-any-return]
    # Raw SQL (storage/raw.py), the statement written once: building the Core select and
    # running it through SQLAlchemy cost several times the query itself, twice a payment.
    rows = await (await raw(conn)).rows(_ENABLED_ENDPOINTS, merchant_id)
    endpoints = [(endpoint_id, frozenset(json.loads(types))) for endpoint_id, types in rows]
    conn.info[_ENDPOINTS_KEY] = (transaction, merchant_id, endpoints)
    return endpoints


# PostgreSQL: a column that brings the merchant's enabled endpoints along with a statement the
# transaction makes anyway (the payment it is about to change, read ``FOR UPDATE``), one round
# trip less than :func:`endpoints_in`'s own read (bench/e2e/PROFILE.md); ``{merchant}`` is the
# merchant's id in that statement. Its value goes to :func:`keep_endpoints`.
ENDPOINTS_ALONGSIDE = (
    "(SELECT coalesce(json_agg(json_build_array(e.id, e.events) ORDER BY e.seq), '[]')::text "
    "FROM webhook_endpoints AS e WHERE e.merchant_id = {merchant} "
    "AND NOT e.disabled AND NOT e.deleted)"
)


def keep_endpoints(conn: AsyncConnection, merchant_id: str, found: str) -> None:
    """What :data:`ENDPOINTS_ALONGSIDE` read, kept for the rest of the transaction as
    :func:`endpoints_in` keeps its own read (and, like it, never beyond)."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection else None
    endpoints = [
        (endpoint_id, frozenset(json.loads(types))) for endpoint_id, types in json.loads(found)
    ]
    conn.info[_ENDPOINTS_KEY] = (transaction, merchant_id, endpoints)


_ENDPOINTS_KEY = "oncepay.webhook_endpoints"
_ENABLED_ENDPOINTS = Sql(
    "SELECT id, events FROM webhook_endpoints "
    "WHERE merchant_id = $1 AND NOT disabled AND NOT deleted"
)
_INSERT_DELIVERY = Sql(
    "INSERT INTO webhook_deliveries (id, merchant_id, event_id, endpoint_id, status, attempts, "
    "next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, 'pending', 0, $5, $6, $7)"
)


def _delivery(merchant_id: str, event_id: str, endpoint_id: str, now: float) -> dict[str, Any]:
    return {
        "id": new_id("whd"),
        "merchant_id": merchant_id,
        "event_id": event_id,
        "endpoint_id": endpoint_id,
        "status": "pending",
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "updated_at": now,
    }


async def redeliver(
    conn: AsyncConnection, *, merchant_id: str, event_id: str, endpoint_id: str | None
) -> list[str]:
    """New deliveries of an event: to one endpoint, or to every enabled subscriber."""
    event = (await conn.execute(select(events).where(events.c.id == event_id))).one()
    query = select(webhook_endpoints).where(
        webhook_endpoints.c.merchant_id == merchant_id,
        webhook_endpoints.c.disabled.is_(False),
        webhook_endpoints.c.deleted.is_(False),
    )
    if endpoint_id is not None:
        query = query.where(webhook_endpoints.c.id == endpoint_id)
    targets = [
        row.id
        for row in await conn.execute(query)
        if endpoint_id is not None or subscribed(row.events, event.type)
    ]
    if endpoint_id is not None and not targets:
        raise InvalidRequest(f"endpoint: no enabled webhook endpoint {endpoint_id!r}")
    now = time.time()
    rows = [_delivery(merchant_id, event_id, target, now) for target in targets]
    if rows:
        await conn.execute(webhook_deliveries.insert(), rows)
    return [row["id"] for row in rows]


async def deliver_to(
    conn: AsyncConnection, *, merchant_id: str, event_ids: list[str], endpoint_id: str
) -> list[str]:
    """New deliveries of the merchant's events to one endpoint (a test delivery, or a
    redelivery of a time range), queued for the worker like any other."""
    now = time.time()
    rows = [_delivery(merchant_id, event_id, endpoint_id, now) for event_id in event_ids]
    if rows:
        await conn.execute(webhook_deliveries.insert(), rows)
    return [row["id"] for row in rows]
