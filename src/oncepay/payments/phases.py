"""Requests as atomic phases (SPEC §5; Brandur Leach's rocket-rides-atomic).

Every request that moves money runs as two local transactions, one on each side of the
acquirer call, each of which also advances the idempotency record in the same database:

    started ──phase 1──▶ <op>_created ──acquirer call──▶ ──phase 2──▶ finished
    (claim)    write the      (a key derived from        record its answer (state,
               object          the object)               ledger, events) and store the
                                                         response, completing the key

A key seen for the first time is claimed inside phase 1's own transaction
(:func:`run_claiming`): the claim, the object and the recovery point commit together, or
nothing does and a retry runs the request afresh. A key with a record is claimed by the gate
first (a transaction of its own), then :func:`run` goes on from its recovery point.

SPEC §5 lets neighbouring phases with no outside call between them commit as one: recording
the acquirer's answer and storing the response used to be two transactions with the recovery
point ``acquirer_called`` between them; they are one now, so a crash anywhere after the
acquirer answered rolls back to ``<op>_created`` and the next holder asks the acquirer again
(the call is harmless to repeat) before recording. A record an earlier version left at
``acquirer_called`` still resumes: it only needs its response stored.

A recovery point reads ``<point>:<operation>:<object id>``. Whoever holds the key next — a
retry of the same request, or the recovery worker once the lease lapsed — calls :func:`run`
with the record's recovery point and continues from there; a phase that committed is never
repeated, and the acquirer call, the only step outside a transaction, is harmless to repeat.

Rules that keep money moving exactly once:

* A key is released (so that a retry starts afresh) only while nothing has committed yet.
  After phase 1, the key stays locked until the request finishes; a failure leaves it to be
  resumed when its lease lapses.
* A client error in phase 1 rolls the phase back and is stored as the answer; a retryable one
  (the payment is busy, or its outcome unknown) releases the key instead.
* Phase 2 is fenced before it writes anything (the record's recovery point moves to
  ``finished`` in the same transaction, which completes the record): a holder that lost its
  lease changes nothing.
* An unknown acquirer answer keeps the record executing with a short lease — the back-off
  schedule of recovery — and answers 503 ``acquirer_outcome_unknown``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, NamedTuple, Protocol, cast

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.errors import ClientError, LeaseLost, OncePayError, RetryableError
from oncepay.http.gate import Claimable
from oncepay.idempotency.engine import Ticket
from oncepay.payments import tracing
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.errors import AcquirerOutcomeUnknown, DatabaseUnavailable
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.storage.db import write
from oncepay.storage.raw import DRIVER_ERRORS, raw

__all__ = [
    "ACQUIRER_CALLED",
    "FINISHED",
    "Operation",
    "Started",
    "parse_point",
    "run",
    "run_claiming",
    "run_local",
]

log = logging.getLogger("oncepay.payments")

# Phase 2 of earlier versions committed here, before storing the response. Now phase 2 passes
# it in the transaction that completes the record (a completed record shows it, as before), so
# an executing record is left here only by an earlier version: still resumed from.
ACQUIRER_CALLED = "acquirer_called"
# Where a completed record stands (SPEC §5's last point): phase 2 moves the record here in the
# transaction that completes it. Records completed by earlier versions show ACQUIRER_CALLED.
FINISHED = "finished"


class Started(NamedTuple):
    """What phase 1 wrote: the object's id and, when the operation is on a payment, the
    payment row as phase 1 left it (so the acquirer call needs not read it again)."""

    object_id: str
    payment: PaymentRow | None = None


class Operation(Protocol):
    """One kind of money-moving request. ``name`` goes into recovery points."""

    @property
    def name(self) -> str:
        """The operation's name in recovery points: create, capture, cancel, refund."""
        ...

    @property
    def created(self) -> str:
        """The recovery point phase 1 reaches, e.g. ``payment_created``."""
        ...

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        """Phase 1: validate against the current state and write the object."""
        ...

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        """The acquirer call, outside any transaction; must be harmless to repeat.
        ``ticket.resumed`` says an earlier holder may have called already. ``payment`` is
        the row phase 1 wrote in this same request (None when resumed: read it)."""
        ...

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        """Phase 2: apply a final answer (state, ledger, events); the answer to store, made
        from the rows just written (the transaction then completes the record with it)."""
        ...

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        """The answer is unknown: note it; return seconds until recovery asks again."""
        ...

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        """The answer of a request resumed at ``acquirer_called`` (phase 2 of an earlier
        version committed, its response not yet stored), read in the transaction that
        completes the record."""
        ...


