"""The store protocol: the atomic primitives every backend provides.

Each primitive is one atomic step on the backend (one statement, one transaction or one Lua
script) and, on a networked store, one round trip. The decision table of SPEC §2 is not here:
it lives once, in :class:`oncepay.idempotency.engine.Engine`, above the stores.

The claim rule every backend implements atomically (``resolve_claim`` is its reference):

1. no record, an expired one, or a released one  -> CREATED, new token, fresh lease
2. a live record with another fingerprint        -> EXISTING (the engine answers 422)
3. a completed record                            -> EXISTING (the engine replays it)
4. an executing record whose lease still runs    -> EXISTING (the engine answers 409 / waits)
5. an executing record whose lease ran out       -> TAKEN_OVER, token + 1, fresh lease,
                                                    recovery point kept

``complete``, ``release`` and ``checkpoint`` succeed only for the current token of an executing
record and raise :class:`~oncepay.errors.LeaseLost` otherwise. Backend failures raise
:class:`~oncepay.errors.StoreUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

from oncepay.idempotency.records import (
    Claim,
    ClaimOutcome,
    Record,
    RecordState,
    StoredResponse,
    next_fence,
)

__all__ = [
    "ForwardsTransactions",
    "PollingWatch",
    "ScriptedStore",
    "Store",
    "TransactionalStore",
    "Watch",
    "polling_watch",
    "resolve_claim",
]

# A waiting request re-reads a store without notifications this often: short enough that a
# replay follows the first response within a few tens of ms, long enough not to hammer the store.
POLL_INTERVAL = 0.025
MAX_POLL_INTERVAL = 0.25

# How many expired records one purge statement removes: bounded so a purge never holds locks
# (or blocks a single-threaded server) for long; the purge job loops until a batch comes back short.
DEFAULT_PURGE_BATCH = 1000


class Watch(Protocol):
    """A subscription to changes of one record, opened before the record is read so that no
    completion can slip between the read and the wait."""

    async def wait(self, timeout: float) -> None:
        """Return when the record may have changed, or after ``timeout`` seconds."""


@runtime_checkable
class Store(Protocol):
    """The primitives of an idempotency store. Times are the engine's clock, in seconds."""

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim: ...

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None: ...

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None: ...

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None: ...

    async def get(self, scope: str, key: str) -> Record | None: ...

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int: ...

    def watch(self, scope: str, key: str) -> AbstractAsyncContextManager[Watch]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class TransactionalStore(Protocol):
    """A store that can also complete (and checkpoint) a record inside a transaction the
    caller holds on the store's own database: the SQL stores (SPEC §3, transactional
    completion). An optional capability, so a type: the engine checks it once, when built."""

    def complete_in(
        self, conn: Any, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None: ...

    async def acomplete_in(
        self, conn: Any, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None: ...

    async def acheckpoint_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fence: int,
        recovery_point: str,
        *,
        now: float,
        lease: float,
        keep_until: float = 0.0,
    ) -> None: ...


@runtime_checkable
class ScriptedStore(Protocol):
    """A store whose claim and completion are one script each (the Redis stores), with their
    replies and arguments open to a caller on the hot path: the ASGI middleware's fast path
    reads the claim script's reply itself, with no ``Claim``, ``Record`` or coroutine of the
    store's between it and the driver. An optional capability, so a type, checked once.

    The claim reply is ``[b"created", fence]`` for a new record (every other field is what was
    sent), else ``[outcome, scope, key, fingerprint, state, fence, created_at,
    lease_expires_at, expires_at, recovery_point, status, headers, body]`` as bytes (absent
    fields None); :meth:`claim_from` decodes either into the ``Claim`` that
    :meth:`Store.claim` would have returned."""

    def claim_reply(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float | str,
        ttl: float | str,
        now_text: bytes | None = None,
    ) -> Awaitable[Any]:
        """Send the claim; awaiting the result gives its raw reply or raises the driver's own
        error, which :meth:`claim_failed` turns into what :meth:`Store.claim` would do.
        ``lease`` and ``ttl`` may come as ``repr()`` of their float: the text sent for one;
        ``now_text``, if given, is a decimal text that reads as exactly the double ``now``
        (the store may send it instead of formatting ``now``)."""
        ...

    async def claim_failed(
        self,
        error: Exception,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float,
        ttl: float,
    ) -> Claim: ...

    def claim_from(
        self,
        reply: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float,
        ttl: float,
    ) -> Claim: ...

    async def complete_encoded(
        self, scope: str, key: str, fence: int, status: int, headers_json: str, body: bytes
    ) -> None:
        """:meth:`Store.complete` with the headers already in ``StoredResponse.headers_json``'s
        encoding (a completion whose response needs no ``StoredResponse`` object)."""


class ForwardsTransactions:
    """Transactional completion for a wrapper store (the tiered store, the payments service's
    one-writer queue): it is a :class:`TransactionalStore` exactly when what it wraps is one,
    and forwards to it. The wrapper sets ``transactional`` once, when built."""

    transactional: TransactionalStore

    def complete_in(
        self, conn: Any, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        self.transactional.complete_in(conn, scope, key, fence, response, now=now)

    async def acomplete_in(
        self, conn: Any, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        await self.transactional.acomplete_in(conn, scope, key, fence, response, now=now)

    async def acheckpoint_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fence: int,
        recovery_point: str,
        *,
        now: float,
        lease: float,
        keep_until: float = 0.0,
    ) -> None:
        await self.transactional.acheckpoint_in(
            conn, scope, key, fence, recovery_point, now=now, lease=lease, keep_until=keep_until
        )


class PollingWatch:
    """The fallback for stores without notifications: each wait is a short, growing sleep."""

    def __init__(self) -> None:
        self._interval = POLL_INTERVAL

    async def wait(self, timeout: float) -> None:
        await asyncio.sleep(max(0.0, min(timeout, self._interval)))
        self._interval = min(self._interval * 2, MAX_POLL_INTERVAL)


@asynccontextmanager
async def polling_watch() -> AsyncIterator[Watch]:
    yield PollingWatch()


def resolve_claim(
    existing: Record | None,
    scope: str,
    key: str,
    fingerprint: str,
    *,
    now: float,
    lease: float,
    ttl: float,
) -> Claim:
    """The claim rule, for stores that can run Python inside their atomic step."""
    if existing is None or existing.is_expired(now) or existing.state is RecordState.RELEASED:
        record = Record(
            scope=scope,
            key=key,
            fingerprint=fingerprint,
            state=RecordState.EXECUTING,
            fence=next_fence(existing.fence if existing else None, now),
            created_at=now,
            lease_expires_at=now + lease,
            expires_at=now + ttl,
        )
        late = existing is not None and existing.state is not RecordState.RELEASED
        return Claim(ClaimOutcome.CREATED, record, late)
    if (
        existing.fingerprint != fingerprint
        or existing.state is RecordState.COMPLETED
        or existing.is_leased(now)
    ):
        return Claim(ClaimOutcome.EXISTING, existing)
    taken = replace(existing, fence=existing.fence + 1, lease_expires_at=now + lease)
    return Claim(ClaimOutcome.TAKEN_OVER, taken)
