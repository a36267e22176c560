"""The transactional outbox (SPEC §6): every state change writes its event row in the same
transaction as the change, so an event exists exactly when its change committed."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.schema import events

__all__ = ["emit", "new_id"]


def new_id(prefix: str) -> str:
    """A Stripe-style id: a type prefix and 96 random bits."""
    return f"{prefix}_{secrets.token_hex(12)}"


async def emit(
    conn: AsyncConnection, *, merchant_id: str, type: str, object_id: str, data: dict[str, Any]
) -> str:
    event_id = new_id("evt")
    await conn.execute(
        events.insert().values(
            id=event_id,
            merchant_id=merchant_id,
            type=type,
            object_id=object_id,
            data=json.dumps(data, separators=(",", ":")),
            created_at=time.time(),
        )
    )
    return event_id
