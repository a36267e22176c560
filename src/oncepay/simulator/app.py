"""The simulated acquirer: an HTTP service with its own database, idempotent by reference.

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

Faults (:class:`Faults`) are injected on request, from flags or ``PUT /admin/faults``: latency,
5xx before doing anything, a stall *after* committing (the caller times out although the
operation happened), a connection dropped after committing, and a full outage. Their dice come
from one ``random.Random(seed)``, so a run with a seed is reproducible.

The app runs under uvicorn and in-process through ``httpx.ASGITransport``, which runs no
lifespan: the schema is therefore created lazily, once, under a lock, and idempotently across
processes (SQLite's ``BEGIN IMMEDIATE``; an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from oncepay.payments.storage.db import Database, read, write

__all__ = ["DEFAULT_DATABASE_URL", "ConnectionDropped", "Faults", "create_app"]

DEFAULT_DATABASE_URL = "sqlite:///oncepay-acquirer.db"
PROBLEM = "application/problem+json"
KEY_HEADER = "idempotency-key"
# Our bodies are a few hundred bytes; 64 KiB refuses garbage before it is parsed.
MAX_BODY = 64 * 1024
# Far above any real card payment in minor units, far below BIGINT: no overflow, ever.
MAX_AMOUNT = 10**12
# Rounds of "read, then claim" one request may lose: each loss means a winner committed, whose
# row the next round reads; more than one only when a winner rolled back its claim.
RACE_ROUNDS = 3
# Serialises schema creation across simulator processes; any fixed number will do ("acqu").
SCHEMA_LOCK = 0x61637175
PAYMENT_METHODS: dict[str, str | None] = {
    "pm_card_ok": None,
    "pm_card_declined": "card_declined",
    "pm_card_insufficient_funds": "insufficient_funds",
}

Operation = Literal["authorize", "capture", "void", "refund", "lookup", "settlements"]
Reference = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
]
Amount = Annotated[int, Field(gt=0, le=MAX_AMOUNT)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]
Rate = Annotated[float, Field(ge=0.0, le=1.0)]


class Faults(BaseModel):
    """What goes wrong, and how often. Rates are probabilities per request in [0, 1].

    ``error_rate`` answers 503 before doing anything; ``timeout_after_commit_rate`` commits,
    then stalls ``stall_seconds`` before answering; ``drop_rate`` commits, then drops the
    connection without a complete answer; ``outage`` answers 503 to everything but ``/admin``
    and ``/health``. ``operations`` limits every fault to the named operations (all if None).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: Annotated[float, Field(ge=0)] = 0.0
    latency_jitter_ms: Annotated[float, Field(ge=0)] = 0.0
    error_rate: Rate = 0.0
    timeout_after_commit_rate: Rate = 0.0
    # Longer than any sane client timeout, so a stalled answer is one nobody waits for.
    stall_seconds: Annotated[float, Field(ge=0)] = 30.0
    drop_rate: Rate = 0.0
    outage: bool = False
    operations: frozenset[Operation] | None = None

    def applies_to(self, operation: Operation) -> bool:
        return self.operations is None or operation in self.operations


class ConnectionDropped(Exception):
    """Raised on purpose after the response started: the server closes the connection."""


class _Problem(Exception):
    def __init__(self, status: int, code: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra


class _LostRace(Exception):
    """Another transaction took the reference between our read and our insert: run again."""


# --- schema -------------------------------------------------------------------------------

metadata = MetaData()
authorizations = Table(
    "acquirer_authorizations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("reference", String(255), nullable=False, unique=True),
    Column("order_id", String(255), nullable=False, index=True),
    Column("payment_method", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64)),
    Column("captured_amount", BigInteger, nullable=False),
    Column("refunded_amount", BigInteger, nullable=False),
    Column("voided", Boolean, nullable=False),
    Column("created_at", Double, nullable=False),
)
# One row per reference, whatever it names: an authorization, capture, void, refund, or a
# fence. The primary key is what makes "operation or fence, never both" race-free.
operations = Table(
    "acquirer_operations",
    metadata,
    Column("reference", String(255), primary_key=True),
    Column("type", String(16), nullable=False),  # authorization|capture|void|refund|fence
    Column("fingerprint", String(64)),
    Column("authorization_id", String(40)),
    Column("order_id", String(255), index=True),
    Column("status", String(16), nullable=False),  # approved|declined|fenced
    Column("amount", BigInteger),
    Column("currency", String(3)),
    Column("status_code", Integer),
    Column("body", Text),
    Column("created_at", Double, nullable=False),
)
# Money that moved (captures and refunds): what the settlement report lists.
movements = Table(
    "acquirer_movements",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("authorization_id", String(40), nullable=False),
    Column("reference", String(255), nullable=False),
    Column("order_id", String(255), nullable=False),
    Column("type", String(16), nullable=False),  # capture|refund
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("created_at", Double, nullable=False, index=True),
)


