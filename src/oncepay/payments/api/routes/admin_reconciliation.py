"""The operator API of reconciliation (SPEC §10, §11; docs/reconciliation.md "Operator API"),
behind the operator token: runs and discrepancies listed under filters and read one by one
with their evidence, discrepancies resolved or accepted with a note, and a run started for an
acquirer's day.

Every POST takes an ``Idempotency-Key`` (scoped to the operator, never to a merchant): a
retry replays the first answer; closing a discrepancy that is closed already, under another
key, is a 409 ``discrepancy_closed`` that says how and why it was closed."""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal

from fastapi import Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.errors import ClientError, LeaseLost, RetryableError
from oncepay.idempotency.engine import Ticket
from oncepay.payments.api.deps import (
    DEFAULT_LIMIT,
    POST,
    PROBLEMS,
    Limit,
    ServicesDep,
    gate_request,
    idempotent_local,
    resource_router,
    send,
)
from oncepay.payments.context import Services
from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.idempotent import gated
from oncepay.payments.records import Merchant
from oncepay.payments.reply import Reply
from oncepay.reconciliation import queries
from oncepay.reconciliation.matcher import EARLIEST_DAY, MAX_GRACE_DAYS
from oncepay.reconciliation.records import Kind

__all__ = ["OPERATOR", "router"]

router = resource_router("/v1/admin/reconciliation", operator=True)

# The operator's requests are keyed in a scope of their own: no merchant id looks like this.
OPERATOR = Merchant("operator", "operator")
MAX_NOTE = 2000
MAX_ID = 2**63 - 1  # a discrepancy id is a 64-bit integer in the database

_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _says_something(note: str) -> bool:
    """Whether a note has a character a person can read: not only spaces, nor invisible
    format or control characters (a zero-width space passed ``str.strip``)."""
    return any(not c.isspace() and unicodedata.category(c) not in {"Cf", "Cc"} for c in note)


def _iso_day(value: object) -> object:
    """A day filter as the docs spell it: pydantic alone takes ``2026-12-07T00:00:00``, a Unix
    time or ``20261207`` for a date too."""
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError(f"{value!r} is not a day YYYY-MM-DD")
    return value


Day = Annotated[
    date | None,
    BeforeValidator(_iso_day),
    Query(description="A UTC day, YYYY-MM-DD (inclusive)."),
]
# No NUL: PostgreSQL refuses one in text, so it never names anything (a 400, not a 500).
NO_NUL = r"^[^\x00]*$"
Name = Annotated[str | None, Query(min_length=1, max_length=255, pattern=NO_NUL)]


class DiscrepancyClosed(ClientError):
    status = 409
    code = "discrepancy_closed"
    title = "The discrepancy was closed already"


class CloseDiscrepancy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    note: Annotated[
        str,
        StringConstraints(min_length=1, max_length=MAX_NOTE, pattern=NO_NUL),
        Field(description="Why: what was done, or why the difference is accepted."),
    ]


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    acquirer: Literal["primary", "secondary"] = "primary"
    day: Annotated[
        str | None, Field(description="The UTC day YYYY-MM-DD to reconcile (default: today).")
    ] = None
    grace_days: Annotated[int, Field(ge=0, le=MAX_GRACE_DAYS)] = 3


def _days(day_from: date | None, day_to: date | None) -> None:
    if day_from is not None and day_to is not None and day_from > day_to:
        raise InvalidRequest(f"day_from {day_from} is after day_to {day_to}")


def run_public(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "reconciliation_run", **row}


def discrepancy_public(row: dict[str, Any]) -> dict[str, Any]:
    return {"object": "reconciliation_discrepancy", **row}


# -- runs ----------------------------------------------------------------------------------------


@router.get("/runs", responses=PROBLEMS)
async def list_runs(
    services: ServicesDep,
    acquirer: Name = None,
    day_from: Day = None,
    day_to: Day = None,
    limit: Limit = DEFAULT_LIMIT,
    starting_after: Name = None,
) -> dict[str, Any]:
    """Runs, newest first; `acquirer`, `day_from`, `day_to` narrow them."""
    _days(day_from, day_to)
    where = queries.RunFilter(acquirer, day_from, day_to)
    found = await queries.run_page(services.db, where, limit, starting_after)
    if found is None:
        raise InvalidRequest(f"starting_after: no run {starting_after!r}")
    rows, more = found
    return {"object": "list", "data": [run_public(r) for r in rows], "has_more": more}


@router.get("/runs/{run_id}", responses=PROBLEMS)
async def get_run(run_id: str, services: ServicesDep) -> dict[str, Any]:
    """One run, with how the discrepancies it opened stand now (`opened` by status)."""
    row = None if "\x00" in run_id else await queries.run(services.db, run_id)
    if row is None:
        raise ResourceMissing(f"no reconciliation run {run_id!r}")
    return run_public(row)


