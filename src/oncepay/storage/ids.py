"""Object ids: a type prefix and 96 random bits, Stripe style (``pay_…``, ``re_…``, ``evt_…``)."""

from __future__ import annotations

import re
import secrets

__all__ = ["is_id", "new_id"]

_ID = re.compile(r"[a-z]{2,4}_[0-9a-f]{24}")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def is_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id we hand out; anything else is not found
    without asking the database (which may refuse a NUL byte, say)."""
    return _ID.fullmatch(value) is not None
