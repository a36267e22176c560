"""A fast tier in front of a system of record (SPEC §3): Redis before SQL.

The SQL store decides everything; the cache only ever answers what cannot be wrong:

* a **completed** record — immutable until it expires — answers replays and reuse checks in one
  Redis round trip. It reaches the cache after the completion committed in SQL (``remember``)
  or when a claim in SQL finds it completed (a back-fill), never before;
* an **in-flight hint** — written when SQL grants a claim, with a lease of a second — answers a
  duplicate arriving meanwhile with a 409 (retry shortly) without touching SQL. A stale hint can
  only ever cause a spurious "retry shortly", never a second run or a wrong replay.

Everything else, and every cache miss or cache failure, goes to the system of record. Losing the
cache — a flush, a restart, an outage — therefore loses speed, not a guarantee: its errors are
logged and the request carries on in SQL.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager
from typing import cast

from oncepay.errors import OncePayError
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, RecordState, StoredResponse
from oncepay.idempotency.stores.base import (
    DEFAULT_PURGE_BATCH,
    ForwardsTransactions,
    Store,
    TransactionalStore,
    Watch,
)

__all__ = ["IN_FLIGHT_HINT", "TieredStore", "TransactionalTieredStore"]

log = logging.getLogger("oncepay.idempotency")

# How long the cache may answer "in progress" for a claim it saw granted: about one client
# retry interval. Longer would turn quick retries of a finished request into needless 409s.
IN_FLIGHT_HINT = 1.0
# Hints this process wrote and may still complete in the cache; bounded so a flood of
# requests that never finish cannot grow it without end (a forgotten hint just lapses).
MAX_HINTS = 10_000


class TieredStore:
    """``primary`` (the system of record: SQLite or PostgreSQL) behind ``cache`` (Redis).

    It is a :class:`~oncepay.idempotency.stores.base.TransactionalStore` exactly when its
    primary is one: ``TieredStore(primary, cache)`` then builds a
    :class:`TransactionalTieredStore`, whose transactional completion goes to the primary.
    """

    def __new__(cls, primary: Store, cache: Store, *, hint: float = IN_FLIGHT_HINT) -> TieredStore:
        transactional = cls is TieredStore and isinstance(primary, TransactionalStore)
        return super().__new__(TransactionalTieredStore if transactional else cls)

    def __init__(self, primary: Store, cache: Store, *, hint: float = IN_FLIGHT_HINT) -> None:
        self.primary = primary
        self.cache = cache
        self.hint = hint
        self._hints: OrderedDict[tuple[str, str], int] = OrderedDict()

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        cached = await self._cached(scope, key, now)
        if cached is not None:
            return Claim(ClaimOutcome.EXISTING, cached)
        claim = await self.primary.claim(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
        if claim.claimed:
            await self._hint(claim.record, now)
        elif claim.record.state is RecordState.COMPLETED:
            await self._backfill(claim.record, now)
        return claim

    async def remember(self, scope: str, key: str, response: StoredResponse, *, now: float) -> None:
        """Tell the cache a request completed — call only after the completion committed."""
        fence = self._hints.pop((scope, key), None)
        if fence is None:
            return
        try:
            await self.cache.complete(scope, key, fence, response, now=now)
        except OncePayError as exc:  # the hint lapsed or the cache is away: back-fill later
            log.debug("cache not updated for key %r: %s", key, exc.detail)

    # -- the system of record decides the rest -------------------------------------------------

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        await self.primary.complete(scope, key, fence, response, now=now)
        await self.remember(scope, key, response, now=now)

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        await self.primary.release(scope, key, fence, now=now)
        await self._drop_hint(scope, key, now)

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        await self.primary.checkpoint(scope, key, fence, recovery_point, now=now, lease=lease)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self.primary.get(scope, key)

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        return await self.primary.purge_expired(now=now, limit=limit)

    def watch(self, scope: str, key: str) -> AbstractAsyncContextManager[Watch]:
        return self.primary.watch(scope, key)

    async def aclose(self) -> None:
        await self.cache.aclose()
        await self.primary.aclose()

    # -- the cache, best effort ------------------------------------------------------------------

    async def _cached(self, scope: str, key: str, now: float) -> Record | None:
        """A record the cache may answer for: completed, or a live in-flight hint."""
        try:
            record = await self.cache.get(scope, key)
        except OncePayError as exc:
            log.warning("cache unavailable, asking the system of record: %s", exc.detail)
            return None
        if record is None or record.is_expired(now):
            return None
        if record.state is RecordState.COMPLETED or record.is_leased(now):
            return record
        return None

    async def _hint(self, record: Record, now: float) -> None:
        ttl = record.expires_at - now
        lease = min(self.hint, ttl / 2)
        try:
            hint = await self.cache.claim(
                record.scope, record.key, record.fingerprint, now=now, lease=lease, ttl=ttl
            )
        except OncePayError as exc:
            log.warning("cache unavailable for an in-flight hint: %s", exc.detail)
            return
        if hint.claimed:
            self._hints[(record.scope, record.key)] = hint.record.fence
            while len(self._hints) > MAX_HINTS:
                self._hints.popitem(last=False)

    async def _backfill(self, record: Record, now: float) -> None:
        assert record.response is not None  # a completed record has its response
        await self._hint(record, now)
        await self.remember(record.scope, record.key, record.response, now=now)

    async def _drop_hint(self, scope: str, key: str, now: float) -> None:
        fence = self._hints.pop((scope, key), None)
        if fence is None:
            return
        try:
            await self.cache.release(scope, key, fence, now=now)
        except OncePayError as exc:
            log.debug("cache hint not released for key %r: %s", key, exc.detail)


class TransactionalTieredStore(ForwardsTransactions, TieredStore):
    """A :class:`TieredStore` whose primary completes inside the caller's transaction: those
    completions and checkpoints belong to the system of record. After the caller's commit,
    :meth:`TieredStore.remember` tells the cache."""

    def __init__(self, primary: Store, cache: Store, *, hint: float = IN_FLIGHT_HINT) -> None:
        super().__init__(primary, cache, hint=hint)
        self.transactional = cast(TransactionalStore, primary)  # TieredStore.__new__ checked it
