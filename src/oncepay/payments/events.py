"""The transactional outbox (SPEC §6): every state change writes its event row in the same
transaction as the change, so an event exists exactly when its change committed."""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.schema import events

__all__ = ["emit", "is_id", "new_id"]

_ID = re.compile(r"[a-z]{2,4}_[0-9a-f]{24}")


def new_id(prefix: str) -> str:
    """A Stripe-style id: a type prefix and 96 random bits."""
    return f"{prefix}_{secrets.token_hex(12)}"


def is_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id we hand out; anything else is not found
    without asking the database (which may refuse a NUL byte, say)."""
    return _ID.fullmatch(value) is not None


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
