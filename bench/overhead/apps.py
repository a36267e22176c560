"""The apps of the middleware overhead benchmark: one Starlette app, several wrappings.

Every variant serves the same tiny endpoint, ``POST /charges``: parse a small JSON body, bump a
counter, answer 201 with a small JSON document. ``GET /health`` is the readiness probe (a safe
method, so no idempotency layer manages it).

The variant is chosen by environment variables, read by :func:`make_app` (a uvicorn factory)::

    OVERHEAD_VARIANT   bare | oncepay-memory | oncepay-sqlite | oncepay-postgres |
                       oncepay-redis | oncepay-redis-redispy | oncepay-redis-pipelined |
                       powertools-redis | powertools-redis-inline | idemkit-redis |
                       fastapi-idempotency-key-redis
    OVERHEAD_STORE     the OncePay store URL (oncepay-* variants)
    OVERHEAD_REDIS     the Redis URL for the peers (default redis://127.0.0.1:6379/0)
    OVERHEAD_PREFIX    a Redis key prefix unique to this run and variant
    OVERHEAD_STATS     where experiments.py's pipelined client writes its counters at shutdown
    OVERHEAD_USAGE_LOG the key-usage log of the ``-log`` variants

and served as ``uvicorn bench.overhead.apps:make_app --factory --loop uvloop
--http httptools --no-access-log --workers 1`` (bench/overhead/run.py does this).

How each library is wired:

* **OncePay**: ``oncepay.http.IdempotencyMiddleware`` as a Starlette middleware; the store is
  built from ``OVERHEAD_STORE`` and closed at shutdown. Key: the ``Idempotency-Key`` header.
  ``oncepay-redis-redispy`` and ``oncepay-redis-pipelined`` are experiments (experiments.py):
  the same Redis store on redis-py's asyncio client, or on a minimal pipelined RESP client, to
  measure what the driver costs. ``oncepay-memory-log`` and ``oncepay-redis-log`` are the same
  middleware with the key-usage log on (SPEC §9; keys hashed, the default), written to
  ``OVERHEAD_USAGE_LOG``: its cost is the ratio to the variant without ``-log``.
* **idemkit** and **fastapi-idempotency-key**: their pure-ASGI middleware, with their
  ``RedisBackend`` on redis-py's asyncio client. Key: the ``Idempotency-Key`` header.
  fastapi-idempotency-key's backend gets a minimal fix so that replays replay (see
  ``_fastapi_idempotency_key``; ``OVERHEAD_FAPI_UNPATCHED=1`` serves the library as shipped).
* **AWS Powertools**: ``idempotent_function`` is a decorator for *sync* functions (a Lambda
  handler's helpers), not HTTP middleware, and its Redis layer uses redis-py's *blocking*
  client. The endpoint reads the body and calls the decorated function with
  ``request={"key": <Idempotency-Key header>, "body": <parsed JSON>}``;
  ``event_key_jmespath="key"`` makes the header the idempotency key. Payload validation
  (``payload_validation_jmespath``, Powertools' fingerprint check) is off: its Redis layer
  drops the validation hash when it completes a record, so every replay would fail (see
  ``_powertools``). The decorated function returns a dict, which the endpoint serialises.
  ``powertools-redis`` runs the call in Starlette's thread pool (what an async app must do
  with blocking I/O); ``powertools-redis-inline`` calls it on the event loop thread, blocking
  the loop for its Redis round trips.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"

VARIANTS = (
    "bare",
    "oncepay-memory",
    "oncepay-memory-log",
    "oncepay-sqlite",
    "oncepay-postgres",
    "oncepay-redis",
    "oncepay-redis-log",
    "oncepay-redis-redispy",
    "oncepay-redis-pipelined",
    "powertools-redis",
    "powertools-redis-inline",
    "idemkit-redis",
    "fastapi-idempotency-key-redis",
)

_served = itertools.count(1)


def _charge(data: dict[str, Any]) -> dict[str, Any]:
    """The trivial work: what a create-charge endpoint would answer."""
    return {
        "id": f"ch_{next(_served):010d}",
        "object": "charge",
        "amount": data["amount"],
        "currency": data["currency"],
        "customer": data.get("customer"),
        "status": "succeeded",
    }


async def charges(request: Request) -> Response:
    return JSONResponse(_charge(await request.json()), status_code=201)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


Cleanup = Callable[[], Awaitable[None]]


def _starlette(
    endpoint: Callable[[Request], Awaitable[Response]],
    middleware: list[Middleware] | None = None,
    cleanup: Cleanup | None = None,
) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if cleanup is not None:
            await cleanup()

    routes = [
        Route("/charges", endpoint, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, middleware=middleware or [], lifespan=lifespan)


# -- variants ----------------------------------------------------------------------------------


def _bare() -> Starlette:
    return _starlette(charges)


def _oncepay(
    store_url: str, *, experiment: str = "", redis: str = "", prefix: str = "", log: str = ""
) -> Any:
    from oncepay.http import IdempotencyMiddleware
    from oncepay.idempotency.stores import store_from_url
    from oncepay.insight.usage_log import UsageLog

    if experiment:
        from bench.overhead import experiments

        store = getattr(experiments, f"{experiment}_store")(redis, prefix)
    else:
        store = store_from_url(store_url)
    options: dict[str, Any] = {"usage_log": UsageLog(log)} if log else {}
    return _starlette(
        charges,
        [Middleware(IdempotencyMiddleware, store=store, **options)],  # type: ignore[arg-type]
        cleanup=store.aclose,
    )


def _idemkit(redis_url: str, prefix: str) -> Starlette:
    from idemkit import HttpConfig, IdempotencyMiddleware
    from idemkit.backends.redis import RedisBackend

    backend = RedisBackend.from_url(redis_url, namespace=prefix.rstrip(":"))
    # single_tenant: no caller-scope extractor and no warning about it (OncePay's default
    # scope is also one shared "anonymous" tenant for requests without Authorization).
    config = HttpConfig(scope_mode="single_tenant")
    # manage_backend=False: the middleware sits inside Starlette, which handles the lifespan
    # itself; the backend is closed by our lifespan instead.
    return _starlette(
        charges,
        [Middleware(IdempotencyMiddleware, backend=backend, config=config, manage_backend=False)],
        cleanup=backend.aclose,
    )


def _fastapi_idempotency_key(redis_url: str, prefix: str) -> Starlette:
    from fastapi_idempotency_key import IdempotencyMiddleware, RedisBackend

    class FingerprintKeepingRedisBackend(RedisBackend):  # type: ignore[misc]  # an Any base
        """fastapi-idempotency-key 0.1.1 stores a completed record with ``fingerprint=""``
        (``RedisBackend.store_response``), so its middleware answers every replay with 422
        "different request payload". This keeps the claim's fingerprint until the response is
        stored -- the smallest change that makes the replay path a replay. Same round trips."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._fingerprints: dict[str, str] = {}

        async def _try_lock_once(self, key: str, fingerprint: str, ttl: int) -> Any:
            acquired, record = await super()._try_lock_once(key, fingerprint, ttl)
            if acquired:
                self._fingerprints[key] = fingerprint
            return acquired, record

        async def store_response(
            self, key: str, status_code: int, headers: Any, body: bytes, ttl: int
        ) -> None:
            import json as _json
            import time as _time

            from fastapi_idempotency_key.status import IdempotencyRecord, IdempotencyStatus

            now = _time.time()
            record = IdempotencyRecord(
                key=key,
                fingerprint=self._fingerprints.pop(key, ""),
                status=IdempotencyStatus.COMPLETED,
                status_code=status_code,
                headers=list(headers),
                body=body,
                created_at=now,
                expires_at=now + ttl if ttl > 0 else 0.0,
            )
            payload = _json.dumps(record.to_dict())
            await self.redis.eval(self.LUA_STORE_RESPONSE, 1, self._get_key(key), payload, ttl)

        async def release_lock(self, key: str) -> None:
            self._fingerprints.pop(key, None)
            await super().release_lock(key)

    backend_class = (
        RedisBackend
        if os.environ.get("OVERHEAD_FAPI_UNPATCHED")
        else (FingerprintKeepingRedisBackend)
    )
    backend = backend_class(redis_url=redis_url, prefix=prefix)
    return _starlette(
        charges, [Middleware(IdempotencyMiddleware, backend=backend)], cleanup=backend.close
    )


