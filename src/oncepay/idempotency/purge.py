"""Purging expired idempotency records in bounded batches: one function for ``oncepay purge``
and the payments worker's reaper."""

from __future__ import annotations

from oncepay.idempotency.stores.base import Store

__all__ = ["purge_expired"]


async def purge_expired(store: Store, *, now: float, batch: int) -> int:
    """Remove every record expired at ``now``, at most ``batch`` per statement (a short lock
    each, however large the backlog); how many went. Redis expires its own: 0 there."""
    total = 0
    while (removed := await store.purge_expired(now=now, limit=batch)) > 0:
        total += removed
        if removed < batch:
            break
    return total
