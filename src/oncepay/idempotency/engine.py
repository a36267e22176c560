"""The engine: SPEC §2's decision table, in one place, above any store.

``Engine.begin`` turns a (scope, key, fingerprint) into a decision; no HTTP is involved:

* :class:`Execute`    — run the operation, then ``complete`` (or ``release`` on failure) with its
  ticket. ``ticket.resumed`` is true when an abandoned attempt was taken over, and
  ``ticket.recovery_point`` says how far that attempt had got.
* :class:`Replay`     — the operation already ran; here is its stored response.
* :class:`InProgress` — another attempt holds the key (after waiting, in wait mode).
* :class:`Reused`     — the key was used for a different request.
* :class:`Invalid`    — the key header is missing (when required) or malformed.

Store outages surface as :class:`~oncepay.errors.StoreUnavailable` and nothing is executed.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

from oncepay._drivers.frozen import quick_init
from oncepay.errors import (
    ClientError,
    ConfigurationError,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
)
from oncepay.idempotency.keys import parse_key
from oncepay.idempotency.records import (
    Claim,
    ClaimOutcome,
    Record,
    RecordState,
    StoredResponse,
    next_fence,
)
from oncepay.idempotency.stores.base import Store, TransactionalStore

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "DISABLED_ENV",
    "ClaimsInTransaction",
    "Decision",
    "Engine",
    "Execute",
    "InProgress",
    "Invalid",
    "Replay",
    "Reused",
    "Ticket",
    "disabled_by_environment",
]

# Stripe keeps keys for 24 hours; the IETF draft leaves it to the server. A day covers every
# realistic client retry schedule, including one resumed the next morning.
DEFAULT_TTL = 24 * 3600.0
# A lease must outlast the slowest honest request (the gateway's upstream timeout is 30 s) yet
# free a crashed worker's key soon: a minute does both.
DEFAULT_LEASE = 60.0
# What a 409 tells the client to wait: most first attempts finish within a second.
DEFAULT_RETRY_AFTER = 1.0
# A test suite's switch: set to 1/true/yes, the surfaces run every operation as if no key had
# been sent (the middleware reads it when built; see docs/middleware.md).
DISABLED_ENV = "ONCEPAY_IDEMPOTENCY_DISABLED"


def disabled_by_environment() -> bool:
    """Whether ``ONCEPAY_IDEMPOTENCY_DISABLED`` turns idempotency off (1, true, yes)."""
    return os.environ.get(DISABLED_ENV, "").strip().lower() in {"1", "true", "yes"}


@quick_init
@dataclass(frozen=True, slots=True)
class Ticket:
    """The right to execute one request, fenced: only the current token can finish it."""

    scope: str
    key: str
    fingerprint: str
    fence: int
    expires_at: float
    recovery_point: str | None = None
    resumed: bool = False
    late: bool = False  # the key's previous record had expired (Claim.late)


@quick_init
@dataclass(frozen=True, slots=True)
class Execute:
    ticket: Ticket

    @property
    def expires_at(self) -> float:
        return self.ticket.expires_at


@quick_init
@dataclass(frozen=True, slots=True)
class Replay:
    record: Record

    @property
    def response(self) -> StoredResponse:
        assert self.record.response is not None  # a completed record always has one
        return self.record.response

    @property
    def expires_at(self) -> float:
        return self.record.expires_at


@quick_init
@dataclass(frozen=True, slots=True)
class InProgress:
    record: Record
    retry_after: float

    @property
    def expires_at(self) -> float:
        return self.record.expires_at


@quick_init
@dataclass(frozen=True, slots=True)
class Reused:
    record: Record

    @property
    def expires_at(self) -> float:
        return self.record.expires_at


@quick_init
@dataclass(frozen=True, slots=True)
class Invalid:
    error: ClientError


Decision = Execute | Replay | InProgress | Reused | Invalid


@runtime_checkable
class ClaimsInTransaction(Protocol):
    """A store that can also claim a key seen for the first time inside a transaction the
    caller holds on the store's own database (the SQL stores): the claim then commits with the
    caller's first phase, or not at all. An optional capability, so a type, checked once."""

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
        """Insert an executing record with ``fence`` when the key has none; False (nothing
        written) when it has one, whatever its state: the caller then claims the usual way."""
        ...