@router.post("/runs", status_code=201, **POST)
async def start_run(body: StartRun, request: Request, services: ServicesDep) -> Response:
    """Reconcile an acquirer's day now (the worker does it on its schedule): the report is
    fetched, matched, the run and its new discrepancies kept, settlements posted and orphaned
    authorizations voided. Running a day again changes nothing."""
    day = _run_day(body.day)
    names = {acquirer.name for acquirer in services.acquirers}
    if body.acquirer not in names:
        raise InvalidRequest(f"acquirer {body.acquirer!r} is not configured here")

    async def execute(ticket: Ticket) -> Reply:
        return await _run_keyed(services, ticket, body.acquirer, day, body.grace_days)

    raw = await request.body()
    return send(await gated(services, gate_request(request), raw, OPERATOR, execute), request)


def _run_day(value: str | None) -> date:
    today = datetime.now(UTC).date()
    if value is None:
        return today
    try:  # fromisoformat takes 20261207 too: the docs say YYYY-MM-DD, and so does this
        day = date.fromisoformat(value) if _ISO_DAY.fullmatch(value) else None
    except ValueError:
        day = None
    if day is None:
        raise InvalidRequest(f"day {value!r} is not a day YYYY-MM-DD")
    if day > today:
        raise InvalidRequest(f"day {value} is in the future: nothing has settled yet")
    if day < EARLIEST_DAY:
        raise InvalidRequest(f"day {value} is before {EARLIEST_DAY}: no report goes back so far")
    return day


async def _run_keyed(
    services: Services, ticket: Ticket, acquirer: str, day: date, grace_days: int
) -> Reply:
    """The run, its answer stored under the key; a retryable failure gives the key up."""
    try:
        result = await queries.observed(services, acquirer, day=day, grace_days=grace_days)
        reply = Reply.json(201, queries.result_document(result))
    except ClientError as exc:
        reply = Reply.problem(exc)
    except LeaseLost as exc:
        return Reply.problem(exc)
    except RetryableError as exc:
        await services.engine.release(ticket)
        return Reply.problem(exc)
    await services.engine.complete(ticket, reply.stored())
    return replace(reply, completed=True)


# -- discrepancies -------------------------------------------------------------------------------


@router.get("/discrepancies", responses=PROBLEMS)
async def list_discrepancies(
    services: ServicesDep,
    kind: Kind | None = None,
    status: Literal["open", "resolved", "accepted"] | None = None,
    acquirer: Name = None,
    payment_id: Name = None,
    reference: Name = None,
    day_from: Day = None,
    day_to: Day = None,
    limit: Limit = DEFAULT_LIMIT,
    starting_after: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
) -> dict[str, Any]:
    """Discrepancies, newest first, narrowed by `kind`, `status`, `acquirer`, `payment_id`,
    `reference` and the day of the run that opened them (`day_from`, `day_to`)."""
    _days(day_from, day_to)
    where = queries.DiscrepancyFilter(
        kind.value if kind else None, status, acquirer, payment_id, reference, day_from, day_to
    )
    rows, more = await queries.discrepancy_page(services.db, where, limit, starting_after)
    return {"object": "list", "data": [discrepancy_public(r) for r in rows], "has_more": more}


@router.get("/discrepancies/{discrepancy_id}", responses=PROBLEMS)
async def get_discrepancy(discrepancy_id: str, services: ServicesDep) -> dict[str, Any]:
    """One discrepancy with its evidence: the run that opened it, the payment it names and the
    settlement booked under its reference."""
    number = _discrepancy_id(discrepancy_id)
    row = await queries.discrepancy(services.db, number)
    if row is None:
        raise ResourceMissing(f"no discrepancy {discrepancy_id!r}")
    return {**discrepancy_public(row), "evidence": await queries.evidence(services.db, row)}


def _discrepancy_id(value: str) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > 18 or int(value) < 1:
        raise ResourceMissing(f"no discrepancy {value!r}")
    return int(value)


@router.post("/discrepancies/{discrepancy_id}/resolve", **POST)
async def resolve(
    discrepancy_id: str, body: CloseDiscrepancy, request: Request, services: ServicesDep
) -> Response:
    """Close it as resolved: the difference was corrected (say how in `note`)."""
    return await _close(request, services, discrepancy_id, "resolved", body.note)


@router.post("/discrepancies/{discrepancy_id}/accept", **POST)
async def accept(
    discrepancy_id: str, body: CloseDiscrepancy, request: Request, services: ServicesDep
) -> Response:
    """Close it as accepted: the difference stands (say why in `note`)."""
    return await _close(request, services, discrepancy_id, "accepted", body.note)


async def _close(
    request: Request, services: Services, discrepancy_id: str, status: str, note: str
) -> Response:
    number = _discrepancy_id(discrepancy_id)
    if not _says_something(note):
        raise InvalidRequest("note: say what was done or why it is accepted (not blank)")

    async def work(conn: AsyncConnection) -> Reply:
        try:
            row = await queries.close_in(conn, number, status, note, now=time.time())
        except queries.DiscrepancyClosed as exc:
            closed = exc.row
            raise DiscrepancyClosed(
                f"discrepancy {number} was {closed['status']} already "
                f"(note: {closed['note']!r}); nothing changed"
            ) from None
        if row is None:
            raise ResourceMissing(f"no discrepancy {discrepancy_id!r}")
        return Reply.json(200, discrepancy_public(row))

    response = await idempotent_local(request, services, OPERATOR, work)
    if response.status_code == 200:
        await queries.observe_open(services.db)
    return response
