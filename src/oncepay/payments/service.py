"""What one payments process holds — database, idempotency engine and HTTP policy, acquirers —
and the service's non-HTTP entry points: merchants and their API keys, idempotent requests,
reads.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.http._gate import Gate, Request, Respond, Run
from oncepay.idempotency.engine import Engine, Ticket
from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.tiered import TieredStore
from oncepay.payments.db import Database, read, write
from oncepay.payments.errors import AuthenticationFailed, ResourceMissing
from oncepay.payments.ids import is_id, new_id
from oncepay.payments.metrics import IDEMPOTENCY_DECISIONS
from oncepay.payments.migrations import migrate
from oncepay.payments.phases import Operation, Reply, run, run_local
from oncepay.payments.routing import AcquirerSet
from oncepay.payments.schema import api_keys, merchants
from oncepay.payments.settings import Settings

__all__ = ["IDEMPOTENCY_TABLE", "Merchant", "Services", "create_merchant"]

IDEMPOTENCY_TABLE = "oncepay_idempotency"
# Live keys start with sk_test_ while the acquirers are simulated; 24 random bytes (192 bits)
# make guessing hopeless, which is also why one SHA-256 (not a slow KDF) is the right hash.
KEY_PREFIX = "sk_test_"
KEY_BYTES = 24
# A process remembers a key it checked this long: a revoked key stops working within this
# time everywhere, and a busy merchant's requests skip one database read each.
KEY_CACHE_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Merchant:
    id: str
    name: str


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


async def create_merchant(db: Database, name: str) -> tuple[Merchant, str]:
    """A new merchant and its first API key (returned once; only its hash is kept)."""
    merchant = Merchant(new_id("mer"), name)
    async with write(db) as conn:
        await conn.execute(
            merchants.insert().values(id=merchant.id, name=name, created_at=time.time())
        )
        api_key = await _add_key(conn, merchant.id)
    return merchant, api_key


async def add_api_key(db: Database, merchant_id: str) -> str:
    async with write(db) as conn:
        return await _add_key(conn, merchant_id)


async def _add_key(conn: Any, merchant_id: str) -> str:
    api_key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    await conn.execute(
        api_keys.insert().values(
            id=new_id("key"), merchant_id=merchant_id, key_hash=hash_key(api_key),
            prefix=api_key[: len(KEY_PREFIX) + 4], created_at=time.time(),
        )
    )  # fmt: skip
    return api_key


@dataclass
class Services:
    settings: Settings
    db: Database
    engine: Engine
    gate: Gate
    acquirers: AcquirerSet
    # key hash -> (merchant, when checked)
    _merchants: dict[str, tuple[Merchant, float]] = field(default_factory=dict)

    @classmethod
    async def start(cls, settings: Settings, acquirers: AcquirerSet | None = None) -> Services:
        from oncepay.payments.acquirers.setup import build_acquirers

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
        return cls(settings, db, engine, gate, acquirers or await build_acquirers(settings))

    async def aclose(self) -> None:
        await self.acquirers.aclose()
        await self.engine.store.aclose()
        await self.db.aclose()

    # -- authentication --------------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Merchant:
        if not authorization:
            raise AuthenticationFailed("send your API key as 'Authorization: Bearer sk_test_…'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed(
                "use 'Authorization: Bearer <api key>'", code="invalid_api_key"
            )
        digest, now = hash_key(token.strip()), time.monotonic()
        cached = self._merchants.get(digest)
        if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
        self._merchants.pop(digest, None)
        merchant = await self._lookup_key(digest)
        self._merchants[digest] = (merchant, now)
        return merchant

    async def _lookup_key(self, digest: str) -> Merchant:
        async with read(self.db) as conn:
            row = (
                await conn.execute(
                    select(merchants.c.id, merchants.c.name)
                    .join(api_keys, api_keys.c.merchant_id == merchants.c.id)
                    .where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
                )
            ).first()
        if row is None:
            raise AuthenticationFailed("this API key is not valid", code="invalid_api_key")
        return Merchant(row.id, row.name)

    # -- idempotent requests ---------------------------------------------------------------------

    async def idempotent(
        self, request: Request, body: bytes, merchant: Merchant, op: Operation
    ) -> Reply:
        """SPEC §2 around one money-moving request, scoped to the merchant; a resumed key
        continues from its recovery point (SPEC §5)."""
        return await self._gated(request, body, merchant, lambda t: run(self, t, op, merchant.id))

    async def idempotent_local(
        self,
        request: Request,
        body: bytes,
        merchant: Merchant,
        work: Callable[[AsyncConnection], Awaitable[Reply]],
    ) -> Reply:
        """SPEC §2 around a request that is one local transaction (no acquirer call)."""
        return await self._gated(request, body, merchant, lambda t: run_local(self, t, work))

    async def _gated(
        self,
        request: Request,
        body: bytes,
        merchant: Merchant,
        execute: Callable[[Ticket], Awaitable[Reply]],
    ) -> Reply:
        outcome = await self.gate.decide(request, body, scope=merchant.id)
        if isinstance(outcome, Respond):
            IDEMPOTENCY_DECISIONS.labels(_decision(outcome)).inc()
            return Reply(outcome.status, outcome.body, tuple(outcome.headers))
        assert isinstance(outcome, Run)  # keys are required: never a pass-through
        IDEMPOTENCY_DECISIONS.labels("resume" if outcome.ticket.resumed else "execute").inc()
        reply = await execute(outcome.ticket)
        await self._remember(outcome.ticket, reply)
        expires = ("idempotency-key-expires", outcome.expires)
        return Reply(reply.status, reply.body, (*reply.headers, expires))

    async def resume(self, scope: str, key: str, fingerprint: str, op: Operation) -> Reply | None:
        """Take over an abandoned request and finish it (the recovery worker); None when
        someone else holds or finished it."""
        from oncepay.idempotency.engine import Execute

        decision = await self.engine.begin(scope, key, fingerprint)
        if not isinstance(decision, Execute):
            return None
        reply = await run(self, decision.ticket, op, scope)
        await self._remember(decision.ticket, reply)
        return reply

    async def _remember(self, ticket: Ticket, reply: Reply) -> None:
        """With a fast tier, tell it about a completion that has committed."""
        store = self.engine.store
        if reply.completed and isinstance(store, TieredStore):
            await store.remember(ticket.scope, ticket.key, reply.stored(), now=self.engine.clock())


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


def _decision(outcome: Respond) -> str:
    if any(name == "idempotent-replayed" for name, _ in outcome.headers):
        return "replay"
    return {400: "invalid", 409: "in_progress", 422: "reused", 503: "unavailable"}.get(
        outcome.status, "rejected"
    )


async def get_object(db: Database, table: Any, object_id: str, merchant_id: str) -> Any:
    name = _NAMES.get(table.name, "object")
    if not is_id(object_id):
        raise ResourceMissing(f"no {name} {object_id!r}")
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(table).where(table.c.id == object_id, table.c.merchant_id == merchant_id)
            )
        ).first()
    if row is None:
        raise ResourceMissing(f"no {name} {object_id!r}")
    return row


_NAMES = {
    "payments": "payment",
    "refunds": "refund",
    "events": "event",
    "webhook_deliveries": "webhook delivery",
}


async def find_merchant(db: Database, name: str) -> Merchant | None:
    """The oldest merchant of that name, if any."""
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(merchants.c.id, merchants.c.name)
                .where(merchants.c.name == name)
                .order_by(merchants.c.created_at)
            )
        ).first()
    return Merchant(row.id, row.name) if row else None
