"""Start-up: a payments process's :class:`~oncepay.payments.context.Services`, wired from its
settings — the database (migrated), the idempotency engine on the same database (queued behind
SQLite's one writer, with Redis in front when configured), the HTTP gate, and the acquirers:
the embedded simulator (in-process, on its own database) when no URL is set, else one client
per configured URL."""

from __future__ import annotations

import asyncio
from typing import Any

from oncepay.http._gate import Gate
from oncepay.idempotency.engine import Engine
from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.tiered import TieredStore
from oncepay.payments.acquirers.base import Acquirer
from oncepay.payments.acquirers.breaker import breaker_for
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.context import IDEMPOTENCY_TABLE, Services
from oncepay.payments.db import Database
from oncepay.payments.migrations import migrate
from oncepay.payments.settings import Settings

__all__ = ["OneWriter", "build_acquirers", "start"]


async def start(settings: Settings, acquirers: AcquirerPool | None = None) -> Services:
    """Everything a payments process needs, ready; ``acquirers`` replaces the configured ones."""
    db = Database.from_url(settings.database_url)
    await migrate(db)
    store: Store = store_from_url(db.store_url(IDEMPOTENCY_TABLE))
    await store.get("oncepay", "start-up")  # fail fast, and create the table before use
    if db.is_sqlite:
        store = OneWriter(store, db.writers)
    if settings.redis_url:
        store = TieredStore(store, store_from_url(settings.redis_url))
    engine = Engine(store, ttl=settings.key_ttl, lease=settings.lease)
    gate = Gate(engine, methods=("POST",), required=True)
    return Services(settings, db, engine, gate, acquirers or build_acquirers(settings))


def build_acquirers(settings: Settings) -> AcquirerPool:
    timeout, attempts = settings.acquirer_timeout, settings.acquirer_attempts
    found: list[Acquirer] = []
    if settings.acquirer_url is None:
        from oncepay.simulator import create_app  # the service extra only: imported when used

        app = create_app(settings.acquirer_database_url)
        found.append(
            HttpAcquirer("primary", app=app, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("primary"))
        )  # fmt: skip
    else:
        found.append(
            HttpAcquirer("primary", settings.acquirer_url, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("primary"))
        )  # fmt: skip
    if settings.secondary_acquirer_url:
        url = settings.secondary_acquirer_url
        found.append(
            HttpAcquirer("secondary", url, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("secondary"))
        )  # fmt: skip
    return AcquirerPool(found)


class OneWriter:
    """The SQLite idempotency store, queued behind the same in-process writer lock as the
    service's own transactions (see :class:`~oncepay.payments.db.Database`), so a claim never
    waits in SQLite's sleeping busy handler for a phase of this very process. Transactional
    completion and checkpoints run inside a phase, which holds the lock already."""

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
