"""Remediation where it is safe, through the same idempotent command path as every operation.

Two actions are taken automatically, each keyed by what it acts on:

* **void_orphan** — an authorization approved at the acquirer that no payment of OncePay will
  ever capture (no payment, a failed or canceled one, or not the payment's own) holds a
  cardholder's money: it is voided under the reference ``{authorization reference}_orphan_void``
  by :class:`VoidOrphan`, an :class:`~oncepay.payments.phases.Operation`.
* **cancel_stale** — a payment still only authorized past the acquirer's validity window is
  canceled by the payments service's own :class:`~oncepay.payments.operations.Cancel` (its
  void is ``{payment}_void``): the payment, its ledger hold and its ``payment.canceled`` event
  move with it, as if the merchant had canceled it.

Each runs as a request of the idempotency engine under a derived key (scope
:data:`SCOPE` for voids, the payment's merchant for cancels) through the atomic phases: an
action row (phase 1), the acquirer call (its reference is the acquirer's idempotency key),
the answer recorded (phase 2). Two runs at once: one holds the key, the other is told it is in
progress and leaves it. A run that dies mid-void: the key stays locked with its recovery
point; once its lease lapses the recovery worker (or the next run) resumes it, and the
repeated call is answered by the acquirer from its record of the first. Either way the
acquirer voids once.

A run that would take more than ``cap`` actions not already taken takes none: that many at
once is an incident (a bug, a replayed batch), not routine, and one
``remediation_withheld`` discrepancy asks a person to look (:mod:`.pipeline`)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.errors import OncePayError
from oncepay.idempotency.engine import Execute, Replay, Ticket
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.operations import Cancel
from oncepay.payments.phases import Operation, Started, run
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.reconciliation.records import Authorization, Kind
from oncepay.reconciliation.store import actions, insert_new, resolve_in
from oncepay.storage.db import Database, read, write

__all__ = [
    "CANCEL_STALE",
    "DEFAULT_ACTION_CAP",
    "ORPHAN_VOID",
    "SCOPE",
    "VOID_ORPHAN",
    "Action",
    "VoidOrphan",
    "canceled_as_stale",
    "finished",
    "take",
    "unfinished",
    "void_reference",
]

# Orphans are rare (a crash between the acquirer's approval and OncePay's commit, with the
# payment then failed over or abandoned); fifty in one run is already an incident.
DEFAULT_ACTION_CAP = 50
# The idempotency scope of reconciliation's own requests (merchants' scopes are their ids).
SCOPE = "oncepay-reconciliation"
VOID_ORPHAN = "void_orphan"
ORPHAN_VOID = "orphan_void"  # the operation's name in recovery points
CANCEL_STALE = "cancel_stale"
# Seconds before an unanswered void is asked again (the key's short lease): the acquirer's
# look-up answers it once it is reachable; the recovery worker or the next run resumes it.
UNKNOWN_RETRY = 30.0


@dataclass(frozen=True, slots=True)
class Action:
    """One remediation a run would take."""

    kind: str  # void_orphan | cancel_stale
    acquirer: str
    reference: str  # the discrepancy's: the authorization's reference
    authorization_id: str  # the acquirer's id (cancel: the payment's authorization)
    payment_id: str | None
    merchant_id: str | None = None  # cancel_stale: the payment's merchant (its key's scope)

    @property
    def id(self) -> str:
        digest = hashlib.sha256(f"{self.kind}|{self.acquirer}|{self.authorization_id}".encode())
        return "act_" + digest.hexdigest()[:24]

    @property
    def action_reference(self) -> str:
        if self.kind == VOID_ORPHAN:
            return f"{self.reference}_orphan_void"
        return f"{self.payment_id}_void"

    @property
    def discrepancy_kind(self) -> Kind:
        return Kind.ORPHANED_AUTHORIZATION if self.kind == VOID_ORPHAN else Kind.STALE_AUTHORIZATION


def void_reference(auth: Authorization) -> str:
    """The void's idempotency key at the acquirer: one per authorization, never a payment's own
    ``{payment}_void`` (that payment may be canceled on its own)."""
    return f"{auth.reference}_orphan_void"


async def finished(db: Database, planned: Sequence[Action]) -> dict[str, str]:
    """action id -> status (done, refused) of the planned actions an earlier run finished."""
    ids = sorted({action.id for action in planned})
    found: dict[str, str] = {}
    async with read(db) as conn:
        for start in range(0, len(ids), 500):
            query = select(actions.c.id, actions.c.status).where(
                actions.c.id.in_(ids[start : start + 500]), actions.c.status != "pending"
            )
            found.update((aid, status) for aid, status in (await conn.execute(query)).all())
    return found


async def voided_by_us(db: Database, acquirer: str, authorization_ids: Sequence[str]) -> set[str]:
    """The authorizations among these that reconciliation itself voided, or set out to (so that
    a re-run of the day still sees them, finds the same orphans, and finishes a void a dead
    run left unrecorded)."""
    wanted = sorted(set(authorization_ids))
    found: set[str] = set()
    async with read(db) as conn:
        for start in range(0, len(wanted), 500):
            query = select(
                actions.c.authorization_id
            ).where(
                actions.c.acquirer == acquirer,
                actions.c.kind == VOID_ORPHAN,  # done, or pending: a run died mid-void
                actions.c.authorization_id.in_(wanted[start : start + 500]),
            )
            found.update((await conn.execute(query)).scalars())
    return found


async def unfinished(db: Database, acquirer: str) -> list[Action]:
    """Actions of ``acquirer`` still pending: a run died, or another holds them, or the
    acquirer's answer was unknown. Every run takes them again (harmless: each is keyed)."""
    async with read(db) as conn:
        rows = (
            await conn.execute(
                select(actions)
                .where(actions.c.acquirer == acquirer, actions.c.status == "pending")
                .order_by(actions.c.id)
            )
        ).mappings()
        return [
            Action(
                row["kind"],
                row["acquirer"],
                row["reference"],
                row["authorization_id"],
                row["payment_id"],
                row["merchant_id"],
            )
            for row in rows
        ]


