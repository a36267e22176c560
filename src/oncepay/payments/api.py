"""The payments HTTP API (SPEC §5): FastAPI routes over :class:`Services`.

Every error is an RFC 9457 problem with a stable ``code``, mapped in one place from OncePay's
exception tree, FastAPI's validation errors and Starlette's HTTP errors. Every POST needs an
``Idempotency-Key``; the key is scoped to the authenticated merchant.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from oncepay import __version__
from oncepay.errors import OncePayError, RequestTooLarge
from oncepay.http._gate import DEFAULT_MAX_BODY
from oncepay.http._gate import Request as GateRequest
from oncepay.http.problems import PROBLEM_CONTENT_TYPE
from oncepay.payments import models
from oncepay.payments.db import read
from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.events import is_id
from oncepay.payments.metrics import REGISTRY, REQUESTS
from oncepay.payments.models import payment_public, refund_public
from oncepay.payments.operations import Cancel, Capture, CreatePayment, CreateRefund
from oncepay.payments.phases import Operation, Reply
from oncepay.payments.recovery import run_worker
from oncepay.payments.schema import events, payments, refunds
from oncepay.payments.service import Merchant, Services, get_object
from oncepay.payments.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("oncepay.payments")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# Stripe's default page is 10 and its ceiling 100; so are ours.
DEFAULT_LIMIT = 10
MAX_LIMIT = 100

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {
        "model": models.Problem,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": description,
    }
    for status, description in {
        400: "Malformed request or Idempotency-Key",
        401: "Missing or invalid API key",
        404: "No such object (or another merchant's)",
        409: "Invalid state transition, or the key's first request is still running",
        413: "Request body too large",
        422: "Idempotency-Key reused with a different request",
        503: "Acquirer outcome unknown or store unavailable: retry with the same key",
    }.items()
}
KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "1-255 printable ASCII characters; a token or an RFC 8941 sf-string.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


def problem_response(error: OncePayError) -> Response:
    return _send(Reply.problem(error))


def _send(reply: Reply) -> Response:
    response = Response(reply.body, reply.status)
    for name, value in reply.headers:
        if name.lower() != "content-length":
            response.headers.append(name, value)
    return response


# -- dependencies --------------------------------------------------------------------------------


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


Credentials = Annotated[Any, Security(bearer)]  # documents bearer auth in the OpenAPI


async def _merchant(request: Request, services: ServicesDep, credentials: Credentials) -> Merchant:
    return await services.authenticate(request.headers.get("authorization"))


MerchantDep = Annotated[Merchant, Depends(_merchant)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


def _known_query_only(request: Request) -> None:
    """Unknown query parameters are refused, like unknown body fields (Stripe does the same):
    a misspelt ``limt=5`` must not silently mean the default."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {param.alias for param in _all_query_params(dependant)}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}")


def _all_query_params(dependant: Any) -> list[Any]:
    found = list(dependant.query_params)
    for sub in dependant.dependencies:
        found.extend(_all_query_params(sub))
    return found


async def _idempotent(
    request: Request, services: Services, merchant: Merchant, op: Operation
) -> Response:
    gate_request = GateRequest(
        request.method,
        request.url.path,
        request.url.query,
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
    )
    body = await request.body()
    return _send(await services.idempotent(gate_request, body, merchant, op))


# -- routes --------------------------------------------------------------------------------------


