"""The idempotency store of a payments process: a table in the service's own database (so a
phase and its recovery point commit together), queued behind SQLite's one writer, with Redis
in front when configured."""

from __future__ import annotations

import asyncio
from typing import Any

from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.tiered import TieredStore
from oncepay.payments.storage.db import Database

__all__ = ["IDEMPOTENCY_TABLE", "OneWriter", "idempotency_store"]

IDEMPOTENCY_TABLE = "oncepay_idempotency"


async def idempotency_store(db: Database, redis_url: str | None = None) -> Store:
    """The store, its table created (and the database reached: start-up fails fast)."""
    store: Store = store_from_url(db.store_url(IDEMPOTENCY_TABLE))
    await store.get("oncepay", "start-up")  # fail fast, and create the table before use
    if db.is_sqlite:
        store = OneWriter(store, db.writers)
    if redis_url:
        store = TieredStore(store, store_from_url(redis_url))
    return store


class OneWriter:
    """The SQLite idempotency store, queued behind the same in-process writer lock as the
    service's own transactions (see :class:`~oncepay.payments.storage.db.Database`), so a
    claim never waits in SQLite's sleeping busy handler for a phase of this very process.
    Transactional completion and checkpoints run inside a phase, which holds the lock
    already."""

    def __init__(self, store: Store, lock: asyncio.Lock) -> None:
        self.store = store
        self.lock = lock

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        async with self.lock:
            return await self.store.claim(*args, **kwargs)

    async def complete(self, *args: Any, **kwargs: Any) -> None:
        async with self.lock:
            await self.store.complete(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any) -> None:
        async with self.lock:
            await self.store.release(*args, **kwargs)

    async def checkpoint(self, *args: Any, **kwargs: Any) -> None:
        async with self.lock:
            await self.store.checkpoint(*args, **kwargs)

    async def purge_expired(self, *args: Any, **kwargs: Any) -> int:
        async with self.lock:
            return await self.store.purge_expired(*args, **kwargs)

    async def get(self, scope: str, key: str) -> Any:
        return await self.store.get(scope, key)

    def watch(self, scope: str, key: str) -> Any:
        return self.store.watch(scope, key)

    async def aclose(self) -> None:
        await self.store.aclose()

    async def acomplete_in(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        await self.store.acomplete_in(conn, *args, **kwargs)  # type: ignore[attr-defined]

    async def acheckpoint_in(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        await self.store.acheckpoint_in(conn, *args, **kwargs)  # type: ignore[attr-defined]

    def complete_in(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        self.store.complete_in(conn, *args, **kwargs)  # type: ignore[attr-defined]
