"""Money moves: authorize (``pm_card_*`` decide the outcome), then capture, void and refund
an authorization. Each runs in one transaction that claims its reference, so a retry answers
the stored result instead of moving money twice; captures and refunds are recorded as
movements for the settlement report."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import Response

from oncepay.simulator.bodies import AmountBody, AuthorizeBody, VoidBody, parse
from oncepay.simulator.documents import Answer, dumps, iso
from oncepay.simulator.problems import Problem
from oncepay.simulator.references import claim, find, operation_row, replay, retrying
from oncepay.simulator.schema import AuthorizationRow, authorizations, movements
from oncepay.simulator.state import Simulator, simulator_of
from oncepay.storage.ids import new_id
from oncepay.storage.raw import Raw, Rows, Sql

__all__ = ["PAYMENT_METHODS", "authorize", "follow_on", "run_authorize", "run_follow_on"]

PAYMENT_METHODS: dict[str, str | None] = {
    "pm_card_ok": None,
    "pm_card_declined": "card_declined",
    "pm_card_insufficient_funds": "insufficient_funds",
}
# Raw statements, rows as named tuples in column order (see the note above references._FIND).
AUTHORIZATIONS = Rows(authorizations)
MOVEMENTS = Rows(movements)
_INSERT_AUTHORIZATION = AUTHORIZATIONS.insert()
_INSERT_MOVEMENT = MOVEMENTS.insert()
_AUTHORIZATION_LOCKED = Sql(
    f"SELECT {AUTHORIZATIONS.columns} FROM {AUTHORIZATIONS.table} WHERE id = $1",
    lock="FOR UPDATE",
)
# The prefix of the id of each follow-on operation's answer.
_ID_PREFIX = {"capture": "cap", "void": "void", "refund": "re"}


async def authorize(request: Request) -> Response:
    body, fingerprint = await parse(request, AuthorizeBody)
    return await run_authorize(simulator_of(request), body, fingerprint)


async def run_authorize(sim: Simulator, body: AuthorizeBody, fingerprint: str) -> Response:
    """An authorization, its body validated and fingerprinted (over HTTP or called directly)."""
    if body.payment_method not in PAYMENT_METHODS:
        raise Problem(
            400,
            "unknown_payment_method",
            f"payment_method must be one of {', '.join(PAYMENT_METHODS)}",
        )

    rounds = 0

    async def work() -> Response:
        # The claim first: a new reference (the usual request) needs no read before it. A
        # reference with a row loses the claim (LostRace: nothing written), and the next
        # round reads that row and answers from it.
        nonlocal rounds
        rounds += 1
        async with sim.transaction() as db:
            existing = await find(db, body.reference) if rounds > 1 else None
            if existing is not None:
                return replay(existing, fingerprint)
            return await _authorize(db, sim, body, fingerprint)

    return await sim.run("authorize", lambda: retrying(work))


async def _authorize(db: Raw, sim: Simulator, body: AuthorizeBody, fingerprint: str) -> Response:
    now = sim.clock()
    decline_code = PAYMENT_METHODS[body.payment_method]
    approved = decline_code is None
    row: AuthorizationRow = AUTHORIZATIONS.make(
        id=new_id("auth"),
        reference=body.reference,
        order_id=body.order_id or body.reference,
        payment_method=body.payment_method,
        amount=body.amount,
        currency=body.currency,
        status="approved" if approved else "declined",
        decline_code=decline_code,
        captured_amount=body.amount if approved and body.capture else 0,
        refunded_amount=0,
        voided=False,
        created_at=now,
    )
    answer = _authorization_body(row)
    document = dumps(answer)
    await claim(db, operation_row(row, "authorization", fingerprint, 201, document))
    await db.run(_INSERT_AUTHORIZATION, *row)
    if row.captured_amount:
        await _move(db, row, "capture", body.reference, row.captured_amount, now)
    return Answer(answer, 201, document)


def _authorization_body(row: AuthorizationRow) -> dict[str, Any]:
    return {
        "object": "authorization",
        "id": row.id,
        "reference": row.reference,
        "order_id": row.order_id,
        "status": row.status,
        "decline_code": row.decline_code,
        "amount": row.amount,
        "currency": row.currency,
        "captured_amount": row.captured_amount,
        "refunded_amount": row.refunded_amount,
        "voided": row.voided,
        "created_at": iso(row.created_at),
    }


async def _move(
    db: Raw,
    auth: AuthorizationRow,
    kind: str,
    reference: str,
    amount: int,
    now: float,
) -> None:
    movement = MOVEMENTS.make(
        id=new_id("mv"),
        authorization_id=auth.id,
        reference=reference,
        order_id=auth.order_id,
        type=kind,
        amount=amount,
        currency=auth.currency,
        created_at=now,
    )
    await db.run(_INSERT_MOVEMENT, *movement)


def _check(kind: str, auth: AuthorizationRow, amount: int) -> dict[str, Any]:
    """The authorization's new values after ``kind`` of ``amount``, or a problem."""
    if auth.status != "approved":
        raise Problem(409, "authorization_declined", "the authorization was declined")
    if kind == "refund":
        return _check_refund(auth, amount)
    if auth.voided:
        raise Problem(409, "authorization_voided", "the authorization was voided")
    if auth.captured_amount:
        raise Problem(409, "already_captured", "the authorization was already captured")
    if kind == "void":
        return {"voided": True}
    if amount > auth.amount:
        raise Problem(400, "amount_exceeds_authorized", f"capture at most {auth.amount}")
    return {"captured_amount": amount}


