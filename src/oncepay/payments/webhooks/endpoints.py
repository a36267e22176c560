"""A merchant's webhook endpoints as the API changes and reads them, and the deliveries and
attempts it shows (SPEC §6). Changes run inside the caller's transaction (the idempotent
request's), reads open their own."""

from __future__ import annotations

import json
import time
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import models
from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.reads import DELIVERIES, Range, get_object
from oncepay.payments.records import AttemptRow, DeliveryRow, EndpointRow
from oncepay.payments.storage.schema import (
    events,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from oncepay.payments.webhooks.addresses import validate_url
from oncepay.payments.webhooks.outbox import deliver_to, new_secret, redeliver, subscribed
from oncepay.storage.db import Database, read, write
from oncepay.storage.ids import is_id, new_id

__all__ = [
    "create_endpoint",
    "delete_endpoint",
    "delivery_attempts",
    "load_endpoint",
    "read_endpoint",
    "redeliver_event",
    "redeliver_range",
    "rotate_secret",
    "send_test",
    "update_endpoint",
]

E = webhook_endpoints.c


async def load_endpoint(
    conn: AsyncConnection, endpoint_id: str, merchant_id: str, *, lock: bool = True
) -> EndpointRow:
    """The merchant's endpoint (row-locked for a change, on PostgreSQL), or 404."""
    if not is_id(endpoint_id):
        raise ResourceMissing(f"no webhook endpoint {endpoint_id!r}")
    query = select(webhook_endpoints).where(
        E.id == endpoint_id, E.merchant_id == merchant_id, E.deleted.is_(False)
    )
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise ResourceMissing(f"no webhook endpoint {endpoint_id!r}")
    return cast(EndpointRow, row)


async def read_endpoint(db: Database, endpoint_id: str, merchant_id: str) -> EndpointRow:
    async with read(db) as conn:
        return await load_endpoint(conn, endpoint_id, merchant_id, lock=False)


async def _save(conn: AsyncConnection, endpoint_id: str, **values: Any) -> EndpointRow:
    values["updated_at"] = time.time()
    await conn.execute(update(webhook_endpoints).where(E.id == endpoint_id).values(**values))
    row = (await conn.execute(select(webhook_endpoints).where(E.id == endpoint_id))).one()
    return cast(EndpointRow, row)


async def create_endpoint(
    conn: AsyncConnection,
    merchant_id: str,
    body: models.WebhookEndpointCreate,
    *,
    allow_private: bool,
) -> EndpointRow:
    url, now = validate_url(body.url, allow_private=allow_private), time.time()
    endpoint_id = new_id("we")
    await conn.execute(
        webhook_endpoints.insert().values(
            id=endpoint_id,
            merchant_id=merchant_id,
            url=url,
            events=json.dumps(body.events),
            description=body.description,
            disabled=False,
            secret=new_secret(),
            deleted=False,
            created_at=now,
            updated_at=now,
        )
    )
    return await load_endpoint(conn, endpoint_id, merchant_id)


async def update_endpoint(
    conn: AsyncConnection,
    endpoint_id: str,
    merchant_id: str,
    body: models.WebhookEndpointUpdate,
    *,
    allow_private: bool,
) -> EndpointRow:
    await load_endpoint(conn, endpoint_id, merchant_id)
    values: dict[str, Any] = {}
    if body.url is not None:
        values["url"] = validate_url(body.url, allow_private=allow_private)
    if body.events is not None:
        values["events"] = json.dumps(body.events)
    if body.description is not None:
        values["description"] = body.description
    if body.disabled is not None:
        values["disabled"] = body.disabled
        values["disabled_reason"] = "disabled by request" if body.disabled else None
    return await _save(conn, endpoint_id, **values)


async def delete_endpoint(db: Database, endpoint_id: str, merchant_id: str) -> None:
    """Stop delivering to it; deliveries still pending are canceled."""
    async with write(db) as conn:
        await load_endpoint(conn, endpoint_id, merchant_id)
        await _save(conn, endpoint_id, deleted=True, disabled=True, disabled_reason="deleted")
        await conn.execute(
            update(webhook_deliveries)
            .where(
                webhook_deliveries.c.endpoint_id == endpoint_id,
                webhook_deliveries.c.status == "pending",
            )
            .values(status="canceled", last_error="endpoint deleted", updated_at=time.time())
        )


async def rotate_secret(
    conn: AsyncConnection, endpoint_id: str, merchant_id: str, overlap: float
) -> EndpointRow:
    """A new signing secret; the old one keeps signing for ``overlap`` seconds."""
    row = await load_endpoint(conn, endpoint_id, merchant_id)
    return await _save(
        conn,
        endpoint_id,
        secret=new_secret(),
        previous_secret=row.secret,
        previous_secret_expires_at=time.time() + overlap,
    )


async def delivery_attempts(
    db: Database, delivery_id: str, merchant_id: str
) -> tuple[DeliveryRow, list[AttemptRow]]:
    """The merchant's delivery and its attempts, in order."""
    row = await get_object(db, DELIVERIES, delivery_id, merchant_id)
    async with read(db) as conn:
        attempts = await conn.execute(
            select(webhook_attempts)
            .where(webhook_attempts.c.delivery_id == delivery_id)
            .order_by(webhook_attempts.c.attempt)
        )
        return row, cast("list[AttemptRow]", list(attempts))


async def redeliver_event(
    conn: AsyncConnection, merchant_id: str, event_id: str, endpoint_id: str | None
) -> list[DeliveryRow]:
    """New deliveries of the merchant's event: to ``endpoint_id``, or every subscriber."""
    found = (
        await conn.execute(
            select(events.c.type).where(
                events.c.id == event_id, events.c.merchant_id == merchant_id
            )
        )
        if is_id(event_id)
        else None
    )
    event = found.first() if found is not None else None
    if event is None:
        raise ResourceMissing(f"no event {event_id!r}")
    if event.type == TEST_EVENT:  # a ping went to its one endpoint once: a new one is a new ping
        raise InvalidRequest(
            f"event {event_id!r} is a test ping: it is not redelivered; send a new one with "
            "POST /v1/webhook_endpoints/{id}/test"
        )
    if endpoint_id is not None:
        await load_endpoint(conn, endpoint_id, merchant_id)
    ids = await redeliver(conn, merchant_id=merchant_id, event_id=event_id, endpoint_id=endpoint_id)
    rows = await conn.execute(select(webhook_deliveries).where(webhook_deliveries.c.id.in_(ids)))
    return cast("list[DeliveryRow]", list(rows))


TEST_EVENT = "webhook_endpoint.test"
# One redelivery request queues at most this many events: a day of a busy shop, and few enough
# that the request (one transaction, its answer stored under the idempotency key) stays quick.
MAX_REDELIVER = 1000


async def _enabled(conn: AsyncConnection, endpoint_id: str, merchant_id: str) -> EndpointRow:
    row = await load_endpoint(conn, endpoint_id, merchant_id)
    if row.disabled:
        raise InvalidRequest(
            f"webhook endpoint {endpoint_id!r} is disabled ({row.disabled_reason}); "
            "enable it first (POST it with disabled: false)"
        )
    return row


async def send_test(conn: AsyncConnection, endpoint_id: str, merchant_id: str) -> DeliveryRow:
    """A ``webhook_endpoint.test`` event, new each time (its own ``webhook-id``), queued for
    this endpoint only, whatever it subscribes to."""
    row = await _enabled(conn, endpoint_id, merchant_id)
    event_id, now = new_id("evt"), time.time()
    data = {"object": "webhook_endpoint", "id": row.id, "url": row.url}
    await conn.execute(
        events.insert().values(
            id=event_id,
            merchant_id=merchant_id,
            type=TEST_EVENT,
            object_id=row.id,
            data=json.dumps(data, separators=(",", ":")),
            created_at=now,
        )
    )
    (delivery_id,) = await deliver_to(
        conn, merchant_id=merchant_id, event_ids=[event_id], endpoint_id=row.id
    )
    found = await conn.execute(
        select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
    )
    return cast(DeliveryRow, found.one())


async def redeliver_range(
    conn: AsyncConnection, endpoint_id: str, merchant_id: str, created: Range
) -> list[str]:
    """New deliveries to this endpoint of every event of the merchant created in ``created``
    that it subscribes to, oldest first. Each keeps its event's ``webhook-id``."""
    row = await _enabled(conn, endpoint_id, merchant_id)
    where = [
        events.c.merchant_id == merchant_id,
        events.c.type != TEST_EVENT,
        *created.conditions(events.c.created_at, seconds=True),
    ]
    count = (await conn.execute(select(func.count()).select_from(events).where(*where))).scalar()
    if (count or 0) > MAX_REDELIVER:
        raise InvalidRequest(
            f"created: {count} events in that range, more than the {MAX_REDELIVER} one "
            "request redelivers; narrow the range and send several"
        )
    found = await conn.execute(
        select(events.c.id, events.c.type).where(*where).order_by(events.c.seq)
    )
    wanted = [event.id for event in found if subscribed(row.events, event.type)]
    return await deliver_to(conn, merchant_id=merchant_id, event_ids=wanted, endpoint_id=row.id)
