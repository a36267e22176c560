"""A real upstream service for the gateway tests, run by uvicorn in its own process.

It counts executions per path, echoes what it received, streams, and can hang or be slow.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

counts: Counter[str] = Counter()


async def pay(request: Request) -> Response:
    counts["pay"] += 1
    body = await request.body()
    await asyncio.sleep(0.05)  # a realistic service time, so duplicates overlap the first
    return JSONResponse({"execution": counts["pay"], "got": json.loads(body or b"{}")}, 201)


async def echo(request: Request) -> Response:
    counts["echo"] += 1
    body = await request.body()
    headers = [[k, v] for k, v in request.headers.items()]
    return JSONResponse({"headers": headers, "size": len(body), "query": request.url.query})


async def stream(request: Request) -> Response:
    counts["stream"] += 1

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield f"part-{i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain", status_code=201)


async def hang(request: Request) -> Response:
    counts["hang"] += 1
    await asyncio.sleep(30)
    return Response(status_code=200)


async def utf8(request: Request) -> Response:
    counts["utf8"] += 1
    response = Response(b"ok", status_code=201)
    response.raw_headers.append((b"x-merchant", "Z\u00fcrich \u20ac".encode()))
    return response


async def count(request: Request) -> Response:
    return JSONResponse(dict(counts))


app = Starlette(
    routes=[
        Route("/pay", pay, methods=["POST"]),
        Route("/echo", echo, methods=["POST", "GET"]),
        Route("/stream", stream, methods=["POST"]),
        Route("/hang", hang, methods=["POST"]),
        Route("/utf8", utf8, methods=["POST"]),
        Route("/count", count, methods=["GET"]),
    ]
)
