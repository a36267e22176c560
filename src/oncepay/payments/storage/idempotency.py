"""The idempotency store of a payments process: a table in the service's own database (so a
phase and its recovery point commit together), queued behind SQLite's one writer, with Redis
in front when configured."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

from oncepay.errors import ConfigurationError
from oncepay.idempotency.engine import ClaimsInTransaction
from oncepay.idempotency.records import Claim, Record, StoredResponse
from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.base import (
    DEFAULT_PURGE_BATCH,
    ForwardsTransactions,
    TransactionalStore,
    Watch,
)
from oncepay.idempotency.stores.tiered import TieredStore
from oncepay.storage.db import Database

__all__ = ["IDEMPOTENCY_TABLE", "OneWriter", "idempotency_store"]

IDEMPOTENCY_TABLE = "oncepay_idempotency"


async def idempotency_store(db: Database, redis_url: str | None = None) -> Store:
    """The store, its table created (and the database reached: start-up fails fast)."""
    store: Store = store_from_url(db.store_url(IDEMPOTENCY_TABLE))
    await store.get("oncepay", "start-up")  # fail fast, and create the table before use
    await _index_recovery_points(db)
    if db.is_sqlite:
        store = OneWriter(store, db.writers)
    if redis_url:
        store = TieredStore(store, store_from_url(redis_url))
    return store


async def _index_recovery_points(db: Database) -> None:
    """An index on the records' recovery points: the operator's timeline of a payment finds
    the requests that touched it by their recovery point (``<point>:<op>:<object id>``).
    Made here, not in a migration: the store makes its table after the migrations ran. On
    PostgreSQL under the migrations' lock, so processes starting together make it once."""
    from sqlalchemy import text

    from oncepay.payments.storage.migrations import ADVISORY_LOCK
    from oncepay.storage.db import write

    async with write(db) as conn:
        if not db.is_sqlite:
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK})"))
        await conn.execute(
            text(
                f"CREATE INDEX IF NOT EXISTS {IDEMPOTENCY_TABLE}_point "
                f"ON {IDEMPOTENCY_TABLE} (recovery_point)"
            )
        )


class OneWriter(ForwardsTransactions):
    """The SQLite idempotency store, queued behind the same in-process writer lock as the
    service's own transactions (see :class:`~oncepay.storage.db.Database`), so a
    claim never waits in SQLite's sleeping busy handler for a phase of this very process.
    Transactional completion and checkpoints run inside a phase, which holds the lock
    already."""

    def __init__(self, store: Store, lock: asyncio.Lock) -> None:
        if not isinstance(store, TransactionalStore):  # checked once: a type, not a hasattr
            raise ConfigurationError("the service's idempotency store must be a SQL store")
        self.store: Store = store
        self.transactional = store
        # Claims inside a phase (the SQL stores; a tiered one has none): checked here, once —
        # a runtime protocol's isinstance walks the protocol's members, ~1 % of a payment's
        # CPU when it ran at every claim.
        self._claims = store if isinstance(store, ClaimsInTransaction) else None
        self.lock = lock

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        async with self.lock:
            return await self.store.claim(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        async with self.lock:
            await self.store.complete(scope, key, fence, response, now=now)

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        async with self.lock:
            await self.store.release(scope, key, fence, now=now)

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        async with self.lock:
            await self.store.checkpoint(scope, key, fence, recovery_point, now=now, lease=lease)

    async def aclaim_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        fence: int,
        now: float,
        lease: float,
        ttl: float,
    ) -> bool:
        """A claim inside a phase, which holds the lock already (see the class)."""
        if self._claims is None:
            raise ConfigurationError("this idempotency store cannot claim inside a transaction")
        return await self._claims.aclaim_in(
            conn, scope, key, fingerprint, fence=fence, now=now, lease=lease, ttl=ttl
        )

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        async with self.lock:
            return await self.store.purge_expired(now=now, limit=limit)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self.store.get(scope, key)

    def watch(self, scope: str, key: str) -> AbstractAsyncContextManager[Watch]:
        return self.store.watch(scope, key)

    async def aclose(self) -> None:
        await self.store.aclose()