def _powertools(redis_url: str, prefix: str, *, inline: bool) -> Starlette:
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig, idempotent_function
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyAlreadyInProgressError,
        IdempotencyValidationError,
    )
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
        CachePersistenceLayer,  # = RedisCachePersistenceLayer (the old name is deprecated)
    )

    persistence = CachePersistenceLayer(url=redis_url)
    # No payload_validation_jmespath: with the Redis layer of Powertools 3.37.0 the completed
    # record is written without its validation hash (CachePersistenceLayer._update_record), so
    # with validation on every replay raises IdempotencyValidationError. Key-only, then: a
    # different body under the same key replays the first response instead of a 422.
    config = IdempotencyConfig(
        event_key_jmespath="key",
        raise_on_no_idempotency_key=True,
        expires_after_seconds=24 * 3600,
    )

    @idempotent_function(  # type: ignore[untyped-decorator]  # Powertools is Any here
        data_keyword_argument="request",
        persistence_store=persistence,
        config=config,
        key_prefix=prefix.rstrip(":"),
    )
    def process(request: dict[str, Any]) -> dict[str, Any]:
        return _charge(request["body"])

    def call(key: str | None, body: dict[str, Any]) -> Response:
        try:
            result = process(request={"key": key, "body": body})
        except IdempotencyAlreadyInProgressError:
            return JSONResponse({"detail": "in progress"}, status_code=409)
        except IdempotencyValidationError:
            return JSONResponse({"detail": "key reused with another body"}, status_code=422)
        return JSONResponse(result, status_code=201)

    async def endpoint(request: Request) -> Response:
        body = await request.json()
        key = request.headers.get("idempotency-key")
        if inline:
            return call(key, body)
        return await run_in_threadpool(call, key, body)

    async def close() -> None:
        persistence.client.close()

    return _starlette(endpoint, cleanup=close)


