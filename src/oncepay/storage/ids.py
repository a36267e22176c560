"""Object ids: a type prefix and 96 random bits, Stripe style (``pay_…``, ``re_…``, ``evt_…``).

The bits come from ``os.urandom``, as ``secrets.token_hex`` reads them, but 3 KiB at a time
instead of 12 bytes a call: a payment makes about ten ids, and on a virtual machine each
``getrandom`` call was ~3 µs of its CPU (bench/e2e/PROFILE.md). The bytes are handed out once
each, under a lock (ids are made from threads too), and a forked child drops what its parent
had read ahead, so no two processes ever hand out the same bytes.
"""

from __future__ import annotations

import os
import re
import threading

__all__ = ["is_id", "new_id", "random_hex"]

_ID = re.compile(r"[a-z]{2,4}_[0-9a-f]{24}")
_SIZE = 12  # bytes an id: 96 bits
_BATCH = _SIZE * 256


class _Ahead:
    """Random bytes read ahead, and how many of them are handed out."""

    __slots__ = ("buffer", "lock", "used")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer = b""
        self.used = 0


_ahead = _Ahead()


def random_hex() -> str:
    """96 random bits as 24 hex digits, never handed out before."""
    with _ahead.lock:
        used = _ahead.used
        if used + _SIZE > len(_ahead.buffer):
            _ahead.buffer, used = os.urandom(_BATCH), 0
        _ahead.used = used + _SIZE
        return _ahead.buffer[used : used + _SIZE].hex()


def new_id(prefix: str) -> str:
    return f"{prefix}_{random_hex()}"


def is_id(value: str) -> bool:
    """Whether ``value`` has the shape of an id we hand out; anything else is not found
    without asking the database (which may refuse a NUL byte, say)."""
    return _ID.fullmatch(value) is not None


def _forget_in_child() -> None:
    global _ahead  # noqa: PLW0603 - a fresh state, its lock too (a thread may have held it)
    _ahead = _Ahead()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
