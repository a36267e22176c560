"""In-process micro-benchmark of the middleware's hot paths, without an HTTP server.

    .venv/bin/python bench/overhead/micro.py                    # bare, memory, redis; both paths
    .venv/bin/python bench/overhead/micro.py --variants oncepay-redis --paths new -n 40000
    perf stat -e instructions .venv/bin/python bench/overhead/micro.py --variants ... -n ...

The Starlette app of ``apps.py`` is called as an ASGI app with in-memory ``receive``/``send``
(32 requests in flight, as wrk's 32 connections), so what is left is the app, the middleware,
the store glue and the Redis client: no uvicorn, no HTTP parsing, no client socket. It reports
this process's CPU time per request (Redis itself runs in its own process) and the difference
to the bare app, which is the middleware's own cost. Use it to judge micro-changes, which
run.py's wall-clock figures on a shared 2-core machine are too noisy for; run.py's ratios stay
the figures that count.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from starlette.middleware import Middleware

from bench.harness.stores import redis_delete
from bench.overhead import apps

BODY = b'{"amount":1250,"currency":"eur","customer":"cus_0042","description":"overhead bench"}'
REDIS = os.environ.get("OVERHEAD_REDIS", "redis://127.0.0.1:6379/0")


def headers(key: str) -> list[tuple[bytes, bytes]]:
    """What wrk sends (Host, Content-Length, Content-Type, the key)."""
    return [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"idempotency-key", key.encode()),
        (b"content-length", str(len(BODY)).encode()),
    ]


async def one(app: Any, key: str) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/charges",
        "raw_path": b"/charges",
        "query_string": b"",
        "root_path": "",
        "headers": headers(key),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def drive(app: Any, path: str, n: int, concurrency: int, tag: str) -> float:
    fixed = f"{tag}-replay"
    await one(app, fixed)  # the first request of the replay key, and a warm-up
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            status = await one(app, fixed if path == "replay" else f"{tag}-{i}")
            if status not in (200, 201):
                raise RuntimeError(f"status {status}")

    warm = n // 10
    for i in range(warm):
        await one(app, fixed if path == "replay" else f"{tag}-w{i}")
    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - start) / n * 1e6


def build(variant: str, prefix: str) -> tuple[Any, Any]:
    store_url = {
        "oncepay-memory": "memory://",
        "oncepay-redis": f"{REDIS}?prefix={prefix}",
    }.get(variant, "")
    if variant == "bare":
        return apps.build("bare"), None
    from oncepay.http import IdempotencyMiddleware
    from oncepay.idempotency.stores import store_from_url

    store = store_from_url(store_url)
    middleware = Middleware(IdempotencyMiddleware, store=store)  # type: ignore[arg-type]
    app = apps._starlette(apps.charges, [middleware])
    return app, store


async def main_async(args: argparse.Namespace) -> None:
    results: dict[tuple[str, str], float] = {}
    for path in args.paths.split(","):
        for variant in args.variants.split(","):
            prefix = f"oncepay-micro-{uuid.uuid4().hex[:8]}:"
            app, store = build(variant, prefix)
            if args.no_gc:
                gc.disable()
            us = await drive(app, path, args.n, args.concurrency, prefix)
            gc.enable()
            results[path, variant] = us
            if store is not None:
                await store.aclose()
            if variant == "oncepay-redis":
                redis_delete(REDIS, prefix)
            base = results.get((path, "bare"))
            extra = f"  (+{us - base:.1f} over bare)" if base is not None else ""
            print(f"{path:6} {variant:16} {us:7.1f} us/req{extra}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="bare,oncepay-memory,oncepay-redis")
    p.add_argument("--paths", default="new,replay")
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--no-gc", action="store_true", help="disable the GC while measuring")
    args = p.parse_args()
    import uvloop

    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
