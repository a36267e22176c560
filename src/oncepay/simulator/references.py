"""References: what makes the simulated acquirer idempotent, and the fencing look-up.

Every money-moving request names its ``reference`` (the ``Idempotency-Key`` header, repeated in
the body). The first request with a reference runs and its answer is stored with it, in the
same transaction as its effects; the same request again answers the stored status and body
byte for byte and creates nothing; the same reference with another body is refused (422).

``POST /v1/lookups`` is the fencing look-up of :mod:`oncepay.payments.acquirers.base`: it
answers the stored answer of the operation named by the reference, or, when there is none,
records the reference as *fenced* in the same transaction and answers 404. Because the
operation and the fence claim one primary key (``acquirer_operations.reference``), exactly one
of them wins, whatever the interleaving: a request that arrives after the fence is refused
(409 ``reference_fenced``) and can never authorize.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from starlette.requests import Request
from starlette.responses import Response

from oncepay.simulator.bodies import LookupBody, parse
from oncepay.simulator.problems import Problem, problem
from oncepay.simulator.schema import AuthorizationRow, OperationRow, operations
from oncepay.simulator.state import Simulator, simulator_of
from oncepay.storage.raw import Raw, Rows, Sql

__all__ = [
    "LostRace",
    "claim",
    "find",
    "lookup",
    "operation_row",
    "replay",
    "retrying",
    "run_lookup",
]

# Rounds of "read, then claim" one request may lose: each loss means a winner committed, whose
# row the next round reads; more than one only when a winner rolled back its claim.
RACE_ROUNDS = 3


class LostRace(Exception):
    """Another transaction took the reference between our read and our insert: run again."""


# The statements of every money move, on the raw driver in the transaction's own connection
# (storage/raw.py): through SQLAlchemy Core, even built once and found in its compile cache,
# they cost more CPU than the database's work (bench/e2e/PROFILE.md). A row is a named tuple
# in the table's column order, which is also the order of each insert's values.
OPERATIONS = Rows(operations)
_FIND = Sql(f"SELECT {OPERATIONS.columns} FROM {OPERATIONS.table} WHERE reference = $1")
# A concurrent winner's row (committed, or committing: PostgreSQL waits for it) makes the
# insert a no-op, which RETURNING tells apart on both databases.
_CLAIM = OPERATIONS.insert("ON CONFLICT DO NOTHING RETURNING reference")


async def find(db: Raw, reference: str) -> OperationRow | None:
    found = await db.rows(_FIND, reference)
    if not found:
        return None
    row: OperationRow = OPERATIONS.one(found[0], integers_as_booleans=db.integers_as_booleans)
    return row


async def claim(db: Raw, row: OperationRow) -> None:
    """Insert the reference's row; a concurrent winner (already committed or committing)
    makes it a no-op, and we start over to answer from the winner's row."""
    if not await db.rows(_CLAIM, *row):
        raise LostRace


async def retrying(work: Callable[[], Awaitable[Response]]) -> Response:
    """Run ``work`` (one transaction); again if it lost the race for its reference, when it
    finds the winner's row and answers from it (or claims it, if the winner rolled back)."""
    for _ in range(RACE_ROUNDS - 1):
        try:
            return await work()
        except LostRace:
            continue
    return await work()


def replay(existing: OperationRow, fingerprint: str) -> Response:
    if existing.type == "fence":
        raise Problem(
            409, "reference_fenced", "this reference was fenced by a look-up and cannot be used"
        )
    if existing.fingerprint != fingerprint:
        raise Problem(
            422, "idempotency_key_reused", "this reference was used for a different request"
        )
    return _stored(existing)


def _stored(existing: OperationRow) -> Response:
    """The answer stored with an operation (a fence has none: its callers tell them apart)."""
    return Response(existing.body, cast(int, existing.status_code), media_type="application/json")


def operation_row(
    auth: AuthorizationRow,
    kind: str,
    fingerprint: str,
    status_code: int,
    document: str,
    *,
    reference: str | None = None,
    amount: int | None = None,
    now: float | None = None,
) -> OperationRow:
    """The ``acquirer_operations`` row of an operation on ``auth``, with its stored answer."""
    row: OperationRow = OPERATIONS.make(
        reference=reference or auth.reference,
        type=kind,
        fingerprint=fingerprint,
        authorization_id=auth.id,
        order_id=auth.order_id,
        status=auth.status if kind == "authorization" else "approved",
        amount=auth.amount if amount is None else amount,
        currency=auth.currency,
        status_code=status_code,
        body=document,
        created_at=auth.created_at if now is None else now,
    )
    return row


async def lookup(request: Request) -> Response:
    body, _ = await parse(request, LookupBody)
    return await run_lookup(simulator_of(request), body)


async def run_lookup(sim: Simulator, body: LookupBody) -> Response:
    """The fencing look-up of ``body.reference`` (over HTTP or called directly)."""

    async def work() -> Response:
        async with sim.transaction() as db:
            existing = await find(db, body.reference)
            if existing is None:
                await claim(db, _fence_row(body.reference, sim.clock()))
            elif existing.type != "fence":
                stored = _stored(existing)
                stored.status_code = 200
                return stored
        return problem(
            404, "not_found", "no operation with this reference; it is now fenced", fenced=True
        )

    return await sim.run("lookup", lambda: retrying(work))


def _fence_row(reference: str, now: float) -> OperationRow:
    row: OperationRow = OPERATIONS.make(
        reference=reference,
        type="fence",
        fingerprint=None,
        authorization_id=None,
        order_id=None,
        status="fenced",
        amount=None,
        currency=None,
        status_code=None,
        body=None,
        created_at=now,
    )
    return row