def _routes(app: FastAPI) -> None:
    post: dict[str, Any] = {"responses": PROBLEMS, "openapi_extra": {"parameters": [KEY_HEADER]}}

    @app.post("/v1/payments", status_code=201, response_model=models.Payment, **post)
    async def create_payment(
        body: models.PaymentCreate, request: Request, services: ServicesDep, merchant: MerchantDep
    ) -> Response:
        """Authorize a payment, and capture it when `capture_method` is `automatic`."""
        return await _idempotent(request, services, merchant, CreatePayment(body))

    @app.post("/v1/payments/{payment_id}/capture", response_model=models.Payment, **post)
    async def capture_payment(
        payment_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.CaptureRequest | None = None,
    ) -> Response:
        """Capture an authorized payment, all of it or `amount` (at most the authorized)."""
        amount = body.amount if body else None
        return await _idempotent(request, services, merchant, Capture(payment_id, amount))

    @app.post("/v1/payments/{payment_id}/cancel", response_model=models.Payment, **post)
    async def cancel_payment(
        payment_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.CancelRequest | None = None,
    ) -> Response:
        """Void an authorization: the held money is released."""
        return await _idempotent(request, services, merchant, Cancel(payment_id))

    @app.post(
        "/v1/payments/{payment_id}/refunds", status_code=201, response_model=models.Refund, **post
    )
    async def create_refund(
        payment_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.RefundCreate | None = None,
    ) -> Response:
        """Refund captured money: `amount`, or all that is left."""
        amount = body.amount if body else None
        return await _idempotent(request, services, merchant, CreateRefund(payment_id, amount))

    @app.get("/v1/payments/{payment_id}", response_model=models.Payment, responses=PROBLEMS)
    async def get_payment(payment_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        return payment_public(await get_object(services.db, payments, payment_id, merchant.id))

    @app.get("/v1/payments", response_model=models.PaymentList, responses=PROBLEMS)
    async def list_payments(
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
    ) -> Any:
        """Newest first; pass the last id you saw as `starting_after` for the next page."""
        rows, more = await _page(services, payments, merchant.id, limit, starting_after)
        return {"object": "list", "data": [payment_public(r) for r in rows], "has_more": more}

    @app.get("/v1/payments/{payment_id}/refunds", response_model=list[models.Refund],
             responses=PROBLEMS)  # fmt: skip
    async def list_refunds(payment_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        await get_object(services.db, payments, payment_id, merchant.id)
        async with read(services.db) as conn:
            rows = await conn.execute(
                select(refunds).where(refunds.c.payment_id == payment_id).order_by(refunds.c.seq)
            )
            return [refund_public(r) for r in rows]

    @app.get("/v1/refunds/{refund_id}", response_model=models.Refund, responses=PROBLEMS)
    async def get_refund(refund_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        return refund_public(await get_object(services.db, refunds, refund_id, merchant.id))

    @app.get("/v1/events", response_model=models.EventList, responses=PROBLEMS)
    async def list_events(
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
        type: Annotated[str | None, Query(pattern=r"^[a-z_]+\.[a-z_]+$", max_length=64)] = None,
    ) -> Any:
        """Newest first, optionally of one `type` (e.g. `payment.captured`)."""
        where = [events.c.type == type] if type else []
        rows, more = await _page(services, events, merchant.id, limit, starting_after, where)
        return {"object": "list", "data": [_event(r) for r in rows], "has_more": more}

    @app.get("/v1/events/{event_id}", response_model=models.Event, responses=PROBLEMS)
    async def get_event(event_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        return _event(await get_object(services.db, events, event_id, merchant.id))

    @app.get("/health")
    async def health(services: ServicesDep) -> dict[str, str]:
        async with read(services.db) as conn:
            await conn.execute(select(1))
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def _event(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "event",
        "type": row.type,
        "created": int(row.created_at),
        "data": {"object": json.loads(row.data)},
    }


async def _page(
    services: Services,
    table: Any,
    merchant_id: str,
    limit: int,
    starting_after: str | None,
    where: list[Any] | None = None,
) -> tuple[list[Any], bool]:
    """One page, newest first, by the table's sequence number; one extra row says has_more."""
    query = select(table).where(table.c.merchant_id == merchant_id, *(where or []))
    if starting_after is not None and not is_id(starting_after):
        raise InvalidRequest(f"starting_after: no object {starting_after!r}")
    async with read(services.db) as conn:
        if starting_after is not None:
            cursor = (
                await conn.execute(
                    select(table.c.seq).where(
                        table.c.id == starting_after, table.c.merchant_id == merchant_id
                    )
                )
            ).scalar()
            if cursor is None:
                raise InvalidRequest(f"starting_after: no object {starting_after!r}")
            query = query.where(table.c.seq < cursor)
        rows = list(await conn.execute(query.order_by(table.c.seq.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


# -- errors --------------------------------------------------------------------------------------


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(OncePayError)
    async def oncepay_error(request: Request, exc: OncePayError) -> Response:
        return problem_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return problem_response(InvalidRequest(_describe(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error: OncePayError
        if exc.status_code == 404:
            error = ResourceMissing(f"no route {request.url.path}")
        else:
            error = InvalidRequest(str(exc.detail))
            error.status = exc.status_code
            error.code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        response = problem_response(error)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(OncePayError("an unexpected error; nothing was changed"))


_HTTP_CODES = {405: "method_not_allowed", 406: "not_acceptable", 415: "unsupported_media_type"}


def _describe(errors: Any) -> str:
    parts = []
    for error in errors:
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"


# -- ASGI layers ---------------------------------------------------------------------------------


class BodyLimit:
    """413 for a body larger than ``limit``, declared or streamed, before the app sees any of
    it. The body is read here in full (payment requests are small) and handed on in one
    message, so a refusal never happens half-way through the app's own reading."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its body arrived: nothing to do
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(f"request body exceeds the limit of {self.limit} bytes")
        await problem_response(error)(scope, receive, send)


class RequestMetrics:
    """Counts answers by route template (not raw path: ids would explode the label space)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            REQUESTS.labels(route, scope["method"], str(status[0])).inc()


# -- the app -------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None, *, services: Services | None = None) -> FastAPI:
    """The payments API. With ``services`` the caller owns them (tests); otherwise the app
    starts its own from ``settings`` when it starts, and closes them when it stops."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = services or await Services.start(settings)
        app.state.services = running
        stop = asyncio.Event()
        worker = asyncio.create_task(run_worker(running, stop)) if settings.run_worker else None
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                await worker
            if services is None:
                await running.aclose()

    app = FastAPI(
        dependencies=[Depends(_known_query_only)],
        title="OncePay payments API",
        version=__version__,
        description="Exactly-once payments: every POST takes an Idempotency-Key.",
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    _routes(app)
    _handlers(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)
    return app