def build(variant: str, *, store: str = "", redis: str = DEFAULT_REDIS, prefix: str = "") -> Any:
    if variant == "bare":
        return _bare()
    if variant in ("oncepay-redis-pipelined", "oncepay-redis-redispy"):
        experiment = variant.removeprefix("oncepay-redis-").replace("-", "_")
        return _oncepay("", experiment=experiment, redis=redis, prefix=prefix)
    if variant.endswith("-log"):
        return _oncepay(store, log=os.environ.get("OVERHEAD_USAGE_LOG", "overhead-usage.jsonl"))
    if variant.startswith("oncepay-"):
        return _oncepay(store)
    if variant == "idemkit-redis":
        return _idemkit(redis, prefix)
    if variant == "fastapi-idempotency-key-redis":
        return _fastapi_idempotency_key(redis, prefix)
    if variant in ("powertools-redis", "powertools-redis-inline"):
        return _powertools(redis, prefix, inline=variant.endswith("-inline"))
    raise SystemExit(f"unknown OVERHEAD_VARIANT {variant!r}; one of {', '.join(VARIANTS)}")


def make_app() -> Any:
    """The uvicorn factory: the variant named by the environment."""
    return build(
        os.environ.get("OVERHEAD_VARIANT", "bare"),
        store=os.environ.get("OVERHEAD_STORE", "memory://"),
        redis=os.environ.get("OVERHEAD_REDIS", DEFAULT_REDIS),
        prefix=os.environ.get("OVERHEAD_PREFIX", "bench:overhead:adhoc:"),
    )