async def canceled_as_stale(db: Database, acquirer: str, since: float) -> list[str]:
    """Payments reconciliation canceled (or is canceling) as stale at ``acquirer`` by runs
    since ``since``: a re-run of their day must find them stale again, as the first run did."""
    query = select(actions.c.payment_id).where(
        actions.c.acquirer == acquirer,
        actions.c.kind == CANCEL_STALE,
        actions.c.created_at >= since,
    )
    async with read(db) as conn:
        return [str(pid) for pid in (await conn.execute(query)).scalars()]


async def take(svc: Services, action: Action, run_id: str) -> str:
    """Take ``action`` once: ``done``, ``refused`` (the acquirer said no, or the payment moved
    on), ``in_progress`` (another run holds it, or the acquirer's answer is not known yet: it
    is resumed later) — the status it has after this call."""
    earlier = await _plan(svc, action, run_id)
    if earlier != "pending":  # an earlier run finished it: only its discrepancy may be open
        await _finish(svc, action, earlier)
        return earlier
    scope = SCOPE if action.kind == VOID_ORPHAN else str(action.merchant_id)
    key = f"{action.kind}:{action.acquirer}:{action.authorization_id}"
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    decision = await svc.engine.begin(scope, key, fingerprint)
    if isinstance(decision, Replay):
        status = _status_of(decision.response.status)
    elif isinstance(decision, Execute):
        reply = await run(svc, decision.ticket, _operation(action), scope)
        status = _status_of(reply.status)
    else:
        return "in_progress"
    if status != "in_progress":
        await _finish(svc, action, status)
    return status


def _status_of(http_status: int) -> str:
    if http_status == 200:
        return "done"
    return "in_progress" if http_status >= 500 else "refused"


def _operation(action: Action) -> Operation:
    if action.kind == VOID_ORPHAN:
        return VoidOrphan(action.id)
    return Cancel(payment_id=str(action.payment_id))


async def _plan(svc: Services, action: Action, run_id: str) -> str:
    """The action's row, written if new; its status."""
    now = time.time()
    row = {
        "id": action.id,
        "acquirer": action.acquirer,
        "kind": action.kind,
        "reference": action.reference,
        "authorization_id": action.authorization_id,
        "payment_id": action.payment_id,
        "merchant_id": action.merchant_id,
        "action_reference": action.action_reference,
        "status": "pending",
        "detail": None,
        "run_id": run_id,
        "created_at": now,
        "updated_at": now,
    }
    async with write(svc.db) as conn:
        await conn.execute(insert_new(svc.db, actions, ["id"]), [row])
        return str((await _action_row(conn, action.id))["status"])


async def _finish(svc: Services, action: Action, status: str) -> None:
    """Mark the action, and resolve its discrepancy when it was done: the note says how."""
    now = time.time()
    async with write(svc.db) as conn:
        await conn.execute(
            update(actions)
            .where(actions.c.id == action.id, actions.c.status == "pending")
            .values(status=status, updated_at=now)
        )
        if status == "done":
            what = (
                "voided" if action.kind == VOID_ORPHAN else "payment canceled, authorization voided"
            )
            note = f"{what} at the acquirer by reconciliation (reference {action.action_reference})"
            kind = action.discrepancy_kind.value
            await resolve_in(conn, action.acquirer, kind, action.reference, note, now)


@dataclass(frozen=True, slots=True)
class VoidOrphan:
    """The void of an orphaned authorization, as an operation of the atomic phases: its object
    is the action row (``act_…``), which names the acquirer, the authorization and the void's
    reference, so the recovery worker rebuilds it from the recovery point alone."""

    action_id: str
    name: str = ORPHAN_VOID
    created: str = "orphan_void_started"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        await _action_row(conn, self.action_id)  # written by the run before the key's claim
        return Started(self.action_id)

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        async with read(svc.db) as conn:
            row = await _action_row(conn, object_id)
        return await svc.acquirers[row["acquirer"]].void(
            reference=row["action_reference"], authorization_id=row["authorization_id"]
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        status = "done" if answer.outcome is Outcome.APPROVED else "refused"
        detail = answer.decline_code or answer.outcome.value
        await conn.execute(
            update(actions)
            .where(actions.c.id == object_id)
            .values(status=status, detail=detail, updated_at=time.time())
        )
        return await self.reply(conn, svc, object_id)  # the answer stored with the record

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        await conn.execute(
            update(actions)
            .where(actions.c.id == object_id)
            .values(detail=f"unknown: {answer.detail or 'no answer'}", updated_at=time.time())
        )
        return UNKNOWN_RETRY

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        row = await _action_row(conn, object_id)
        body = {"id": object_id, "object": "reconciliation.action", **_public(row)}
        return Reply.json(200 if row["status"] == "done" else 402, body)


async def _action_row(conn: AsyncConnection, action_id: str) -> dict[str, Any]:
    row = (await conn.execute(select(actions).where(actions.c.id == action_id))).mappings().first()
    if row is None:
        raise OncePayError(f"no reconciliation action {action_id}")
    return dict(row)


def _public(row: dict[str, Any]) -> dict[str, Any]:
    names = ("kind", "acquirer", "authorization_id", "action_reference", "status", "detail")
    return {name: row[name] for name in names}