def point(name: str, op: Operation, object_id: str) -> str:
    return f"{name}:{op.name}:{object_id}"


def parse_point(recovery_point: str | None) -> tuple[str, str, str] | None:
    """(point, operation, object id) of a recovery point, or None before phase 1."""
    if not recovery_point:
        return None
    name, _, rest = recovery_point.partition(":")
    op_name, _, object_id = rest.partition(":")
    return name, op_name, object_id


async def run(svc: Services, ticket: Ticket, op: Operation, merchant_id: str) -> Reply:
    """Drive one request from its recovery point to the end; never raises for a request."""
    try:
        return await _run(svc, ticket, op, merchant_id)
    except LeaseLost as exc:
        return Reply.problem(exc)  # a newer attempt holds the key; it will answer
    except Exception as exc:
        log.exception("request %r failed between phases; the key stays locked", ticket.key)
        return Reply.problem(_as_problem(exc))


def _as_problem(exc: Exception) -> OncePayError:
    """What a client is told when a request failed midway (its key stays locked, to be
    resumed): the database going away is a 503 to retry; anything else a 500."""
    if isinstance(exc, OncePayError):
        return exc
    # The driver's own errors too: the idempotency store's statements in a phase raise them
    # untranslated (on PostgreSQL with the phase's deferred writes riding on them).
    if isinstance(exc, (SQLAlchemyError, OSError, *DRIVER_ERRORS)):
        return DatabaseUnavailable(
            "the database failed midway; retry with the same Idempotency-Key to resume"
        )
    return OncePayError("the request failed; retry with the same Idempotency-Key to resume it")


async def _run(svc: Services, ticket: Ticket, op: Operation, merchant_id: str) -> Reply:
    parsed = parse_point(ticket.recovery_point)
    payment = None
    if parsed is None:
        with tracing.phase("start", op.name):
            started = await _start(svc, ticket, op, merchant_id)
        if isinstance(started, Reply):
            return started
        ticket, (object_id, payment) = started
        stage = op.created
    else:
        stage, _, object_id = parsed
    return await _onwards(svc, ticket, op, stage, object_id, payment)


async def run_claiming(
    svc: Services,
    claimable: Claimable,
    op: Operation,
    merchant_id: str,
    claimed: Callable[[Ticket], None],
) -> tuple[Ticket | None, Reply] | None:
    """A request whose key the gate has not claimed: the claim and phase 1 commit as one
    transaction (SPEC §5 lets neighbouring phases with no outside call between them), then
    the request goes on as :func:`run` does. ``claimed`` is told of the ticket once that
    transaction committed, before the acquirer call. The ticket is None when phase 1 failed
    otherwise (the database, say): whether it committed is not known.

    None, with nothing written, when the key has a record of any kind (a replay, a request in
    progress, a fingerprint mismatch, a takeover, a late retry: the gate's own claim decides
    those) or phase 1 failed with a retryable error: the caller then goes the usual way, the
    gate claiming on its own. A client error in phase 1 is stored as the answer, the key
    claimed and completed in one transaction. A crash
    before the commit leaves nothing at all, so a retry runs the request afresh; after it, the
    record is at ``<op>_created`` and resumes like any other."""
    try:
        with tracing.phase("start", op.name):
            # None: the key has a record, nothing was written. Not an exception: a replay is
            # the usual answer to a retry, not an error in its trace.
            started = await _claim_and_start(svc, claimable, op, merchant_id)
    except RetryableError:
        return None
    except ClientError as exc:
        # Refused as the state stood in phase 1: that answer is stored under the key (claimed
        # and completed in one transaction), as when the gate had claimed first. Running phase
        # 1 again later could give another answer (the state moves on meanwhile).
        reply = Reply.problem(exc)
        answered = await _claim_answered(svc, claimable, reply)
        if answered is None:
            return None
        claimed(answered)
        return answered, replace(reply, completed=True)
    except Exception as exc:
        # Whether the commit happened is not known (its acknowledgement may be lost): if it
        # did, the record resumes once its lease lapses; if not, there is no record at all.
        log.exception("request %r failed in its first phase", claimable.key)
        return None, Reply.problem(_as_problem(exc))
    if started is None:
        return None
    ticket, (object_id, payment) = started
    claimed(ticket)
    try:
        reply = await _onwards(svc, ticket, op, op.created, object_id, payment)
    except LeaseLost as exc:
        reply = Reply.problem(exc)
    except Exception as exc:
        log.exception("request %r failed between phases; the key stays locked", ticket.key)
        reply = Reply.problem(_as_problem(exc))
    return ticket, reply


