"""Create a payment: authorize it on some acquirer (failing over when that is proven safe),
and capture it too when its ``capture_method`` is ``automatic``. The authorization's reference
is ``{payment}_a{attempt}``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.http.gate import Claimable
from oncepay.idempotency.engine import Ticket
from oncepay.payments import failover, ledger
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.models import PaymentCreate, payment_public
from oncepay.payments.operations import onestatement
from oncepay.payments.operations.common import (
    PAYMENTS,
    OnPayment,
    capture_in_ledger,
    load_payment,
    payment_event,
    payment_reply,
    post_to_ledger,
    read_payment,
    resolve,
)
from oncepay.payments.phases import Started
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.payments.states import PaymentStatus, Transition
from oncepay.payments.storage.schema import payments
from oncepay.payments.webhooks.outbox import ENDPOINTS_ALONGSIDE, keep_endpoints
from oncepay.storage.db import write
from oncepay.storage.ids import new_id
from oncepay.storage.raw import Sql, raw

__all__ = ["CreatePayment"]

S, T = PaymentStatus, Transition

# The columns a new payment sets; the rest keep their defaults (migration 4's server
# defaults, NULLs). One statement: the row comes back with RETURNING.
_INSERT = Sql(
    "INSERT INTO payments (id, merchant_id, amount, currency, payment_method, capture_method, "
    "description, metadata, status, amount_captured, amount_refunded, acquirer, attempt, "
    "outcome_unknown, recovery_attempts, escalated, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0, 0, $10, 1, FALSE, 0, FALSE, $11, $11) "
    f"RETURNING {PAYMENTS.columns}"
)
# PostgreSQL: the merchant's webhook endpoints come back with the new row, for the
# ``payment.created`` event's fan-out (webhooks/outbox.py), not in a round trip of their own.
_INSERT_WITH_ENDPOINTS = Sql(f"{_INSERT.postgresql}, {ENDPOINTS_ALONGSIDE.format(merchant='$2')}")


@dataclass(frozen=True, slots=True)
class CreatePayment(OnPayment):
    params: PaymentCreate | None = None  # None when the recovery worker resumes
    name: str = "create"
    created: str = "payment_created"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        assert self.params is not None  # phase 1 runs only for a client's request
        p, now = self.params, time.time()
        payment_id = new_id("pay")
        db = await raw(conn)
        endpoints = conn.dialect.name == "postgresql"
        row = await db.rows(
            _INSERT_WITH_ENDPOINTS if endpoints else _INSERT,
            payment_id,
            merchant_id,
            p.amount,
            p.currency,
            p.payment_method,
            p.capture_method,
            p.description,
            json.dumps(p.metadata),
            S.PROCESSING.value,
            svc.acquirers.choose().name,
            now,
        )
        if endpoints:
            payment = PAYMENTS.make(*row[0][:-1])
            keep_endpoints(conn, merchant_id, row[0][-1])
        else:
            payment = PAYMENTS.one(row[0], integers_as_booleans=db.integers_as_booleans)
        await payment_event(conn, payment, "payment.created")
        return Started(payment_id, payment)

    async def claim_and_start(
        self, svc: Services, claimable: Claimable, merchant_id: str
    ) -> tuple[Ticket, Started] | Literal[False] | None:
        """The claim and phase 1 as one statement where this process takes it
        (:mod:`.onestatement`): None when the key has a record; False where it does
        not (phases.py then claims and starts in a transaction)."""
        if self.params is None or not onestatement.usable(svc, claimable.ttl):
            return False
        started = await onestatement.claim_and_start(svc, claimable, merchant_id, self.params)
        if started is None:
            return None
        ticket, row = started
        return ticket, Started(row.id, row)

    async def record_at_once(
        self, svc: Services, ticket: Ticket, payment: PaymentRow, answer: AcquirerAnswer
    ) -> Reply | Literal[False] | None:
        """Phase 2 as one statement (:mod:`.onestatement`), for the payment ``payment`` as
        phase 1 of this same request left it: the reply, stored; None when nothing was written
        (the record or the payment moved on); False where this process does not take
        the statement. Either way but the first, phases.py runs :meth:`record`."""
        if not onestatement.usable(svc):
            return False
        return await onestatement.record(svc, ticket, payment, answer)

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        row = payment or await read_payment(svc, object_id)
        ask_first = ticket.resumed or bool(row.outcome_unknown)
        advance = _advancer(svc, ticket)
        return await failover.authorize(svc.acquirers, row, advance, ask_first=ask_first)

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            code = answer.decline_code or "acquirer_unavailable"
            message = onestatement.failure_message(code)
            row = await resolve(
                conn,
                row,
                T.FAIL,
                failure_code=code,
                failure_message=message,
                acquirer=answer.acquirer,
            )
            await payment_event(conn, row, "payment.failed")
            return payment_reply(201, row)
        await post_to_ledger(conn, row, "authorization", ledger.authorize(row.amount))
        row = await resolve(
            conn,
            row,
            T.AUTHORIZE,
            acquirer=answer.acquirer,
            authorization_id=answer.authorization_id,
        )
        await payment_event(conn, row, "payment.authorized")
        if row.capture_method == "automatic":
            row = await capture_in_ledger(conn, row, row.amount)
        return payment_reply(201, row)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return Reply.json(201, payment_public(await load_payment(conn, object_id)))


def _advancer(svc: Services, ticket: Ticket) -> failover.Advance:
    async def advance(payment_id: str, attempt: int, acquirer: str) -> bool:
        """Move a still-processing payment to its next attempt, in a transaction fenced by the
        request's ticket (which also renews its lease); False if someone else moved it first."""
        async with write(svc.db) as conn:
            assert ticket.recovery_point is not None  # phase 1 committed before any call
            await svc.engine.acheckpoint_in(conn, ticket, ticket.recovery_point)
            result = await conn.execute(
                update(payments)
                .where(
                    payments.c.id == payment_id,
                    payments.c.attempt == attempt,
                    payments.c.status == "processing",
                )
                .values(attempt=attempt + 1, acquirer=acquirer, updated_at=time.time())
            )
            return bool(result.rowcount)

    return advance
