"""The money-moving requests, each an :class:`~oncepay.payments.phases.Operation`:
create a payment (authorize, and capture when automatic), capture, cancel, refund.

References sent to acquirers are derived from the objects, so a repeated call is the same call:
``{payment}_a{attempt}`` authorizes, ``{payment}_capture`` captures, ``{payment}_void`` voids,
the refund's own id refunds.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import bindparam, func, select, update

from oncepay.payments import ledger
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.errors import (
    AmountTooLarge,
    OperationInProgress,
    OutcomeUnknown,
    ResourceMissing,
)
from oncepay.payments.events import emit
from oncepay.payments.ids import is_id, new_id
from oncepay.payments.metrics import RECOVERY_ESCALATIONS
from oncepay.payments.models import PaymentCreate, payment_public, refund_public
from oncepay.payments.phases import Reply
from oncepay.payments.schema import payments, refunds
from oncepay.payments.states import PaymentStatus, Transition, next_status, require

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

    from oncepay.idempotency.engine import Ticket
    from oncepay.payments.service import Services

__all__ = ["OPERATIONS", "Cancel", "Capture", "CreatePayment", "CreateRefund"]

S, T = PaymentStatus, Transition


# -- shared steps --------------------------------------------------------------------------------


async def load_payment(
    conn: AsyncConnection, payment_id: str, merchant_id: str | None = None, *, lock: bool = False
) -> Any:
    """The payment row; ``lock`` takes its row lock on PostgreSQL (SQLite's write transaction
    already excludes every other writer). Another merchant's payment is not found."""
    if not is_id(payment_id):
        raise ResourceMissing(f"no payment {payment_id!r}")
    params = {"id": payment_id, "merchant_id": merchant_id}
    row = (await conn.execute(_load(merchant_id is not None, lock), params)).first()
    if row is None:
        raise ResourceMissing(f"no payment {payment_id!r}")
    return row


async def save(conn: AsyncConnection, payment_id: str, **values: Any) -> Any:
    """Update a payment; the row as it now is (one statement: UPDATE … RETURNING)."""
    values["updated_at"] = time.time()
    params = {f"new_{name}": value for name, value in values.items()}
    result = await conn.execute(_save(frozenset(values)), {"payment_id": payment_id, **params})
    return result.one()


# The payment statements, built once per shape: building a statement costs more than running
# it on SQLite (bench/e2e/PROFILE.md); there are a few dozen shapes at most.


@functools.cache
def _load(of_merchant: bool, lock: bool) -> Any:
    query = select(payments).where(payments.c.id == bindparam("id"))
    if of_merchant:
        query = query.where(payments.c.merchant_id == bindparam("merchant_id"))
    return query.with_for_update() if lock else query


@functools.cache
def _save(columns: frozenset[str]) -> Any:
    values: dict[str, Any] = {name: bindparam(f"new_{name}") for name in sorted(columns)}
    return (
        update(payments).where(payments.c.id == bindparam("payment_id")).values(values)
        .returning(*payments.c)
    )  # fmt: skip


_INSERT = payments.insert().returning(*payments.c)


async def payment_event(conn: AsyncConnection, row: Any, type: str) -> None:
    await emit(conn, merchant_id=row.merchant_id, type=type, object_id=row.id,
               data=payment_public(row))  # fmt: skip


# An answer came: whatever was unknown about the payment is known now, and a later unknown
# outcome starts the back-off schedule (and its escalation) afresh.
RESOLVED: dict[str, Any] = {"outcome_unknown": False, "recovery_attempts": 0, "escalated": False}


def check_followable(row: Any, request: str) -> None:
    """What every follow-on operation asks of a payment before touching it."""
    if row.outcome_unknown:
        raise OutcomeUnknown(
            f"payment {row.id} awaits the acquirer's answer; {request} it once it is resolved"
        )
    if row.status == S.PROCESSING or row.pending_operation:
        raise OperationInProgress(f"payment {row.id} has an operation in progress; retry shortly")
    require(PaymentStatus(row.status), request)


async def note_unknown(
    conn: AsyncConnection, svc: Services, payment_id: str, answer: AcquirerAnswer
) -> float:
    """Count one more unanswered try; escalate once the back-off schedule is spent."""
    row = await load_payment(conn, payment_id, lock=True)
    tries = row.recovery_attempts + 1
    schedule = svc.settings.recovery_backoff
    escalate = tries >= len(schedule) and not row.escalated
    row = await save(conn, payment_id, outcome_unknown=True, recovery_attempts=tries,
                     escalated=row.escalated or escalate)  # fmt: skip
    if escalate:
        RECOVERY_ESCALATIONS.inc()
        await payment_event(conn, row, "payment.recovery_escalated")
    return float(schedule[min(tries, len(schedule)) - 1])


def _failure_message(code: str | None) -> str:
    return {
        "card_declined": "The card was declined.",
        "insufficient_funds": "The card has insufficient funds.",
        "acquirer_unavailable": "No acquirer could take the payment; no money moved.",
    }.get(code or "", "The payment failed.")