async def _claim_and_start(
    svc: Services, claimable: Claimable, op: Operation, merchant_id: str
) -> tuple[Ticket, Started] | None:
    """The claim and phase 1, one transaction; None, nothing written, when the key has a
    record."""
    engine = svc.engine
    # A new payment: one statement, no transaction, where the process takes it
    # (operations/onestatement.py); False elsewhere, and for every other operation.
    at_once = getattr(op, "claim_and_start", None)
    if at_once is not None:
        started = await at_once(svc, claimable, merchant_id)
        if started is None:
            return None
        if started is not False:
            return cast(tuple[Ticket, Started], started)
    async with write(svc.db) as conn:
        record = await _driver(conn)
        tenant, key, fp = claimable.tenant, claimable.key, claimable.fingerprint
        ticket = await engine.aclaim_in(record, tenant, key, fp, ttl=claimable.ttl)
        if ticket is None:
            return None  # nothing written: the transaction ends empty
        started = await op.start(conn, svc, merchant_id)
        at = point(op.created, op, started.object_id)
        return await engine.acheckpoint_in(record, ticket, at), started


async def _claim_answered(svc: Services, claimable: Claimable, reply: Reply) -> Ticket | None:
    """Claim a new key and store ``reply`` under it, one transaction; None when the key has
    a record by now (nothing written: the gate decides)."""
    engine = svc.engine
    async with write(svc.db) as conn:
        record = await _driver(conn)
        tenant, key, fp = claimable.tenant, claimable.key, claimable.fingerprint
        ticket = await engine.aclaim_in(record, tenant, key, fp, ttl=claimable.ttl)
        if ticket is not None:
            await engine.acomplete_in(record, ticket, tracing.stored(reply))
    return ticket


