"""Capture an authorized payment, all of it or part; the reference is ``{payment}_capture``.
The amount rides on the payment (``pending_operation``) between the phases."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.idempotency.engine import Ticket
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.errors import AmountTooLarge
from oncepay.payments.models import payment_public
from oncepay.payments.operations.common import (
    FollowOn,
    authorization_of,
    capture_in_ledger,
    check_followable,
    load_payment,
    pending_capture,
    read_payment,
    refused,
    save,
)
from oncepay.payments.phases import Started
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply

__all__ = ["Capture"]


@dataclass(frozen=True, slots=True)
class Capture(FollowOn):
    payment_id: str
    amount: int | None = None
    name: str = "capture"
    created: str = "capture_started"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "capture")
        amount = row.amount if self.amount is None else self.amount
        if amount > row.amount:
            raise AmountTooLarge(f"cannot capture {amount}: only {row.amount} was authorized")
        return Started(row.id, await save(conn, row.id, pending_operation=f"capture:{amount}"))

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        row = payment or await read_payment(svc, object_id)
        amount = pending_capture(row)
        return await svc.acquirers[row.acquirer].capture(
            reference=f"{row.id}_capture", authorization_id=authorization_of(row), amount=amount
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            return await refused(conn, row, answer, self.name)
        row = await capture_in_ledger(conn, row, pending_capture(row))
        return Reply.json(200, payment_public(row))