class Engine:
    """Decides what to do with an idempotency-managed request, on any :class:`Store`."""

    def __init__(
        self,
        store: Store,
        *,
        ttl: float = DEFAULT_TTL,
        lease: float = DEFAULT_LEASE,
        wait: float = 0.0,
        retry_after: float = DEFAULT_RETRY_AFTER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        _check_times(ttl=ttl, lease=lease)
        if wait < 0:
            raise ConfigurationError(f"wait must be >= 0 seconds, not {wait}")
        # An optional capability (a type), checked once: without it the methods that need it
        # raise a clear ConfigurationError, never an AttributeError halfway through a request.
        self._transactional = store if isinstance(store, TransactionalStore) else None
        self._claims_in = store if isinstance(store, ClaimsInTransaction) else None
        self.store = store
        self.ttl = ttl
        self.lease = lease
        self.wait = wait
        self.retry_after = retry_after
        self.clock = clock

    @classmethod
    def for_store(
        cls,
        store: Store | str,
        *,
        ttl: float = DEFAULT_TTL,
        lease: float = DEFAULT_LEASE,
        wait: float = 0.0,
    ) -> Engine:
        """An engine over a store or a store URL (what the middleware and decorator take)."""
        from oncepay.idempotency.stores import store_from_url

        return cls(
            store_from_url(store) if isinstance(store, str) else store,
            ttl=ttl,
            lease=lease,
            wait=wait,
        )

    def parse(self, raw_key: str | None, *, required: bool = True) -> str | Invalid | None:
        """The key a header names; ``None`` when absent and optional; ``Invalid`` otherwise."""
        if raw_key is None:
            return Invalid(IdempotencyKeyMissing()) if required else None
        try:
            return parse_key(raw_key)
        except IdempotencyKeyInvalid as exc:
            return Invalid(exc)

    async def begin(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        ttl: float | None = None,
        wait: float | None = None,
    ) -> Decision:
        """Claim ``key`` for a request, or say why it must not run now."""
        ttl = self.ttl if ttl is None else ttl
        lease = self.lease
        if not 0 < lease < ttl:
            _check_times(ttl=ttl, lease=lease)
        # _claim spelled out: a coroutine less to create, and to pass through at the suspension
        now = self.clock()
        claim = await self.store.claim(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
        decision = self._decide(claim, scope, key, fingerprint, now)
        if not isinstance(decision, InProgress):
            return decision
        wait = self.wait if wait is None else wait
        if wait <= 0:
            return decision
        return await self._wait(scope, key, fingerprint, ttl, wait)

    async def decided(
        self, claim: Claim, scope: str, key: str, fingerprint: str, now: float, ttl: float
    ) -> Decision:
        """What :meth:`begin` decides once the store's claim, made at ``now`` with ``ttl``, is
        in: for a caller that sent the claim itself (the ASGI middleware's fast path)."""
        decision = self._decide(claim, scope, key, fingerprint, now)
        if isinstance(decision, InProgress) and self.wait > 0:
            return await self._wait(scope, key, fingerprint, ttl, self.wait)
        return decision

    @property
    def claims_in_transaction(self) -> bool:
        """Whether :meth:`aclaim_in` can be used (the store is a SQL store, not tiered)."""
        return self._claims_in is not None

    async def aclaim_in(
        self, conn: Any, scope: str, key: str, fingerprint: str, *, ttl: float | None = None
    ) -> Ticket | None:
        """Claim a key seen for the first time inside the caller's open transaction on the
        store's database (SQL stores; see :attr:`claims_in_transaction`): the ticket when no
        record existed, so the claim commits with the caller's writes or not at all; None,
        having written nothing, when the key has a record of any kind — then :meth:`begin`
        decides (a replay, a conflict, a takeover, a late retry) as it always does."""
        if self._claims_in is None:
            raise ConfigurationError(
                f"{type(self.store).__name__} cannot claim inside your transaction: use the "
                "SQLite or PostgreSQL store in the same database as your data"
            )
        ttl = self.ttl if ttl is None else ttl
        lease = self.lease
        if not 0 < lease < ttl:
            _check_times(ttl=ttl, lease=lease)
        now = self.clock()
        fence = next_fence(None, now)
        created = await self._claims_in.aclaim_in(
            conn, scope, key, fingerprint, fence=fence, now=now, lease=lease, ttl=ttl
        )
        if not created:
            return None
        return Ticket(scope, key, fingerprint, fence, now + ttl)

    async def complete(self, ticket: Ticket, response: StoredResponse) -> None:
        """Store the response; raises :class:`~oncepay.errors.LeaseLost` for a stale ticket."""
        await self.store.complete(
            ticket.scope, ticket.key, ticket.fence, response, now=self.clock()
        )

    def complete_in(self, conn: Any, ticket: Ticket, response: StoredResponse) -> None:
        """Complete inside the caller's open transaction on a sync connection (SQL stores),
        so the caller's writes and the stored response commit together or not at all."""
        self._in_transaction().complete_in(
            conn, ticket.scope, ticket.key, ticket.fence, response, now=self.clock()
        )

    async def acomplete_in(self, conn: Any, ticket: Ticket, response: StoredResponse) -> None:
        """:meth:`complete_in` for async connections (psycopg, asyncpg, SQLAlchemy async)."""
        await self._in_transaction().acomplete_in(
            conn, ticket.scope, ticket.key, ticket.fence, response, now=self.clock()
        )

    async def acheckpoint_in(
        self,
        conn: Any,
        ticket: Ticket,
        recovery_point: str,
        *,
        lease: float | None = None,
        keep_for: float = 0.0,
    ) -> Ticket:
        """:meth:`checkpoint` inside the caller's open transaction (SQL stores): the writes of
        a phase and the recovery point it reached commit together. ``lease`` overrides the
        renewed lease, e.g. a short one so that a retry soon takes over and resumes;
        ``keep_for`` keeps the record at least that many seconds from now, for a request that
        is still being driven to its end (its key must not lapse into "new" meanwhile)."""
        now = self.clock()
        await self._in_transaction().acheckpoint_in(
            conn,
            ticket.scope,
            ticket.key,
            ticket.fence,
            recovery_point,
            now=now,
            lease=self.lease if lease is None else lease,
            keep_until=now + keep_for if keep_for > 0 else 0.0,
        )
        return replace(ticket, recovery_point=recovery_point)

    def _in_transaction(self) -> TransactionalStore:
        if self._transactional is None:
            raise _not_transactional(self.store)
        return self._transactional

    async def release(self, ticket: Ticket) -> None:
        """Give the key up after a failure, so that a retry executes again."""
        await self.store.release(ticket.scope, ticket.key, ticket.fence, now=self.clock())

    async def checkpoint(self, ticket: Ticket, recovery_point: str) -> Ticket:
        """Record how far the request got and renew its lease."""
        await self.store.checkpoint(
            ticket.scope,
            ticket.key,
            ticket.fence,
            recovery_point,
            now=self.clock(),
            lease=self.lease,
        )
        return replace(ticket, recovery_point=recovery_point)

    async def _claim(self, scope: str, key: str, fingerprint: str, ttl: float) -> Decision:
        now = self.clock()
        claim = await self.store.claim(scope, key, fingerprint, now=now, lease=self.lease, ttl=ttl)
        return self._decide(claim, scope, key, fingerprint, now)

    def _decide(self, claim: Claim, scope: str, key: str, fingerprint: str, now: float) -> Decision:
        """The decision table's rows for what the store's atomic claim found."""
        record = claim.record
        if claim.claimed:
            # positional: keywords cost a third more on this per-request construction
            resumed = claim.outcome is ClaimOutcome.TAKEN_OVER
            return Execute(
                Ticket(
                    scope,
                    key,
                    fingerprint,
                    record.fence,
                    record.expires_at,
                    record.recovery_point,
                    resumed,
                    claim.late,
                )
            )
        if record.fingerprint != fingerprint:
            return Reused(record)
        if record.state is RecordState.COMPLETED:
            return Replay(record)
        return InProgress(record, retry_after=self._retry_after(record, now))

    async def _wait(
        self, scope: str, key: str, fingerprint: str, ttl: float, wait: float
    ) -> Decision:
        """Hold the request until the first attempt finishes, its lease lapses, or ``wait``
        runs out. The watch is opened before the record is read again, so a completion
        between the two reads still wakes us."""
        deadline = time.monotonic() + wait
        async with self.store.watch(scope, key) as watch:
            while True:
                decision = await self._claim(scope, key, fingerprint, ttl)
                remaining = deadline - time.monotonic()
                if not isinstance(decision, InProgress) or remaining <= 0:
                    return decision
                lease_left = decision.record.lease_expires_at - self.clock()
                await watch.wait(min(remaining, max(lease_left, 0.0)))

    def _retry_after(self, record: Record, now: float) -> float:
        lease_left = max(record.lease_expires_at - now, 0.0)
        return float(max(1, math.ceil(min(self.retry_after, lease_left))))


def _not_transactional(store: Store) -> ConfigurationError:
    return ConfigurationError(
        f"{type(store).__name__} cannot complete inside your transaction: use the SQLite or "
        "PostgreSQL store (or a TieredStore over one) in the same database as your data"
    )


def _check_times(*, ttl: float, lease: float) -> None:
    if not 0 < lease < ttl:
        raise ConfigurationError(
            f"need 0 < lease < ttl (got lease={lease}s, ttl={ttl}s): a record must not expire "
            "while its request still runs"
        )
