"""The simulated acquirer as an ASGI app: its routes, and problems mapped to answers in one
place. It runs under uvicorn (``oncepay acquirer``) and in-process through
``httpx.ASGITransport``, which runs no lifespan: the schema is therefore created lazily (see
:class:`~oncepay.simulator.state.Simulator`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from oncepay.reconciliation.fees import DEFAULT_SCHEDULE, FeeSchedule
from oncepay.simulator.admin import get_faults, health, list_operations, put_faults
from oncepay.simulator.faults import Faults
from oncepay.simulator.money import authorize, follow_on
from oncepay.simulator.problems import Problem, problem
from oncepay.simulator.references import lookup
from oncepay.simulator.settlements import day_authorizations, settlements
from oncepay.simulator.state import Simulator

__all__ = ["DEFAULT_DATABASE_URL", "create_app"]

DEFAULT_DATABASE_URL = "sqlite:///oncepay-acquirer.db"
_AUTHORIZATION = "/v1/authorizations/{authorization_id}"
ROUTES = [
    Route("/v1/authorizations", authorize, methods=["POST"]),
    Route(f"{_AUTHORIZATION}/capture", follow_on("capture"), methods=["POST"]),
    Route(f"{_AUTHORIZATION}/void", follow_on("void"), methods=["POST"]),
    Route(f"{_AUTHORIZATION}/refunds", follow_on("refund"), methods=["POST"]),
    Route("/v1/lookups", lookup, methods=["POST"]),
    Route("/v1/settlements", settlements, methods=["GET"]),
    Route("/v1/settlements/authorizations", day_authorizations, methods=["GET"]),
    Route("/admin/faults", get_faults, methods=["GET"]),
    Route("/admin/faults", put_faults, methods=["PUT"]),
    Route("/admin/operations", list_operations, methods=["GET"]),
    Route("/health", health, methods=["GET"]),
]


def create_app(
    database_url: str = DEFAULT_DATABASE_URL,
    faults: Faults | None = None,
    seed: int | None = None,
    *,
    clock: Callable[[], float] = time.time,
    fees: FeeSchedule = DEFAULT_SCHEDULE,
) -> Starlette:
    """The simulated acquirer as an ASGI app over its own database (see the package doc).

    ``app.state.simulator`` holds its state; ``await app.state.simulator.aclose()`` releases
    the database when the app ran in-process (under uvicorn the lifespan does it)."""
    simulator = Simulator.from_url(database_url, faults or Faults(), seed, clock, fees)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await simulator.aclose()

    app = Starlette(
        routes=ROUTES,
        exception_handlers={Problem: _on_problem, HTTPException: _on_http_error},
        lifespan=lifespan,
    )
    app.state.simulator = simulator
    return app


async def _on_problem(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem)
    return problem(exc.status, exc.code, exc.detail, **exc.extra)


async def _on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
    return problem(exc.status_code, code, str(exc.detail))
