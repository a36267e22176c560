"""Create a payment: authorize it on some acquirer (failing over when that is proven safe),
and capture it too when its ``capture_method`` is ``automatic``. The authorization's reference
is ``{payment}_a{attempt}``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.idempotency.engine import Ticket
from oncepay.payments import failover, ledger
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.models import PaymentCreate, payment_public
from oncepay.payments.operations.common import (
    OnPayment,
    capture_in_ledger,
    load_payment,
    payment_event,
    post_to_ledger,
    read_payment,
    resolve,
)
from oncepay.payments.reply import Reply
from oncepay.payments.states import PaymentStatus, Transition
from oncepay.payments.storage.schema import payments
from oncepay.storage.db import write
from oncepay.storage.ids import new_id

__all__ = ["CreatePayment"]

S, T = PaymentStatus, Transition

_INSERT = payments.insert().returning(*payments.c)


@dataclass(frozen=True, slots=True)
class CreatePayment(OnPayment):
    params: PaymentCreate | None = None  # None when the recovery worker resumes
    name: str = "create"
    created: str = "payment_created"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> str:
        assert self.params is not None  # phase 1 runs only for a client's request
        p, now = self.params, time.time()
        payment_id = new_id("pay")
        row = {
            "id": payment_id,
            "merchant_id": merchant_id,
            "amount": p.amount,
            "currency": p.currency,
            "payment_method": p.payment_method,
            "capture_method": p.capture_method,
            "description": p.description,
            "metadata": json.dumps(p.metadata),
            "status": S.PROCESSING,
            "amount_captured": 0,
            "amount_refunded": 0,
            "acquirer": svc.acquirers.choose().name,
            "attempt": 1,
            "outcome_unknown": False,
            "recovery_attempts": 0,
            "escalated": False,
            "created_at": now,
            "updated_at": now,
        }
        result = await conn.execute(_INSERT, row)
        await payment_event(conn, result.one(), "payment.created")
        return payment_id

    async def call(self, svc: Services, object_id: str, ticket: Ticket) -> AcquirerAnswer:
        row = await read_payment(svc, object_id)
        ask_first = ticket.resumed or bool(row.outcome_unknown)
        advance = _advancer(svc, ticket)
        return await failover.authorize(svc.acquirers, row, advance, ask_first=ask_first)

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> None:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            code = answer.decline_code or "acquirer_unavailable"
            message = _failure_message(code)
            row = await resolve(
                conn,
                row,
                T.FAIL,
                failure_code=code,
                failure_message=message,
                acquirer=answer.acquirer,
            )
            await payment_event(conn, row, "payment.failed")
            return
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
            await capture_in_ledger(conn, row, row.amount)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return Reply.json(201, payment_public(await load_payment(conn, object_id)))


def _failure_message(code: str | None) -> str:
    return {
        "card_declined": "The card was declined.",
        "insufficient_funds": "The card has insufficient funds.",
        "acquirer_unavailable": "No acquirer could take the payment; no money moved.",
    }.get(code or "", "The payment failed.")


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