def _check_refund(auth: AuthorizationRow, amount: int) -> dict[str, Any]:
    if not auth.captured_amount:
        raise Problem(409, "not_captured", "nothing was captured on this authorization")
    refundable = auth.captured_amount - auth.refunded_amount
    if amount > refundable:
        raise Problem(409, "amount_exceeds_refundable", f"refund at most {refundable}")
    return {"refunded_amount": auth.refunded_amount + amount}


def follow_on(
    kind: Literal["capture", "void", "refund"],
) -> Callable[[Request], Awaitable[Response]]:
    """The handler of ``kind`` on the authorization named in the path."""
    model: type[AmountBody] | type[VoidBody] = VoidBody if kind == "void" else AmountBody

    async def handler(request: Request) -> Response:
        authorization_id = request.path_params["authorization_id"]
        body, fingerprint = await parse(request, model)
        sim = simulator_of(request)
        return await run_follow_on(sim, kind, authorization_id, body, fingerprint)

    return handler


async def run_follow_on(
    sim: Simulator,
    kind: Literal["capture", "void", "refund"],
    authorization_id: str,
    body: AmountBody | VoidBody,
    fingerprint: str,
) -> Response:
    """``kind`` on an authorization, its body validated and fingerprinted."""
    amount: int | None = getattr(body, "amount", None)

    async def work() -> Response:
        async with sim.transaction() as db:
            existing = await find(db, body.reference)
            if existing is not None:
                return replay(existing, fingerprint)
            return await _operate(
                db, sim, kind, authorization_id, body.reference, amount, fingerprint
            )

    return await sim.run(kind, lambda: retrying(work))


async def _operate(
    db: Raw,
    sim: Simulator,
    kind: str,
    authorization_id: str,
    reference: str,
    amount: int | None,
    fingerprint: str,
) -> Response:
    found = await db.rows(_AUTHORIZATION_LOCKED, authorization_id)
    if not found:
        raise Problem(404, "authorization_not_found", f"no authorization {authorization_id}")
    auth: AuthorizationRow = AUTHORIZATIONS.one(
        found[0], integers_as_booleans=db.integers_as_booleans
    )
    moved = auth.amount if amount is None else amount  # a void releases the whole hold
    changes = _check(kind, auth, moved)
    now = sim.clock()
    ((column, value),) = changes.items()
    await db.run(_update(column), authorization_id, value)
    after = auth._replace(**changes)
    answer = {
        "object": kind,
        "id": new_id(_ID_PREFIX[kind]),
        "reference": reference,
        "authorization_id": authorization_id,
        "order_id": auth.order_id,
        "status": "approved",
        "amount": moved,
        "currency": auth.currency,
        "created_at": iso(now),
        "authorization": _authorization_body(after),
    }
    document = dumps(answer)
    row = operation_row(
        auth, kind, fingerprint, 201, document, reference=reference, amount=moved, now=now
    )
    await claim(db, row)
    if kind != "void":
        await _move(db, auth, kind, reference, moved, now)
    return Answer(answer, 201, document)


@functools.cache
def _update(column: str) -> Sql:
    """The statement that sets one column of an authorization (each operation changes one)."""
    return Sql(f"UPDATE {AUTHORIZATIONS.table} SET {column} = $2 WHERE id = $1")