async def _create_schema(db: Database) -> None:
    async with write(db) as conn:  # BEGIN IMMEDIATE on SQLite: one creator at a time
        if not db.is_sqlite:
            await conn.execute(text(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"))
            if db.schema:
                await conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{db.schema}"'))
        await conn.run_sync(metadata.create_all, checkfirst=True)


# --- request bodies -----------------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthorizeBody(_Body):
    reference: Reference
    order_id: Reference | None = None  # the payment; defaults to the reference
    amount: Amount
    currency: Currency
    payment_method: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    capture: bool = False


class AmountBody(_Body):
    reference: Reference
    amount: Amount


class VoidBody(_Body):
    reference: Reference


LookupBody = VoidBody
B = TypeVar("B", bound=_Body)


async def _parse(request: Request, model: type[B]) -> tuple[B, str]:
    """The validated body and its fingerprint (canonical JSON of path and body)."""
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise _Problem(413, "request_too_large", f"bodies are at most {MAX_BODY} bytes")
    try:
        body = model.model_validate_json(raw)
    except ValidationError as exc:
        raise _Problem(400, "invalid_request", _explain(exc)) from None
    header = request.headers.get(KEY_HEADER)
    reference = getattr(body, "reference", None)
    if header is not None and header != reference:
        raise _Problem(400, "reference_mismatch", "Idempotency-Key must equal the reference")
    canonical = json.dumps(
        [request.url.path, json.loads(raw)], sort_keys=True, separators=(",", ":")
    )
    return body, hashlib.sha256(canonical.encode()).hexdigest()


def _explain(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg']}"


# --- the simulator ------------------------------------------------------------------------


class Simulator:
    """State of one simulator app: its database, faults and dice, and the schema latch."""

    def __init__(
        self, db: Database, faults: Faults, seed: int | None, clock: Callable[[], float]
    ) -> None:
        self.db = db
        self.faults = faults
        self.random = random.Random(seed)  # noqa: S311 - fault dice, not secrets
        self.clock = clock
        self._ready = False
        self._lock = asyncio.Lock()
        self._inflight: set[asyncio.Future[Response]] = set()

    async def ready(self) -> None:
        if self._ready:
            return
        async with self._lock:
            if not self._ready:
                await _create_schema(self.db)
                self._ready = True

    async def aclose(self) -> None:
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.db.aclose()

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate

    async def before(self, operation: Operation) -> None:
        """Faults that strike before anything is done: outage, latency, 5xx."""
        faults = self.faults
        if not faults.applies_to(operation):
            return
        if faults.outage:
            raise _Problem(503, "acquirer_unavailable", "the acquirer is down (outage)")
        if faults.latency_ms or faults.latency_jitter_ms:
            jitter = self.random.uniform(0, faults.latency_jitter_ms)
            await asyncio.sleep((faults.latency_ms + jitter) / 1000)
        if self._roll(faults.error_rate):
            raise _Problem(503, "injected_error", "fault injection: 503 before doing anything")

    async def after(self, operation: Operation, response: Response) -> Response:
        """Faults that strike after the commit: a stall, or a dropped connection."""
        faults = self.faults
        if not faults.applies_to(operation):
            return response
        if self._roll(faults.timeout_after_commit_rate):
            await asyncio.sleep(faults.stall_seconds)
        if self._roll(faults.drop_rate):
            return _DroppedResponse(response.body, response.status_code)
        return response

    async def run(self, operation: Operation, work: Callable[[], Awaitable[Response]]) -> Response:
        await self.before(operation)
        await self.ready()
        return await self.after(operation, await self._whole(work))

    async def _whole(self, work: Callable[[], Awaitable[Response]]) -> Response:
        """Run ``work`` to its end even if the caller gives up, as a server does when its
        client hangs up: in-process, a caller's timeout would otherwise cancel us mid-way."""
        task = asyncio.ensure_future(work())
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        return await asyncio.shield(task)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        async with write(self.db) as conn:
            yield conn

    async def retrying(self, work: Callable[[], Awaitable[Response]]) -> Response:
        """Run ``work`` (one transaction); again if it lost the race for its reference, when
        it finds the winner's row and answers from it (or claims it, if the winner rolled
        back)."""
        for _ in range(RACE_ROUNDS - 1):
            try:
                return await work()
            except _LostRace:
                continue
        return await work()


class _DroppedResponse(Response):
    """Starts the answer, then fails: uvicorn closes the connection mid-response, and
    in-process the exception reaches the caller's transport."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        raise ConnectionDropped("fault injection: connection dropped after commit")


# --- storage helpers ----------------------------------------------------------------------


async def _operation(conn: AsyncConnection, reference: str) -> RowMapping | None:
    result = await conn.execute(select(operations).where(operations.c.reference == reference))
    return result.mappings().first()


async def _claim(conn: AsyncConnection, db: Database, row: dict[str, Any]) -> None:
    """Insert the reference's row; a concurrent winner (already committed or committing)
    makes it a no-op, and we start over to answer from the winner's row."""
    dialect = postgresql if not db.is_sqlite else sqlite
    statement = dialect.insert(operations).values(**row).on_conflict_do_nothing()
    result = await conn.execute(statement)
    if result.rowcount != 1:
        raise _LostRace


def _replay(existing: RowMapping, fingerprint: str) -> Response:
    if existing["type"] == "fence":
        raise _Problem(
            409, "reference_fenced", "this reference was fenced by a look-up and cannot be used"
        )
    if existing["fingerprint"] != fingerprint:
        raise _Problem(
            422, "idempotency_key_reused", "this reference was used for a different request"
        )
    return _stored(existing)


def _stored(existing: RowMapping) -> Response:
    return Response(existing["body"], existing["status_code"], media_type="application/json")


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))


def _authorization_body(row: dict[str, Any] | RowMapping) -> dict[str, Any]:
    return {
        "object": "authorization",
        "id": row["id"],
        "reference": row["reference"],
        "order_id": row["order_id"],
        "status": row["status"],
        "decline_code": row["decline_code"],
        "amount": row["amount"],
        "currency": row["currency"],
        "captured_amount": row["captured_amount"],
        "refunded_amount": row["refunded_amount"],
        "voided": row["voided"],
        "created_at": _iso(row["created_at"]),
    }


# --- handlers -----------------------------------------------------------------------------


def _sim(request: Request) -> Simulator:
    simulator: Simulator = request.app.state.simulator
    return simulator


async def authorize(request: Request) -> Response:
    sim = _sim(request)
    body, fingerprint = await _parse(request, AuthorizeBody)
    if body.payment_method not in PAYMENT_METHODS:
        raise _Problem(
            400,
            "unknown_payment_method",
            f"payment_method must be one of {', '.join(PAYMENT_METHODS)}",
        )

    async def work() -> Response:
        async with sim.transaction() as conn:
            existing = await _operation(conn, body.reference)
            if existing is not None:
                return _replay(existing, fingerprint)
            return await _authorize(conn, sim, body, fingerprint)

    return await sim.run("authorize", lambda: sim.retrying(work))


async def _authorize(
    conn: AsyncConnection, sim: Simulator, body: AuthorizeBody, fingerprint: str
) -> Response:
    now = sim.clock()
    decline_code = PAYMENT_METHODS[body.payment_method]
    approved = decline_code is None
    row: dict[str, Any] = {
        "id": _new_id("auth"),
        "reference": body.reference,
        "order_id": body.order_id or body.reference,
        "payment_method": body.payment_method,
        "amount": body.amount,
        "currency": body.currency,
        "status": "approved" if approved else "declined",
        "decline_code": decline_code,
        "captured_amount": body.amount if approved and body.capture else 0,
        "refunded_amount": 0,
        "voided": False,
        "created_at": now,
    }
    document = _dumps(_authorization_body(row))
    await _claim(conn, sim.db, _operation_row(row, "authorization", fingerprint, 201, document))
    await conn.execute(authorizations.insert().values(**row))
    if row["captured_amount"]:
        await _move(conn, row, "capture", body.reference, row["captured_amount"], now)
    return Response(document, 201, media_type="application/json")


def _operation_row(
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


async def _move(
    conn: AsyncConnection,
    auth: dict[str, Any] | RowMapping,
    kind: str,
    reference: str,
    amount: int,
    now: float,
) -> None:
    await conn.execute(
        movements.insert().values(
            id=_new_id("mv"),
            authorization_id=auth["id"],
            reference=reference,
            order_id=auth["order_id"],
            type=kind,
            amount=amount,
            currency=auth["currency"],
            created_at=now,
        )
    )


# What each follow-on operation requires of the authorization, and what it changes.
_ID_PREFIX = {"capture": "cap", "void": "void", "refund": "re"}


def _check(kind: str, auth: RowMapping, amount: int) -> dict[str, Any]:
    """The authorization's new values after ``kind`` of ``amount``, or a problem."""
    if auth["status"] != "approved":
        raise _Problem(409, "authorization_declined", "the authorization was declined")
    if kind == "refund":
        return _check_refund(auth, amount)
    if auth["voided"]:
        raise _Problem(409, "authorization_voided", "the authorization was voided")
    if auth["captured_amount"]:
        raise _Problem(409, "already_captured", "the authorization was already captured")
    if kind == "void":
        return {"voided": True}
    if amount > auth["amount"]:
        raise _Problem(400, "amount_exceeds_authorized", f"capture at most {auth['amount']}")
    return {"captured_amount": amount}


def _check_refund(auth: RowMapping, amount: int) -> dict[str, Any]:
    if not auth["captured_amount"]:
        raise _Problem(409, "not_captured", "nothing was captured on this authorization")
    refundable = auth["captured_amount"] - auth["refunded_amount"]
    if amount > refundable:
        raise _Problem(409, "amount_exceeds_refundable", f"refund at most {refundable}")
    return {"refunded_amount": auth["refunded_amount"] + amount}


def _follow_on(
    kind: Literal["capture", "void", "refund"],
) -> Callable[[Request], Awaitable[Response]]:
    model: type[AmountBody] | type[VoidBody] = VoidBody if kind == "void" else AmountBody

    async def handler(request: Request) -> Response:
        sim = _sim(request)
        authorization_id = request.path_params["authorization_id"]
        body, fingerprint = await _parse(request, model)
        amount: int | None = getattr(body, "amount", None)

        async def work() -> Response:
            async with sim.transaction() as conn:
                existing = await _operation(conn, body.reference)
                if existing is not None:
                    return _replay(existing, fingerprint)
                return await _operate(
                    conn, sim, kind, authorization_id, body.reference, amount, fingerprint
                )

        return await sim.run(kind, lambda: sim.retrying(work))

    return handler


async def _operate(
    conn: AsyncConnection,
    sim: Simulator,
    kind: str,
    authorization_id: str,
    reference: str,
    amount: int | None,
    fingerprint: str,
) -> Response:
    query = select(authorizations).where(authorizations.c.id == authorization_id)
    auth = (await conn.execute(query.with_for_update())).mappings().first()
    if auth is None:
        raise _Problem(404, "authorization_not_found", f"no authorization {authorization_id}")
    moved = auth["amount"] if amount is None else amount  # a void releases the whole hold
    changes = _check(kind, auth, moved)
    now = sim.clock()
    await conn.execute(
        update(authorizations).where(authorizations.c.id == authorization_id).values(**changes)
    )
    after = {**auth, **changes}
    document = _dumps(
        {
            "object": kind,
            "id": _new_id(_ID_PREFIX[kind]),
            "reference": reference,
            "authorization_id": authorization_id,
            "order_id": auth["order_id"],
            "status": "approved",
            "amount": moved,
            "currency": auth["currency"],
            "created_at": _iso(now),
            "authorization": _authorization_body(after),
        }
    )
    row = _operation_row(
        auth, kind, fingerprint, 201, document, reference=reference, amount=moved, now=now
    )
    await _claim(conn, sim.db, row)
    if kind != "void":
        await _move(conn, auth, kind, reference, moved, now)
    return Response(document, 201, media_type="application/json")


async def lookup(request: Request) -> Response:
    sim = _sim(request)
    body, _ = await _parse(request, LookupBody)

    async def work() -> Response:
        async with sim.transaction() as conn:
            existing = await _operation(conn, body.reference)
            if existing is None:
                await _claim(conn, sim.db, _fence_row(body.reference, sim.clock()))
            elif existing["type"] != "fence":
                stored = _stored(existing)
                stored.status_code = 200
                return stored
        return _problem(
            404, "not_found", "no operation with this reference; it is now fenced", fenced=True
        )

    return await sim.run("lookup", lambda: sim.retrying(work))


def _fence_row(reference: str, now: float) -> dict[str, Any]:
    return {"reference": reference, "type": "fence", "status": "fenced", "created_at": now}


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SETTLEMENT_COLUMNS = [
    "authorization_id", "reference", "order_id", "type", "amount", "currency", "created_at",
]  # fmt: skip


async def settlements(request: Request) -> Response:
    sim = _sim(request)
    day = _settlement_day(request.query_params.get("date"))
    fmt = request.query_params.get("format", "json")
    if fmt not in {"json", "csv"}:
        raise _Problem(400, "invalid_format", "format must be json or csv")

    async def work() -> Response:
        entries = await _movements_on(sim.db, day)
        if fmt == "csv":
            return _csv(entries)
        return JSONResponse({"date": day.isoformat(), "entries": entries})

    await sim.before("settlements")  # a read: nothing commits, so no after-commit faults
    await sim.ready()
    return await work()


def _settlement_day(value: str | None) -> date:
    if value is None or not _DATE.match(value):
        raise _Problem(400, "invalid_date", "date must be YYYY-MM-DD (a UTC day)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _Problem(400, "invalid_date", f"{value} is not a calendar date") from None


async def _movements_on(db: Database, day: date) -> list[dict[str, Any]]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    end = start + timedelta(days=1).total_seconds()
    query = (
        select(*(movements.c[name] for name in SETTLEMENT_COLUMNS))
        .where(movements.c.created_at >= start, movements.c.created_at < end)
        .order_by(movements.c.created_at, movements.c.reference)
    )
    async with read(db) as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [{**row, "created_at": _iso(row["created_at"])} for row in rows]


def _csv(entries: list[dict[str, Any]]) -> Response:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    return Response(out.getvalue(), media_type="text/csv")


async def get_faults(request: Request) -> Response:
    return JSONResponse(_sim(request).faults.model_dump(mode="json"))


async def put_faults(request: Request) -> Response:
    try:
        faults = Faults.model_validate_json(await request.body())
    except ValidationError as exc:
        raise _Problem(400, "invalid_request", _explain(exc)) from None
    _sim(request).faults = faults
    return JSONResponse(faults.model_dump(mode="json"))


async def list_operations(request: Request) -> Response:
    sim = _sim(request)
    await sim.ready()
    query = select(operations).order_by(operations.c.created_at, operations.c.reference)
    order_id = request.query_params.get("order_id")
    if order_id is not None:
        query = query.where(operations.c.order_id == order_id)
    async with read(sim.db) as conn:
        rows = (await conn.execute(query)).mappings().all()
    return JSONResponse({"operations": [_operation_summary(row) for row in rows]})


def _operation_summary(row: RowMapping) -> dict[str, Any]:
    keys = ("reference", "type", "authorization_id", "order_id", "status", "amount", "currency")
    return {**{key: row[key] for key in keys}, "created_at": _iso(row["created_at"])}


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


# --- problems and the app -----------------------------------------------------------------


def _problem(status: int, code: str, detail: str, **extra: Any) -> Response:
    document = {"type": f"urn:oncepay:problem:{code}", "status": status, "code": code}
    document |= {"detail": detail, **extra}
    return JSONResponse(document, status, media_type=PROBLEM)


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _Problem)
    return _problem(exc.status, exc.code, exc.detail, **exc.extra)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return _problem(exc.status_code, code, str(exc.detail))


def create_app(
    database_url: str = DEFAULT_DATABASE_URL,
    faults: Faults | None = None,
    seed: int | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The simulated acquirer as an ASGI app over its own database (see the module doc).

    ``app.state.simulator`` holds its state; ``await app.state.simulator.aclose()`` releases
    the database when the app ran in-process (under uvicorn the lifespan does it)."""
    simulator = Simulator(Database.from_url(database_url), faults or Faults(), seed, clock)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await simulator.aclose()

    prefix = "/v1/authorizations/{authorization_id}"
    app = Starlette(
        routes=[
            Route("/v1/authorizations", authorize, methods=["POST"]),
            Route(f"{prefix}/capture", _follow_on("capture"), methods=["POST"]),
            Route(f"{prefix}/void", _follow_on("void"), methods=["POST"]),
            Route(f"{prefix}/refunds", _follow_on("refund"), methods=["POST"]),
            Route("/v1/lookups", lookup, methods=["POST"]),
            Route("/v1/settlements", settlements, methods=["GET"]),
            Route("/admin/faults", get_faults, methods=["GET"]),
            Route("/admin/faults", put_faults, methods=["PUT"]),
            Route("/admin/operations", list_operations, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={_Problem: _on_problem, HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.state.simulator = simulator
    return app
