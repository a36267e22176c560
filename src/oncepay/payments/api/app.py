"""The payments API app (SPEC §5): the routers, the problem mapping, the ASGI layers, and the
services' lifetime (with the recovery worker running beside the API unless told not to).
Every POST needs an ``Idempotency-Key``; the key is scoped to the authenticated merchant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from oncepay import __version__
from oncepay import _heap as heap
from oncepay.payments import bootstrap, dashboard, tracing
from oncepay.payments.api import contract
from oncepay.payments.api.accesslog import AccessLog
from oncepay.payments.api.errors import add_handlers
from oncepay.payments.api.middleware import BodyLimit, HeadAsGet, RequestMetrics
from oncepay.payments.api.ratelimit import RateLimits, add_rate_limit_handler
from oncepay.payments.api.routes import (
    admin_insight,
    admin_keys,
    admin_reconciliation,
    currencies,
    events,
    health,
    insight,
    payments,
    refunds,
    webhook_deliveries,
    webhook_endpoints,
)
from oncepay.payments.context import Services
from oncepay.payments.recovery import run_worker
from oncepay.payments.settings import Settings

__all__ = ["create_app", "serving_app"]

# In this order: it is the order of the OpenAPI document.
ROUTERS = (
    payments,
    refunds,
    events,
    currencies,
    health,
    webhook_endpoints,
    webhook_deliveries,
    insight,
    admin_reconciliation,  # the operator API: out of the OpenAPI document
    admin_keys,
    admin_insight,
)


class _Api(FastAPI):
    """FastAPI without the two layers of its own (0.165+) that do nothing here but add a
    frame to every request: ``ExceptionTelemetryMiddleware`` reports exceptions to FastAPI's
    native telemetry, which :func:`create_app` turns off (OncePay traces itself), and
    ``AppBodyLimitMiddleware`` passes every request through when no ``max_body_size`` is set
    (OncePay's own :class:`BodyLimit` bounds the body). They are left in should either be on,
    or should a FastAPI release no longer have them."""

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        try:
            from fastapi._body_limit import AppBodyLimitMiddleware
            from fastapi.telemetry._asgi import ExceptionTelemetryMiddleware
        except ImportError:  # a FastAPI without them
            return stack
        telemetry = getattr(self, "_telemetry", None)  # FastAPI's configuration of it
        idle: tuple[type, ...] = (ExceptionTelemetryMiddleware,) if _all_off(telemetry) else ()
        if getattr(self, "max_body_size", None) is None:
            idle = (*idle, AppBodyLimitMiddleware)
        outer = stack  # ServerErrorMiddleware; they come right inside it
        while isinstance(inner := getattr(outer, "app", None), idle):
            outer.app = inner.app  # type: ignore[attr-defined]
        return stack


def _all_off(telemetry: object) -> bool:
    """Whether FastAPI's native telemetry is configured off for traces, metrics and logs."""
    return isinstance(telemetry, dict) and not any(
        telemetry.get(kind) for kind in ("tracing", "metrics", "logs")
    )


def serving_app() -> FastAPI:
    """The app as ``oncepay serve`` runs it (uvicorn's factory, in every worker process):
    :func:`create_app`, and once its services have started, what is alive then (the modules,
    the app, the services and their caches) is kept out of the garbage collector's way
    (``gc.freeze()``) and young collections are rarer (:mod:`oncepay._heap`).
    Not done by :func:`create_app` itself: a process that builds many apps (a test suite, an
    embedding program) keeps its collector as it set it."""
    return create_app(settle_heap=True)


def create_app(
    settings: Settings | None = None,
    *,
    services: Services | None = None,
    settle_heap: bool = False,
) -> FastAPI:
    """The payments API. With ``services`` the caller owns them (tests); otherwise the app
    starts its own from ``settings`` when it starts, and closes them when it stops.
    ``settle_heap``: see :func:`serving_app`."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        running = services or await bootstrap.start(settings)
        app.state.services = running
        if settings.trace_sql:  # a span per statement, with tracing on (costly: see the docs)
            tracing.instrument_database(running.db)
        if settle_heap:
            heap.settle()
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
            tracing.shutdown()  # the last spans exported, with tracing on
            await app.state.rate_limits.aclose()

    app = _Api(
        title="OncePay payments API",
        version=__version__,
        description="Exactly-once payments: every POST takes an Idempotency-Key.",
        lifespan=lifespan,
        docs_url=None,  # served by dashboard.mount from the package's own assets (offline)
        redoc_url=None,
        # FastAPI's own OpenTelemetry (0.165+) looks for configured providers on every
        # request; OncePay traces itself (payments/tracing.py: the server span, phases,
        # acquirer calls), so FastAPI's would add nothing but that cost.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # /v1/payments/ is no route (404 resource_missing), as the docs say of any unknown
        # path: Starlette's redirect would answer it with a 307 before authentication, to a
        # URL built from the client's Host header.
        redirect_slashes=False,
    )
    if services is not None:
        app.state.services = services
    app.state.rate_limits = RateLimits.from_settings(settings)
    for module in ROUTERS:
        # The routes themselves, not app.include_router(): that would route each request
        # through a second router, matching it twice.
        app.router.routes.extend(module.router.routes)
    app.openapi = lambda: contract.document(app)  # type: ignore[method-assign]
    dashboard.mount(app)  # /dashboard, /docs and /redoc
    add_handlers(app)
    add_rate_limit_handler(app)
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)
    app.add_middleware(AccessLog)  # it times and ids everything, errors included
    # OTEL_* variables asking for traces (docs/observability.md): the server span outermost,
    # so the access log line carries its ids. Otherwise nothing of OpenTelemetry is imported.
    if tracing.setup() and (otel := tracing.asgi_middleware()) is not None:
        app.add_middleware(otel[0], **otel[1])
    return app
