"""Refund captured money, all that is left or part of it; the refund's own id is the reference.
Refunds in flight count against what is left, so two concurrent refunds never exceed it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.idempotency.engine import Ticket
from oncepay.payments import ledger
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.errors import AmountTooLarge, InvalidStateTransition, ResourceMissing
from oncepay.payments.events import emit
from oncepay.payments.models import refund_public
from oncepay.payments.operations.common import (
    RESOLVED,
    authorization_of,
    check_followable,
    load_payment,
    note_unknown,
    payment_event,
    post_to_ledger,
    resolve,
    save,
)
from oncepay.payments.phases import Started
from oncepay.payments.records import PaymentRow, RefundRow
from oncepay.payments.reply import Reply
from oncepay.payments.states import Transition
from oncepay.payments.storage.schema import refunds
from oncepay.storage.db import read
from oncepay.storage.ids import is_id, new_id

__all__ = ["CreateRefund", "load_refund"]

T = Transition


@dataclass(frozen=True, slots=True)
class CreateRefund:
    payment_id: str
    amount: int | None = None
    name: str = "refund"
    created: str = "refund_created"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "refund")
        reserved = (
            await conn.execute(
                select(func.coalesce(func.sum(refunds.c.amount), 0)).where(
                    refunds.c.payment_id == row.id, refunds.c.status != "failed"
                )
            )
        ).scalar_one()
        left = row.amount_captured - int(reserved)
        if left <= 0:  # refunds racing one another: the others took it all, whatever was asked
            raise InvalidStateTransition(
                f"nothing is left to refund: all {row.amount_captured} captured is refunded "
                "or being refunded"
            )
        amount = left if self.amount is None else self.amount
        if amount > left or amount <= 0:
            raise AmountTooLarge(
                f"cannot refund {amount}: {left} of the {row.amount_captured} captured is left"
                + (
                    " (the rest is refunded or being refunded)"
                    if left < row.amount_captured
                    else ""
                )
            )
        refund_id, now = new_id("re"), time.time()
        await conn.execute(
            refunds.insert().values(
                id=refund_id,
                payment_id=row.id,
                merchant_id=merchant_id,
                amount=amount,
                currency=row.currency,
                status="pending",
                created_at=now,
                updated_at=now,
            )
        )
        await _refund_event(conn, refund_id, "refund.created")
        return Started(refund_id)

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        async with read(svc.db) as conn:
            refund = await load_refund(conn, object_id)
            row = await load_payment(conn, refund.payment_id)
        return await svc.acquirers[row.acquirer].refund(
            reference=refund.id, authorization_id=authorization_of(row), amount=refund.amount
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        refund = await load_refund(conn, object_id)
        row = await load_payment(conn, refund.payment_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            await _save_refund(
                conn, refund.id, status="failed", failure_code=answer.decline_code or "declined"
            )
            await save(conn, row.id, **RESOLVED)
            return _created(await _refund_event(conn, refund.id, "refund.failed"))
        await post_to_ledger(conn, row, "refund", ledger.refund(refund.amount), refund.id)
        refunded = row.amount_refunded + refund.amount
        transition = T.REFUND_ALL if refunded == row.amount_captured else T.REFUND_PART
        await _save_refund(conn, refund.id, status="succeeded")
        row = await resolve(conn, row, transition, amount_refunded=refunded)
        refund = await _refund_event(conn, refund.id, "refund.succeeded")
        await payment_event(conn, row, "payment.refunded")
        return _created(refund)

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        refund = await load_refund(conn, object_id)
        return await note_unknown(conn, svc, refund.payment_id, answer)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return _created(await load_refund(conn, object_id))


def _created(refund: RefundRow) -> Reply:
    return Reply.json(201, refund_public(refund))


async def load_refund(
    conn: AsyncConnection, refund_id: str, merchant_id: str | None = None
) -> RefundRow:
    if not is_id(refund_id):
        raise ResourceMissing(f"no refund {refund_id!r}")
    query = select(refunds).where(refunds.c.id == refund_id)
    if merchant_id is not None:
        query = query.where(refunds.c.merchant_id == merchant_id)
    row = (await conn.execute(query)).first()
    if row is None:
        raise ResourceMissing(f"no refund {refund_id!r}")
    return cast(RefundRow, row)


async def _save_refund(conn: AsyncConnection, refund_id: str, **values: Any) -> None:
    values["updated_at"] = time.time()
    await conn.execute(update(refunds).where(refunds.c.id == refund_id).values(**values))


async def _refund_event(conn: AsyncConnection, refund_id: str, type: str) -> RefundRow:
    """The refund's event; the refund as it is now."""
    refund = await load_refund(conn, refund_id)
    await emit(
        conn,
        merchant_id=refund.merchant_id,
        type=type,
        object_id=refund.id,
        data=refund_public(refund),
    )
    return refund
