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
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from oncepay import __version__
from oncepay.errors import OncePayError, RequestTooLarge
from oncepay.http._gate import DEFAULT_MAX_BODY
from oncepay.payments import bootstrap, models, routes_webhooks
from oncepay.payments.context import Services
from oncepay.payments.db import read
from oncepay.payments.deps import (
    DEFAULT_LIMIT,
    KEY_HEADER,
    PROBLEMS,
    Limit,
    MerchantDep,
    ServicesDep,
    idempotent,
    known_query_only,
    problem_response,
)
from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.jsonbody import StrictJsonRoute
from oncepay.payments.metrics import REQUESTS, exposition
from oncepay.payments.models import payment_public, refund_public
from oncepay.payments.operations import Cancel, Capture, CreatePayment, CreateRefund
from oncepay.payments.reads import get_object, page
from oncepay.payments.recovery import run_worker
from oncepay.payments.schema import events, payments, refunds
from oncepay.payments.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("oncepay.payments")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# -- routes --------------------------------------------------------------------------------------


def _routes(app: FastAPI) -> None:
    post: dict[str, Any] = {"responses": PROBLEMS, "openapi_extra": {"parameters": [KEY_HEADER]}}

    @app.post("/v1/payments", status_code=201, response_model=models.Payment, **post)
    async def create_payment(
        body: models.PaymentCreate, request: Request, services: ServicesDep, merchant: MerchantDep
    ) -> Response:
        """Authorize a payment, and capture it when `capture_method` is `automatic`."""
        return await idempotent(request, services, merchant, CreatePayment(body))

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
        return await idempotent(request, services, merchant, Capture(payment_id, amount))

    @app.post("/v1/payments/{payment_id}/cancel", response_model=models.Payment, **post)
    async def cancel_payment(
        payment_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.CancelRequest | None = None,
    ) -> Response:
        """Void an authorization: the held money is released."""
        return await idempotent(request, services, merchant, Cancel(payment_id))

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
        return await idempotent(request, services, merchant, CreateRefund(payment_id, amount))

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
        rows, more = await page(services.db, payments, merchant.id, limit, starting_after)
        return {"object": "list", "data": [payment_public(r) for r in rows], "has_more": more}

    @app.get("/v1/payments/{payment_id}/refunds", response_model=models.RefundList,
             responses=PROBLEMS)  # fmt: skip
    async def list_refunds(
        payment_id: str,
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
    ) -> Any:
        """The payment's refunds, newest first, paged like every list."""
        await get_object(services.db, payments, payment_id, merchant.id)
        where = [refunds.c.payment_id == payment_id]
        rows, more = await page(services.db, refunds, merchant.id, limit, starting_after, where)
        return {"object": "list", "data": [refund_public(r) for r in rows], "has_more": more}

    @app.get("/v1/refunds/{refund_id}", response_model=models.Refund, responses=PROBLEMS)
    async def get_refund(refund_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        return refund_public(await get_object(services.db, refunds, refund_id, merchant.id))

    @app.get("/v1/events", response_model=models.EventList, responses=PROBLEMS)
    async def list_events(
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
        type: models.KnownEventType | None = None,
    ) -> Any:
        """Newest first, optionally of one `type` (e.g. `payment.captured`)."""
        where = [events.c.type == type] if type else []
        rows, more = await page(services.db, events, merchant.id, limit, starting_after, where)
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
        return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


def _event(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "event",
        "type": row.type,
        "created": int(row.created_at),
        "data": {"object": json.loads(row.data)},
    }


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
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path, and the
            # path may have several (GET and POST /v1/payments are two routes).
            response.headers["allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(OncePayError("an unexpected error; nothing was changed"))


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (HEAD wherever GET is)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


_HTTP_CODES = {405: "method_not_allowed", 406: "not_acceptable", 415: "unsupported_media_type"}


def _describe(errors: Any) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":  # jsonbody.loads wrote the sentence
            parts.append(f"body: {error.get('ctx', {}).get('error', 'malformed JSON')}")
            continue
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


class HeadAsGet:
    """HEAD on any GET route, as HTTP requires: the request is routed (and authenticated) as a
    GET and answered with the GET's status and headers, ``Content-Length`` included, and no
    body. Done once here instead of a second route per GET, which would double the OpenAPI
    document."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # a streamed body: nothing is sent until its last message
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # A copy: the server reads the method from its own scope to know that no body follows.
        # The matched route is handed back to the layers outside (metrics label by it).
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]


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
        running = services or await bootstrap.start(settings)
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
        dependencies=[Depends(known_query_only)],
        title="OncePay payments API",
        version=__version__,
        description="Exactly-once payments: every POST takes an Idempotency-Key.",
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    app.router.route_class = StrictJsonRoute  # every route below reads JSON by one rule
    _routes(app)
    routes_webhooks.register(app)
    _handlers(app)
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)
    return app
