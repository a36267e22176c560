"""SPEC §2 around one request of a merchant: the gate decides (replay, conflict, or run); a
run goes through the atomic phases (:mod:`oncepay.payments.phases`) and a fast tier, if any,
learns of the completion."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.http.gate import Claimable, Passthrough, Request, Respond, Run
from oncepay.idempotency.engine import Execute, Ticket
from oncepay.idempotency.stores.tiered import TieredStore
from oncepay.payments import tracing
from oncepay.payments.context import Services
from oncepay.payments.metrics import (
    IDEMPOTENCY_DECISIONS,
    IDEMPOTENCY_LATE_RETRIES,
    IDEMPOTENCY_ROUTE_DECISIONS,
    KEY_SECONDS,
    labelled,
)
from oncepay.payments.phases import Operation, run, run_claiming, run_local
from oncepay.payments.records import Merchant
from oncepay.payments.reply import Reply

__all__ = ["gated", "idempotent", "idempotent_local", "resume"]

Work = Callable[[AsyncConnection], Awaitable[Reply]]


async def idempotent(
    svc: Services, request: Request, body: bytes, merchant: Merchant, op: Operation
) -> Reply:
    """One money-moving request, scoped to the merchant; a resumed key continues from its
    recovery point (SPEC §5). A key seen for the first time is claimed inside phase 1, which
    commits with it (SQL stores without a Redis tier); any other key goes through the gate's
    own claim first."""

    def execute(ticket: Ticket) -> Awaitable[Reply]:
        return run(svc, ticket, op, merchant.id)

    if not svc.engine.claims_in_transaction:
        return await gated(svc, request, body, merchant, execute)
    prepared = svc.gate.prepare(request, body, scope=merchant.id)
    if not isinstance(prepared, Claimable):  # no key, an invalid one: answered as read
        return await _answered(svc, request, prepared, execute)
    claimed = await _claiming(svc, request, prepared, op, merchant.id)
    if claimed is not None:
        return claimed
    # The key has a record (or phase 1 asked for a retry): the gate claims what it read.
    return await _answered(svc, request, await svc.gate.claim(request, prepared), execute)


async def _claiming(
    svc: Services, request: Request, claimable: Claimable, op: Operation, merchant_id: str
) -> Reply | None:
    """The claim in phase 1's transaction (phases.run_claiming); None when the key has a
    record or phase 1 refused the request, with nothing written: the gate decides then."""
    runs: list[Run] = []

    def claimed(ticket: Ticket) -> None:  # phase 1 committed: counted as the gate's Execute
        runs.append(svc.gate.claimed(claimable, ticket))
        _executing(request, ticket)

    outcome = await run_claiming(svc, claimable, op, merchant_id, claimed)
    if outcome is None:
        return None
    ticket, reply = outcome
    if ticket is None:  # phase 1 failed, committed or not: nothing more to count
        return reply
    return await _finished(svc, request, runs[0], reply)


async def idempotent_local(
    svc: Services, request: Request, body: bytes, merchant: Merchant, work: Work
) -> Reply:
    """A request that is one local transaction (no acquirer call)."""
    return await gated(svc, request, body, merchant, lambda t: run_local(svc, t, work))


async def gated(
    svc: Services,
    request: Request,
    body: bytes,
    merchant: Merchant,
    execute: Callable[[Ticket], Awaitable[Reply]],
) -> Reply:
    """Any request under the gate's own claim and decision, scoped to ``merchant``:
    ``execute`` runs with the ticket when the key is to be executed (new, or resumed); a
    replay, a conflict or an invalid key is answered without it. Counted, traced and
    remembered as every payments request is (the operator API's keyed routes use it too)."""
    outcome = await svc.gate.decide(request, body, scope=merchant.id)
    return await _answered(svc, request, outcome, execute)


async def _answered(
    svc: Services,
    request: Request,
    outcome: Passthrough | Respond | Run,
    execute: Callable[[Ticket], Awaitable[Reply]],
) -> Reply:
    """The gate's decision carried out: its answer, or ``execute`` run with the ticket."""
    if isinstance(outcome, Respond):
        # A label as the key-usage log writes routes; never the path itself (ids in it).
        route = f"{request.method} {request.template}" if request.template else "-"
        decision = _decision(outcome)
        labelled(IDEMPOTENCY_DECISIONS, decision).inc()
        name = _NAMES[decision]
        labelled(IDEMPOTENCY_ROUTE_DECISIONS, name, route).inc()
        if tracing.ENABLED:
            tracing.decided(
                name,
                method=request.method,
                route=request.template,
                key=request.header("idempotency-key"),
            )
        # The record was read, perhaps committed by another request whose sync is still under
        # way (SQLite group commit): answer it only once it is on disk. Free otherwise.
        await svc.db.durable()
        # A stored response may carry its execution's trace (tracing.TRACE_HEADER): never sent.
        return Reply(outcome.status, outcome.body, tracing.replayed(outcome.headers), decision=name)
    assert isinstance(outcome, Run)  # keys are required: never a pass-through
    _executing(request, outcome.ticket)
    return await _finished(svc, request, outcome, await execute(outcome.ticket))


def _executing(request: Request, ticket: Ticket) -> None:
    """A key to be executed (new, resumed, or late), counted and traced."""
    route = f"{request.method} {request.template}" if request.template else "-"
    labelled(IDEMPOTENCY_DECISIONS, "resume" if ticket.resumed else "execute").inc()
    labelled(IDEMPOTENCY_ROUTE_DECISIONS, "executed", route).inc()
    if ticket.late:  # its record had expired: SPEC §9's late retry
        labelled(IDEMPOTENCY_LATE_RETRIES, route).inc()
    if tracing.ENABLED:
        tracing.decided(
            "executed",
            method=request.method,
            route=request.template,
            key=ticket.key,
            fence=ticket.fence,
            resumed=ticket.resumed,
        )


async def _finished(svc: Services, request: Request, outcome: Run, reply: Reply) -> Reply:
    """The answer of a request that ran, counted and remembered."""
    ticket = outcome.ticket
    if reply.completed:  # stored under its key until it expires
        KEY_SECONDS.inc(max(0.0, ticket.expires_at - svc.engine.clock()))
    svc.gate.executed(request, outcome, reply.status)  # the key-usage log, if any
    await _remember(svc, ticket, reply)
    if not reply.completed:  # not stored: the key was released, or waits to be resumed
        return Reply(reply.status, reply.body, reply.headers, decision="executed")
    expires = ("idempotency-key-expires", outcome.expires)
    return Reply(reply.status, reply.body, (*reply.headers, expires), decision="executed")


async def resume(
    svc: Services, scope: str, key: str, fingerprint: str, op: Operation
) -> Reply | None:
    """Take over an abandoned request and finish it (the recovery worker); None when
    someone else holds or finished it."""
    decision = await svc.engine.begin(scope, key, fingerprint)
    if not isinstance(decision, Execute):
        return None
    reply = await run(svc, decision.ticket, op, scope)
    await _remember(svc, decision.ticket, reply)
    return reply


async def _remember(svc: Services, ticket: Ticket, reply: Reply) -> None:
    """With a fast tier, tell it about a completion that has committed."""
    store = svc.engine.store
    if reply.completed and isinstance(store, TieredStore):
        stored = tracing.stored(reply)
        await store.remember(ticket.scope, ticket.key, stored, now=svc.engine.clock())


# The metric's labels (kept as they were) by SPEC §9's decision names.
_NAMES = {
    "replay": "replayed",
    "invalid": "invalid",
    "missing": "missing",
    "in_progress": "in_progress",
    "reused": "reused",
    "unavailable": "unavailable",
    "rejected": "rejected",
}


def _decision(outcome: Respond) -> str:
    if any(name == "idempotent-replayed" for name, _ in outcome.headers):
        return "replay"
    if outcome.status == 400:  # SPEC §9 tells a missing key from a malformed one
        return "missing" if b'"idempotency_key_missing"' in outcome.body else "invalid"
    return {409: "in_progress", 422: "reused", 503: "unavailable"}.get(outcome.status, "rejected")
