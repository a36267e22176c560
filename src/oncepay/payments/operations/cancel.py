"""Cancel (void) an authorization: the held money is released. The reference is
``{payment}_void``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.idempotency.engine import Ticket
from oncepay.payments import ledger
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.models import payment_public
from oncepay.payments.operations.common import (
    FollowOn,
    authorization_of,
    check_followable,
    load_payment,
    payment_event,
    post_to_ledger,
    read_payment,
    refused,
    resolve,
    save,
)
from oncepay.payments.phases import Started
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.payments.states import Transition

__all__ = ["Cancel"]

T = Transition
VOIDED_ALREADY = "authorization_voided"  # the acquirer's refusal of a void, or of a capture


@dataclass(frozen=True, slots=True)
class Cancel(FollowOn):
    payment_id: str
    name: str = "cancel"
    created: str = "cancel_started"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> Started:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "cancel")
        return Started(row.id, await save(conn, row.id, pending_operation="cancel"))

    async def call(
        self, svc: Services, object_id: str, ticket: Ticket, payment: PaymentRow | None = None
    ) -> AcquirerAnswer:
        row = payment or await read_payment(svc, object_id)
        return await svc.acquirers[row.acquirer].void(
            reference=f"{row.id}_void", authorization_id=authorization_of(row)
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> Reply:
        row = await load_payment(conn, object_id, lock=True)
        # Voided already at the acquirer (out of band, or it lapsed there): what the cancel
        # asks for is true there, so the payment follows; refusing it would leave the payment
        # authorized for good, its hold in the ledger, with nothing left to move it on.
        voided = answer.decline_code == VOIDED_ALREADY
        if answer.outcome is not Outcome.APPROVED and not voided:
            return await refused(conn, row, answer, self.name)
        await post_to_ledger(conn, row, "void", ledger.release_hold(row.amount))
        row = await resolve(conn, row, T.CANCEL, pending_operation=None)
        await payment_event(conn, row, "payment.canceled")
        return Reply.json(200, payment_public(row))