# -- create --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreatePayment:
    params: PaymentCreate | None = None  # None when the recovery worker resumes
    name: str = "create"
    created: str = "payment_created"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> str:
        assert self.params is not None  # phase 1 runs only for a client's request
        p, now = self.params, time.time()
        payment_id = new_id("pay")
        row = {
            "id": payment_id, "merchant_id": merchant_id, "amount": p.amount,
            "currency": p.currency, "payment_method": p.payment_method,
            "capture_method": p.capture_method, "description": p.description,
            "metadata": json.dumps(p.metadata), "status": S.PROCESSING, "amount_captured": 0,
            "amount_refunded": 0, "acquirer": svc.acquirers.choose().name, "attempt": 1,
            "outcome_unknown": False, "recovery_attempts": 0, "escalated": False,
            "created_at": now, "updated_at": now,
        }  # fmt: skip
        result = await conn.execute(_INSERT, row)
        await payment_event(conn, result.one(), "payment.created")
        return payment_id

    async def call(self, svc: Services, object_id: str, ticket: Ticket) -> AcquirerAnswer:
        row = await _read_payment(svc, object_id)
        ask_first = ticket.resumed or bool(row.outcome_unknown)
        return await svc.acquirers.authorize(svc, row, ticket, ask_first=ask_first)

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> None:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            code = answer.decline_code or "acquirer_unavailable"
            row = await save(conn, object_id, status=next_status(S(row.status), T.FAIL),
                             failure_code=code, failure_message=_failure_message(code),
                             acquirer=answer.acquirer, **RESOLVED)  # fmt: skip
            await payment_event(conn, row, "payment.failed")
            return
        await ledger.post(conn, merchant_id=row.merchant_id, payment_id=row.id,
                          currency=row.currency, kind="authorization",
                          entries=ledger.authorize(row.amount))  # fmt: skip
        row = await save(conn, object_id, status=next_status(S(row.status), T.AUTHORIZE),
                         acquirer=answer.acquirer, authorization_id=answer.authorization_id,
                         **RESOLVED)  # fmt: skip
        await payment_event(conn, row, "payment.authorized")
        if row.capture_method == "automatic":
            await _capture_in_ledger(conn, row, row.amount)

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        return await note_unknown(conn, svc, object_id, answer)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return Reply.json(201, payment_public(await load_payment(conn, object_id)))


async def _capture_in_ledger(conn: AsyncConnection, row: Any, amount: int) -> None:
    await ledger.post(conn, merchant_id=row.merchant_id, payment_id=row.id,
                      currency=row.currency, kind="capture",
                      entries=ledger.capture(row.amount, amount))  # fmt: skip
    row = await save(conn, row.id, status=next_status(S(row.status), T.CAPTURE),
                     amount_captured=amount, pending_operation=None, **RESOLVED)  # fmt: skip
    await payment_event(conn, row, "payment.captured")


