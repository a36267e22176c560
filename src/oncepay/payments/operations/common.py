"""What the operations share: loading and saving a payment (raw statements, one per shape),
its events, the checks before a follow-on operation, and noting an unknown outcome."""

from __future__ import annotations

import functools
import time
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.errors import OncePayError
from oncepay.payments import ledger
from oncepay.payments.acquirers.base import AcquirerAnswer
from oncepay.payments.context import Services
from oncepay.payments.errors import (
    AcquirerRefused,
    OperationInProgress,
    OutcomeUnknown,
    ResourceMissing,
)
from oncepay.payments.events import emit
from oncepay.payments.metrics import RECOVERY_ESCALATIONS
from oncepay.payments.models import payment_public
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.payments.states import PaymentStatus, Transition, next_status, require
from oncepay.payments.storage.schema import payments
from oncepay.payments.webhooks.outbox import ENDPOINTS_ALONGSIDE, keep_endpoints
from oncepay.storage.db import read
from oncepay.storage.ids import is_id
from oncepay.storage.raw import Rows, Sql, raw

__all__ = [
    "PAYMENTS",
    "RESOLVED",
    "FollowOn",
    "OnPayment",
    "authorization_of",
    "capture_in_ledger",
    "check_followable",
    "load_payment",
    "note_unknown",
    "payment_event",
    "payment_json",
    "payment_or_refusal",
    "payment_reply",
    "pending_capture",
    "post_to_ledger",
    "read_payment",
    "refused",
    "resolve",
    "save",
]

S, T = PaymentStatus, Transition


async def load_payment(
    conn: AsyncConnection, payment_id: str, merchant_id: str | None = None, *, lock: bool = False
) -> PaymentRow:
    """The payment row; ``lock`` takes its row lock on PostgreSQL (SQLite's write transaction
    already excludes every other writer). Another merchant's payment is not found."""
    if not is_id(payment_id):
        raise ResourceMissing(f"no payment {payment_id!r}")
    db = await raw(conn)
    if lock and conn.dialect.name == "postgresql":
        # The transaction changes the payment, and writes its events: the merchant's webhook
        # endpoints come along (webhooks/outbox.py), not in a round trip of their own. Only
        # when the lock is free (SKIP LOCKED): a statement that waits for a row lock keeps
        # the snapshot it began with, and would miss an endpoint created while it waited; a
        # payment locked elsewhere (or missing) is read below, its endpoints after it.
        if merchant_id is None:
            found = await db.rows(_LOAD_LOCKED_WITH_ENDPOINTS, payment_id)
        else:
            found = await db.rows(_LOAD_OF_LOCKED_WITH_ENDPOINTS, payment_id, merchant_id)
        if found:
            row = cast(PaymentRow, PAYMENTS.make(*found[0][:-1]))
            keep_endpoints(conn, row.merchant_id, found[0][-1])
            return row
    if merchant_id is None:
        found = await db.rows(_LOAD_LOCKED if lock else _LOAD, payment_id)
    else:
        found = await db.rows(_LOAD_OF_LOCKED if lock else _LOAD_OF, payment_id, merchant_id)
    if not found:
        raise ResourceMissing(f"no payment {payment_id!r}")
    return cast(PaymentRow, PAYMENTS.one(found[0], integers_as_booleans=db.integers_as_booleans))


async def save(conn: AsyncConnection, payment_id: str, **values: Any) -> PaymentRow:
    """Update a payment; the row as it now is (one statement: UPDATE … RETURNING)."""
    values["updated_at"] = time.time()
    db = await raw(conn)
    names = tuple(values)
    row = (await db.rows(_save(names), payment_id, *values.values()))[0]
    return cast(PaymentRow, PAYMENTS.one(row, integers_as_booleans=db.integers_as_booleans))


# The payment statements, written once per shape on the raw driver (storage/raw.py):
# through SQLAlchemy Core they cost more than the database's work (bench/e2e/PROFILE.md).

PAYMENTS = Rows(payments)
_SELECT = f"SELECT {PAYMENTS.columns} FROM payments WHERE id = $1"
_LOAD = Sql(_SELECT)
_LOAD_LOCKED = Sql(_SELECT, lock="FOR UPDATE")
_LOAD_OF = Sql(f"{_SELECT} AND merchant_id = $2")
_LOAD_OF_LOCKED = Sql(f"{_SELECT} AND merchant_id = $2", lock="FOR UPDATE")
_WITH_ENDPOINTS = (
    f"SELECT {PAYMENTS.columns}, {ENDPOINTS_ALONGSIDE.format(merchant='payments.merchant_id')} "
    "FROM payments WHERE id = $1"
)
_FREE = "FOR UPDATE SKIP LOCKED"
_LOAD_LOCKED_WITH_ENDPOINTS = Sql(_WITH_ENDPOINTS, lock=_FREE)  # PostgreSQL's
_LOAD_OF_LOCKED_WITH_ENDPOINTS = Sql(f"{_WITH_ENDPOINTS} AND merchant_id = $2", lock=_FREE)


@functools.cache
def _save(columns: tuple[str, ...]) -> Sql:
    assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=2))
    return Sql(f"UPDATE payments SET {assignments} WHERE id = $1 RETURNING {PAYMENTS.columns}")


async def payment_event(conn: AsyncConnection, row: PaymentRow, type: str) -> None:
    await emit(
        conn, merchant_id=row.merchant_id, type=type, object_id=row.id, data=payment_json(row)
    )


