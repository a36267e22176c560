"""The transactional outbox (SPEC §6): every state change writes its event row in the same
transaction as the change — and, through :func:`~oncepay.payments.webhooks.outbox.fan_out`, one
delivery per subscribed webhook endpoint — so an event and its deliveries exist exactly when
the change committed."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.storage.schema import events
from oncepay.payments.webhooks.outbox import fan_out
from oncepay.storage.ids import new_id

__all__ = ["emit"]

_INSERT = events.insert()  # built once: building it costs more than running it


async def emit(
    conn: AsyncConnection, *, merchant_id: str, type: str, object_id: str, data: dict[str, Any]
) -> str:
    event_id, now = new_id("evt"), time.time()
    await conn.execute(
        _INSERT,
        {
            "id": event_id,
            "merchant_id": merchant_id,
            "type": type,
            "object_id": object_id,
            "data": json.dumps(data, separators=(",", ":")),
            "created_at": now,
        },
    )
    await fan_out(conn, merchant_id=merchant_id, event_id=event_id, event_type=type, now=now)
    return event_id
