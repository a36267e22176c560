"""Small real apps the HTTP tests put OncePay in front of; each counts its executions."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


class Executions(Counter[str]):
    """How many times each route really ran, plus a gate a test can hold a request on."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = asyncio.Event()
        self.held = asyncio.Event()
        self.hold.set()


def starlette_app(runs: Executions) -> Starlette:
    async def pay(request: Request) -> Response:
        runs["pay"] += 1
        body = await request.body()
        payload = json.loads(body) if body else {}
        return JSONResponse({"run": runs["pay"], "got": payload}, status_code=201)

    async def slow(request: Request) -> Response:
        runs["slow"] += 1
        runs.held.set()
        await runs.hold.wait()
        return JSONResponse({"run": runs["slow"]}, status_code=201)

    async def fail(request: Request) -> Response:
        runs["fail"] += 1
        return JSONResponse({"error": "downstream"}, status_code=502)

    async def boom(request: Request) -> Response:
        runs["boom"] += 1
        raise RuntimeError("the app crashed")

    async def stream(request: Request) -> Response:
        runs["stream"] += 1

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield f"chunk-{i};".encode()

        return StreamingResponse(chunks(), media_type="text/plain", status_code=200)

    async def headers(request: Request) -> Response:
        runs["headers"] += 1
        response = Response(b"ok", status_code=200, media_type="text/plain")
        response.headers.append("x-multi", "one")
        response.headers.append("x-multi", "two")
        response.set_cookie("session", "secret")
        return response

    async def read(request: Request) -> Response:
        runs["read"] += 1
        return JSONResponse({"run": runs["read"]})

    async def status(request: Request) -> Response:
        runs["status"] += 1
        return JSONResponse({"run": runs["status"]}, status_code=request.path_params["code"])

    async def refuse(request: Request) -> Response:
        """Refused before anything ran, and says so (docs/middleware.md)."""
        runs["refuse"] += 1
        headers = {"idempotency-outcome": "not-executed"}
        return JSONResponse({"error": "try again"}, status_code=400, headers=headers)

    return Starlette(
        routes=[
            Route("/payments", pay, methods=["POST", "PATCH", "PUT", "GET"]),
            Route("/slow", slow, methods=["POST"]),
            Route("/fail", fail, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/stream", stream, methods=["POST"]),
            Route("/headers", headers, methods=["POST"]),
            Route("/read", read, methods=["GET"]),
            Route("/status/{code:int}", status, methods=["POST"]),
            Route("/refuse", refuse, methods=["POST"]),
        ]
    )


class PaymentIn(BaseModel):
    amount: int
    currency: str


def fastapi_app(runs: Executions) -> FastAPI:
    """A FastAPI app with a validated model route, plus every route of the Starlette app."""
    app = FastAPI()

    @app.post("/typed", status_code=201)
    async def typed(payment: PaymentIn) -> dict[str, object]:
        runs["typed"] += 1
        return {"run": runs["typed"], "got": payment.model_dump()}

    @app.post("/declined", status_code=201)
    async def declined(payment: PaymentIn) -> dict[str, object]:
        runs["declined"] += 1  # it ran: its 422 is an answer to store, not a refusal
        raise HTTPException(422, detail="insufficient funds")

    app.router.routes.extend(starlette_app(runs).routes)
    return app