def payment_json(row: PaymentRow) -> str:
    """The payment as the API shows it, in compact JSON. An operation's last event and its
    answer show the same row: the one encoding is kept for the answer (rows are immutable,
    so the same row object is the same document)."""
    global _last_encoded  # noqa: PLW0603
    last, encoded = _last_encoded
    if last is not row:
        encoded = Reply.compact(payment_public(row))
        _last_encoded = (row, encoded)
    return encoded


def payment_reply(status: int, row: PaymentRow) -> Reply:
    """The payment ``row`` as an answer (its JSON encoded once with its event's)."""
    return Reply(status, payment_json(row).encode())


_last_encoded: tuple[PaymentRow | None, str] = (None, "")


# An answer came: whatever was unknown about the payment is known now, and a later unknown
# outcome starts the back-off schedule (and its escalation) afresh.
RESOLVED: dict[str, Any] = {"outcome_unknown": False, "recovery_attempts": 0, "escalated": False}


def check_followable(row: PaymentRow, request: str) -> None:
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
    row = await save(
        conn,
        payment_id,
        outcome_unknown=True,
        recovery_attempts=tries,
        escalated=row.escalated or escalate,
    )
    if escalate:
        RECOVERY_ESCALATIONS.inc()
        await payment_event(conn, row, "payment.recovery_escalated")
    return float(schedule[min(tries, len(schedule)) - 1])


async def resolve(
    conn: AsyncConnection, row: PaymentRow, transition: Transition, **values: Any
) -> PaymentRow:
    """Move the payment by ``transition`` (the state table says to what), save ``values``
    with it, and mark its outcome known. ``row`` is the payment as this transaction holds it
    (read with ``load_payment(lock=True)``, or what an earlier ``resolve`` of it returned): the
    new row is that one with the changes, not read back, so on PostgreSQL the update travels
    with the transaction's next statement, merged with the payment's next update if that comes
    first (an automatic capture's authorization and capture: storage/raw.py)."""
    status = next_status(S(row.status), transition)
    changes = {"status": status.value, **values, **RESOLVED, "updated_at": time.time()}
    await (await raw(conn)).update_row("payments", "id", row.id, changes)
    return row._replace(**changes)


async def post_to_ledger(
    conn: AsyncConnection,
    row: PaymentRow,
    kind: str,
    entries: ledger.Entries,
    refund_id: str | None = None,
) -> None:
    """One journal transaction for the payment ``row``, in its merchant's books and currency."""
    await ledger.post(
        conn,
        merchant_id=row.merchant_id,
        payment_id=row.id,
        currency=row.currency,
        kind=kind,
        entries=entries,
        refund_id=refund_id,
    )


async def capture_in_ledger(conn: AsyncConnection, row: PaymentRow, amount: int) -> PaymentRow:
    """Capture ``amount`` of the payment ``row``: the ledger, its state, its event; the row
    as it now is."""
    await post_to_ledger(conn, row, "capture", ledger.capture(row.amount, amount))
    row = await resolve(conn, row, T.CAPTURE, amount_captured=amount, pending_operation=None)
    await payment_event(conn, row, "payment.captured")
    return row


def authorization_of(row: PaymentRow) -> str:
    """The acquirer's authorization a capture, void or refund acts on. A payment gets past
    :func:`check_followable` only once authorized, and an approval always carries its id."""
    if row.authorization_id is None:
        raise OncePayError(f"payment {row.id} has no authorization id")
    return row.authorization_id


def pending_capture(row: PaymentRow) -> int:
    """The amount of the capture between its phases (``pending_operation`` reads
    ``capture:<amount>`` from phase 1 on)."""
    operation = row.pending_operation or ""
    return int(operation.partition(":")[2])


async def read_payment(svc: Services, payment_id: str) -> PaymentRow:
    async with read(svc.db) as conn:
        return await load_payment(conn, payment_id)


async def refused(
    conn: AsyncConnection, row: PaymentRow, answer: AcquirerAnswer, request: str
) -> Reply:
    """The acquirer refused a capture or void: the payment stays as it was (its outcome
    known), and the client is told so (``request`` names what was refused)."""
    await save(conn, row.id, pending_operation=None, **RESOLVED)
    return _refusal(answer.decline_code or "declined", request)


async def payment_or_refusal(conn: AsyncConnection, payment_id: str, request: str) -> Reply:
    """The answer of a follow-on request resumed at ``acquirer_called``: an earlier version
    marked a refusal on the payment (``refused:<code>``) between its phases 2 and 3."""
    row = await load_payment(conn, payment_id)
    if row.pending_operation and row.pending_operation.startswith("refused:"):
        code = row.pending_operation.partition(":")[2]
        await save(conn, payment_id, pending_operation=None)
        return _refusal(code, request)
    return Reply.json(200, payment_public(row))


def _refusal(code: str, request: str) -> Reply:
    return Reply.problem(AcquirerRefused(f"the acquirer refused to {request} ({code})"))


class OnPayment:
    """What the operations on a payment itself (create, capture, cancel) share: an unknown
    outcome is noted on the payment."""

    __slots__ = ()

    async def unknown(
        self, conn: AsyncConnection, svc: Services, object_id: str, answer: AcquirerAnswer
    ) -> float:
        return await note_unknown(conn, svc, object_id, answer)


class FollowOn(OnPayment):
    """A follow-on operation on a payment (capture, cancel): it answers with the payment, or
    with the acquirer's refusal of the request (its ``name``)."""

    __slots__ = ()
    name: str

    async def reply(self, conn: AsyncConnection, svc: Services, object_id: str) -> Reply:
        return await payment_or_refusal(conn, object_id, self.name)