# -- capture and cancel --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capture:
    payment_id: str
    amount: int | None = None
    name: str = "capture"
    created: str = "capture_started"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> str:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "capture")
        amount = row.amount if self.amount is None else self.amount
        if amount > row.amount:
            raise AmountTooLarge(f"cannot capture {amount}: only {row.amount} was authorized")
        await save(conn, row.id, pending_operation=f"capture:{amount}")
        return str(row.id)

    async def call(self, svc: Services, object_id: str, ticket: Ticket) -> AcquirerAnswer:
        row = await _read_payment(svc, object_id)
        amount = int(row.pending_operation.partition(":")[2])
        return await svc.acquirers[row.acquirer].capture(
            reference=f"{row.id}_capture", authorization_id=row.authorization_id, amount=amount
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> None:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is Outcome.APPROVED:
            await _capture_in_ledger(conn, row, int(row.pending_operation.partition(":")[2]))
        else:
            await _refused(conn, row, answer)

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        return await note_unknown(conn, svc, object_id, answer)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return await _payment_or_refusal(conn, object_id, "capture")


@dataclass(frozen=True, slots=True)
class Cancel:
    payment_id: str
    name: str = "cancel"
    created: str = "cancel_started"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> str:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "cancel")
        await save(conn, row.id, pending_operation="cancel")
        return str(row.id)

    async def call(self, svc: Services, object_id: str, ticket: Ticket) -> AcquirerAnswer:
        row = await _read_payment(svc, object_id)
        return await svc.acquirers[row.acquirer].void(
            reference=f"{row.id}_void", authorization_id=row.authorization_id
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> None:
        row = await load_payment(conn, object_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            await _refused(conn, row, answer)
            return
        await ledger.post(conn, merchant_id=row.merchant_id, payment_id=row.id,
                          currency=row.currency, kind="void",
                          entries=ledger.release_hold(row.amount))  # fmt: skip
        row = await save(conn, row.id, status=next_status(S(row.status), T.CANCEL),
                         pending_operation=None, **RESOLVED)  # fmt: skip
        await payment_event(conn, row, "payment.canceled")

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        return await note_unknown(conn, svc, object_id, answer)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return await _payment_or_refusal(conn, object_id, "cancel")


async def _read_payment(svc: Services, payment_id: str) -> Any:
    from oncepay.payments.db import read

    async with read(svc.db) as conn:
        return await load_payment(conn, payment_id)


async def _refused(conn: AsyncConnection, row: Any, answer: AcquirerAnswer) -> None:
    """The acquirer refused a capture or void: the payment stays as it was, marked so that
    phase 3 can tell the client."""
    refusal = f"refused:{answer.decline_code or 'declined'}"
    await save(conn, row.id, pending_operation=refusal, **RESOLVED)


async def _payment_or_refusal(conn: AsyncConnection, payment_id: str, request: str) -> Reply:
    row = await load_payment(conn, payment_id)
    if row.pending_operation and row.pending_operation.startswith("refused:"):
        code = row.pending_operation.partition(":")[2]
        await save(conn, payment_id, pending_operation=None)
        return Reply.json(402, {
            "type": "urn:oncepay:problem:acquirer_refused", "title": "The acquirer refused",
            "status": 402, "detail": f"the acquirer refused to {request} ({code})",
            "code": "acquirer_refused",
        })  # fmt: skip
    return Reply.json(200, payment_public(row))


# -- refunds -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CreateRefund:
    payment_id: str
    amount: int | None = None
    name: str = "refund"
    created: str = "refund_created"

    async def start(self, conn: AsyncConnection, svc: Services, merchant_id: str) -> str:
        row = await load_payment(conn, self.payment_id, merchant_id, lock=True)
        check_followable(row, "refund")
        reserved = (await conn.execute(
            select(func.coalesce(func.sum(refunds.c.amount), 0))
            .where(refunds.c.payment_id == row.id, refunds.c.status != "failed")
        )).scalar_one()  # fmt: skip
        left = row.amount_captured - int(reserved)
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
        await conn.execute(refunds.insert().values(
            id=refund_id, payment_id=row.id, merchant_id=merchant_id, amount=amount,
            currency=row.currency, status="pending", created_at=now, updated_at=now,
        ))  # fmt: skip
        await _refund_event(conn, refund_id, "refund.created")
        return refund_id

    async def call(self, svc: Services, object_id: str, ticket: Ticket) -> AcquirerAnswer:
        from oncepay.payments.db import read

        async with read(svc.db) as conn:
            refund = await _load_refund(conn, object_id)
            row = await load_payment(conn, refund.payment_id)
        return await svc.acquirers[row.acquirer].refund(
            reference=refund.id, authorization_id=row.authorization_id, amount=refund.amount
        )

    async def record(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> None:
        refund = await _load_refund(conn, object_id)
        row = await load_payment(conn, refund.payment_id, lock=True)
        if answer.outcome is not Outcome.APPROVED:
            await _save_refund(conn, refund.id, status="failed",
                               failure_code=answer.decline_code or "declined")  # fmt: skip
            await save(conn, row.id, **RESOLVED)
            await _refund_event(conn, refund.id, "refund.failed")
            return
        await ledger.post(conn, merchant_id=row.merchant_id, payment_id=row.id,
                          currency=row.currency, kind="refund", refund_id=refund.id,
                          entries=ledger.refund(refund.amount))  # fmt: skip
        refunded = row.amount_refunded + refund.amount
        transition = T.REFUND_ALL if refunded == row.amount_captured else T.REFUND_PART
        await _save_refund(conn, refund.id, status="succeeded")
        row = await save(conn, row.id, status=next_status(S(row.status), transition),
                         amount_refunded=refunded, **RESOLVED)  # fmt: skip
        await _refund_event(conn, refund.id, "refund.succeeded")
        await payment_event(conn, row, "payment.refunded")

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        refund = await _load_refund(conn, object_id)
        return await note_unknown(conn, svc, refund.payment_id, answer)

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return Reply.json(201, refund_public(await _load_refund(conn, object_id)))


async def _load_refund(
    conn: AsyncConnection, refund_id: str, merchant_id: str | None = None
) -> Any:
    if not is_id(refund_id):
        raise ResourceMissing(f"no refund {refund_id!r}")
    query = select(refunds).where(refunds.c.id == refund_id)
    if merchant_id is not None:
        query = query.where(refunds.c.merchant_id == merchant_id)
    row = (await conn.execute(query)).first()
    if row is None:
        raise ResourceMissing(f"no refund {refund_id!r}")
    return row


async def _save_refund(conn: AsyncConnection, refund_id: str, **values: Any) -> None:
    values["updated_at"] = time.time()
    await conn.execute(update(refunds).where(refunds.c.id == refund_id).values(**values))


async def _refund_event(conn: AsyncConnection, refund_id: str, type: str) -> None:
    refund = await _load_refund(conn, refund_id)
    await emit(conn, merchant_id=refund.merchant_id, type=type, object_id=refund.id,
               data=refund_public(refund))  # fmt: skip


def resume(op_name: str, object_id: str) -> Any:
    """The operation a recovery point names, rebuilt for the recovery worker."""
    if op_name == "create":
        return CreatePayment()
    if op_name == "refund":
        return CreateRefund(payment_id="")
    return OPERATIONS[op_name](payment_id=object_id)


OPERATIONS: dict[str, Any] = {"capture": Capture, "cancel": Cancel}
