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
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from oncepay.simulator.bodies import LookupBody, parse
from oncepay.simulator.problems import Problem, problem
from oncepay.simulator.schema import operations
from oncepay.simulator.state import Simulator, simulator_of

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


# Statements built once, their values bound at each call: SQLAlchemy then compiles each once
# and finds it in its cache by a key it computed once, where a statement built per call costs
# its construction and its cache key every time (most of an authorization's CPU).
_FIND = select(operations).where(operations.c.reference == bindparam("reference"))
_CLAIM = {
    True: sqlite.insert(operations).on_conflict_do_nothing(),
    False: postgresql.insert(operations).on_conflict_do_nothing(),
}


async def find(conn: AsyncConnection, reference: str) -> RowMapping | None:
    result = await conn.execute(_FIND, {"reference": reference})
    return result.mappings().first()


async def claim(conn: AsyncConnection, sim: Simulator, row: dict[str, Any]) -> None:
    """Insert the reference's row; a concurrent winner (already committed or committing)
    makes it a no-op, and we start over to answer from the winner's row."""
    result = await conn.execute(_CLAIM[sim.db.is_sqlite], row)
    if result.rowcount != 1:
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


def replay(existing: RowMapping, fingerprint: str) -> Response:
    if existing["type"] == "fence":
        raise Problem(
            409, "reference_fenced", "this reference was fenced by a look-up and cannot be used"
        )
    if existing["fingerprint"] != fingerprint:
        raise Problem(
            422, "idempotency_key_reused", "this reference was used for a different request"
        )
    return _stored(existing)


def _stored(existing: RowMapping) -> Response:
    return Response(existing["body"], existing["status_code"], media_type="application/json")


def operation_row(
    auth: dict[str, Any] | RowMapping,
    kind: str,
    fingerprint: str,
    status_code: int,
    document: str,
    *,
    reference: str | None = None,
    amount: int | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The ``acquirer_operations`` row of an operation on ``auth``, with its stored answer."""
    return {
        "reference": reference or auth["reference"],
        "type": kind,
        "fingerprint": fingerprint,
        "authorization_id": auth["id"],
        "order_id": auth["order_id"],
        "status": auth["status"] if kind == "authorization" else "approved",
        "amount": auth["amount"] if amount is None else amount,
        "currency": auth["currency"],
        "status_code": status_code,
        "body": document,
        "created_at": auth["created_at"] if now is None else now,
    }


async def lookup(request: Request) -> Response:
    body, _ = await parse(request, LookupBody)
    return await run_lookup(simulator_of(request), body)


async def run_lookup(sim: Simulator, body: LookupBody) -> Response:
    """The fencing look-up of ``body.reference`` (over HTTP or called directly)."""

    async def work() -> Response:
        async with sim.transaction() as conn:
            existing = await find(conn, body.reference)
            if existing is None:
                await claim(conn, sim, _fence_row(body.reference, sim.clock()))
            elif existing["type"] != "fence":
                stored = _stored(existing)
                stored.status_code = 200
                return stored
        return problem(
            404, "not_found", "no operation with this reference; it is now fenced", fenced=True
        )

    return await sim.run("lookup", lambda: retrying(work))


def _fence_row(reference: str, now: float) -> dict[str, Any]:
    return {"reference": reference, "type": "fence", "status": "fenced", "created_at": now}
