"""A fault-injecting HTTP proxy between the chaos clients and the API processes.

It forwards each request to the next API process (round robin) and, with probability
``ONCEPAY_PROXY_DROP_RATE``, *drops the answer after the server finished*: the request ran and
its answer was stored, but the client sees its connection break mid-response — the fault that
makes idempotency keys necessary. An API process that is down answers 502, as a load balancer
would.

    ONCEPAY_PROXY_UPSTREAMS=http://127.0.0.1:8001,http://127.0.0.1:8002 \\
        python -m uvicorn --factory oncepay.chaos.proxy:create_app
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["ResponseDropped", "create_app"]

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
# Longer than the API's own worst case (acquirer attempts and look-ups), so the proxy never
# cuts a request short on its own: dropping is the fault, and it is counted.
UPSTREAM_TIMEOUT = 60.0


class ResponseDropped(Exception):
    """Raised after the response started: the server closes the connection mid-answer."""


def create_app() -> Starlette:
    upstreams = os.environ["ONCEPAY_PROXY_UPSTREAMS"].split(",")
    drop_rate = float(os.environ.get("ONCEPAY_PROXY_DROP_RATE", "0"))
    dice = random.Random(os.environ.get("ONCEPAY_PROXY_SEED"))  # noqa: S311 - fault dice
    turn = itertools.cycle(range(len(upstreams)))
    client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT)
    counts = {"forwarded": 0, "dropped": 0, "unreachable": 0}

    async def forward(request: Request) -> Any:
        upstream = upstreams[next(turn)]
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            answer = await client.request(
                request.method,
                upstream + request.url.path,
                params=request.query_params,
                headers=headers,
                content=await request.body(),
            )
        except httpx.HTTPError:
            counts["unreachable"] += 1
            return JSONResponse({"code": "upstream_unreachable"}, 502)
        counts["forwarded"] += 1
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
        if request.method == "POST" and dice.random() < drop_rate:
            counts["dropped"] += 1
            return _Dropping(answer.content, answer.status_code, kept)
        return Response(answer.content, answer.status_code, kept)

    async def stats(request: Request) -> JSONResponse:
        return JSONResponse(counts)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    routes = [
        Route("/_proxy/stats", stats),
        Route("/{path:path}", forward, methods=["GET", "POST", "DELETE", "PUT", "PATCH"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


class _Dropping(Response):
    """Sends the status line and headers, a part of the body, then breaks the connection."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        await send({"type": "http.response.body", "body": self.body[:1], "more_body": True})
        raise ResponseDropped("the answer is dropped on purpose")