async def _onwards(
    svc: Services,
    ticket: Ticket,
    op: Operation,
    stage: str,
    object_id: str,
    payment: PaymentRow | None,
) -> Reply:
    """The request from the recovery point ``stage`` (phase 1 done) to the end."""
    engine = svc.engine
    if stage == op.created:
        with tracing.phase("acquirer", op.name, object_id):
            answer = await op.call(svc, object_id, ticket, payment)
        if answer.outcome is Outcome.UNKNOWN:
            with tracing.phase("unknown", op.name, object_id):
                async with write(svc.db) as conn:
                    # Fenced first, so a holder that lost its lease changes nothing; the record
                    # is kept alive (past its TTL if need be) while recovery still asks.
                    at, keep = point(op.created, op, object_id), svc.settings.unfinished_retention
                    ticket = await engine.acheckpoint_in(conn, ticket, at, keep_for=keep)
                    retry_after = await op.unknown(conn, svc, object_id, answer)
                    await engine.acheckpoint_in(conn, ticket, at, lease=retry_after, keep_for=keep)
            return Reply.problem(
                AcquirerOutcomeUnknown(
                    f"the acquirer's answer is not known yet ({answer.detail or 'no answer'}); "
                    "retry with the same Idempotency-Key: it will ask the acquirer first",
                    retry_after=retry_after,
                )
            )
        with tracing.phase("record", op.name, object_id):
            # Phase 2 of a new payment whose phase 1 ran in this request: one statement where
            # the process takes it; None when it wrote nothing (the record or the payment moved
            # on), False where it is not taken: the transaction below decides then.
            at_once = getattr(op, "record_at_once", None)
            if at_once is not None and payment is not None:
                reply = await at_once(svc, ticket, payment, answer)
                if isinstance(reply, Reply):
                    return replace(reply, completed=True)
            async with write(svc.db) as conn:
                # Fenced before any write: a holder that lost its lease (the worker may have
                # finished the request meanwhile) changes nothing and is told to retry.
                at, record = point(FINISHED, op, object_id), await _driver(conn)
                ticket = await engine.acheckpoint_in(record, ticket, at)
                reply = await op.record(conn, svc, object_id, answer)
                with tracing.phase("finish", op.name, object_id):
                    await engine.acomplete_in(record, ticket, tracing.stored(reply))
        return replace(reply, completed=True)
    # Left at acquirer_called by an earlier version: its answer is recorded, not yet stored.
    with tracing.phase("finish", op.name, object_id):
        async with write(svc.db) as conn:
            reply = await op.reply(conn, svc, object_id)
            await engine.acomplete_in(await _driver(conn), ticket, tracing.stored(reply))
    return replace(reply, completed=True)


async def _start(
    svc: Services, ticket: Ticket, op: Operation, merchant_id: str
) -> tuple[Ticket, Started] | Reply:
    """Phase 1. A client error is stored as the answer; a retryable one frees the key."""
    try:
        async with write(svc.db) as conn:
            started = await op.start(conn, svc, merchant_id)
            at = point(op.created, op, started.object_id)
            return await svc.engine.acheckpoint_in(await _driver(conn), ticket, at), started
    except ClientError as exc:
        reply = Reply.problem(exc)
        await svc.engine.complete(ticket, tracing.stored(reply))
        return replace(reply, completed=True)
    except RetryableError as exc:
        if not isinstance(exc, LeaseLost):
            await svc.engine.release(ticket)
        return Reply.problem(exc)
    # Any other failure — the commit itself included, whose acknowledgement may be lost after
    # it happened — leaves the key locked: once its lease lapses, the next holder resumes from
    # the recovery point if phase 1 committed, and starts afresh if it did not. Releasing here
    # could start a second payment beside a committed first one.


async def _driver(conn: AsyncConnection) -> Any:
    """The connection the record's statements take under ``conn``: they skip SQLAlchemy
    (storage/raw.py), in the same transaction, and on PostgreSQL carry the writes pending."""
    return (await raw(conn)).store


async def run_local(
    svc: Services, ticket: Ticket, work: Callable[[AsyncConnection], Awaitable[Reply]]
) -> Reply:
    """A request with no acquirer call (webhook endpoints, say): one transaction that does the
    work and completes the record, so the change and its stored answer commit together."""
    try:
        with tracing.phase("local", "local"):
            async with write(svc.db) as conn:
                reply = await work(conn)
                await svc.engine.acomplete_in(conn, ticket, tracing.stored(reply))
        return replace(reply, completed=True)
    except ClientError as exc:
        reply = Reply.problem(exc)
        await svc.engine.complete(ticket, tracing.stored(reply))
        return replace(reply, completed=True)
    except LeaseLost as exc:
        return Reply.problem(exc)
    except RetryableError as exc:
        await _release_quietly(svc, ticket)
        return Reply.problem(exc)
    # Any other failure leaves the key locked until its lease lapses (see _start).


async def _release_quietly(svc: Services, ticket: Ticket) -> None:
    try:
        await svc.engine.release(ticket)
    except OncePayError as exc:
        log.warning("could not release key %r: %s", ticket.key, exc.detail)
