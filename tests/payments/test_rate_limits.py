"""Rate limits per API key and per merchant (docs/payments-api.md, "Rate limits"): a 429
problem with ``Retry-After`` and the draft's ``RateLimit-Policy``/``RateLimit`` fields, answered
before the idempotency layer claims the key (so the same request runs once the window has
passed), counted per process without Redis and shared by every process through Redis — on
SQLite and PostgreSQL, the Redis tests on a real Redis server and real processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio
from pydantic import ValidationError
from tenacity import RetryCallState

from oncepay.errors import ConfigurationError
from oncepay.http.client import ATTEMPTS, AsyncClient, RetryPolicy
from oncepay.payments.api.app import create_app
from oncepay.payments.api.ratelimit import RateLimits, parse_rate, storage_for
from oncepay.payments.errors import RateLimited
from oncepay.payments.merchants import create_key
from oncepay.payments.settings import Settings
from tests.payments.stack import Stack, drop_schema
from tests.processes import PYTHONPATH, ROOT, free_port, oncepay_args, running
from tests.servers import POSTGRES_URL, REDIS_URL, require_postgres, require_redis

PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
# draft-ietf-httpapi-ratelimit-headers: each field is a structured-field List (RFC 9651) of
# Items whose bare item is a String (the policy's name), with Integer parameters: q (quota) and
# w (window, s) in RateLimit-Policy; r (remaining) and t (seconds to reset) in RateLimit.
_MEMBER = r'"[a-z]+"(?:;[a-z]+=\d+)+'
SF_LIST = re.compile(rf"{_MEMBER}(?:[ \t]*,[ \t]*{_MEMBER})*")


def sf_list(value: str) -> dict[str, dict[str, int]]:
    """A RateLimit field's members: policy name -> its parameters."""
    assert SF_LIST.fullmatch(value), value
    members = {}
    for member in re.split(r"[ \t]*,[ \t]*", value):
        name, *params = member.split(";")
        members[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return members


@asynccontextmanager
async def limited(stack: Stack, **rates: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The stack's services behind an app with these rate limits; the client and the app."""
    settings = Settings(database_url=stack.services.settings.database_url, **rates)
    app = create_app(settings, services=stack.services)
    transport = httpx.ASGITransport(app=app)
    auth = {"Authorization": f"Bearer {stack.api_key}"}
    await _a_fresh_minute()
    async with httpx.AsyncClient(transport=transport, base_url="http://p", headers=auth) as client:
        yield client, app
    await app.state.rate_limits.aclose()


async def _a_fresh_minute() -> None:
    """The limits count in windows aligned on the clock's minutes, the last window's count
    weighted by what is left of it (a sliding window counter): three requests at 59.99 s
    weigh 2.9995 a moment later, and a fourth passes. A test that counts to its limit starts
    at least 5 s before the next boundary, so the window it counts in is the one it asks
    about (CI crossed a boundary once)."""
    into = time.time() % 60
    if into > 55:
        await asyncio.sleep(60 - into + 0.05)


async def test_a_key_over_its_rate_gets_429_with_the_ratelimit_fields(stack: Stack) -> None:
    async with limited(stack, rate_limit_per_key="3/minute") as (client, _):
        for _ in range(3):
            assert (await client.get("/v1/payments")).status_code == 200
        refused = await client.get("/v1/payments")
    assert refused.status_code == 429
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["code"] == "rate_limited"
    assert "more than 3 requests per 60 seconds for this API key" in problem["detail"]
    wait = int(refused.headers["retry-after"])
    assert 1 <= wait <= 60
    assert sf_list(refused.headers["ratelimit-policy"]) == {"key": {"q": 3, "w": 60}}
    assert sf_list(refused.headers["ratelimit"]) == {"key": {"r": 0, "t": wait}}


async def test_a_malformed_request_counts_too(stack: Stack) -> None:
    async with limited(stack, rate_limit_per_key="2/minute") as (client, _):
        bad = {"Idempotency-Key": "k", "Content-Type": "application/json"}
        for _ in range(2):
            refused = await client.post("/v1/payments", content=b"{not json", headers=bad)
            assert refused.status_code == 400
        over = await client.post("/v1/payments", content=b"{not json", headers=bad)
    assert over.status_code == 429


async def test_a_429_is_never_stored_under_the_idempotency_key(stack: Stack) -> None:
    async with limited(stack, rate_limit_per_key="1/minute") as (client, app):
        assert (await client.get("/v1/payments")).status_code == 200
        headers = {"Idempotency-Key": "pay-after-429"}
        refused = await client.post("/v1/payments", json=PAYMENT, headers=headers)
        assert refused.status_code == 429
        assert "idempotency-key-expires" not in refused.headers  # the key was never claimed
        assert await stack.count("payments") == 0
        await app.state.rate_limits.storage.reset()  # the window has passed
        paid = await client.post("/v1/payments", json=PAYMENT, headers=headers)
        assert paid.status_code == 201, paid.text
        assert "idempotent-replayed" not in paid.headers  # it ran now, it was not replayed
        await app.state.rate_limits.storage.reset()
        again = await client.post("/v1/payments", json=PAYMENT, headers=headers)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == paid.content
    assert await stack.count("payments") == 1


async def test_the_merchant_limit_spans_its_keys(stack: Stack) -> None:
    _, other_secret = await create_key(stack.db, stack.merchant.id, actor="cli")
    rates = {"rate_limit_per_key": "10/minute", "rate_limit_per_merchant": "3/minute"}
    async with limited(stack, **rates) as (client, _app):
        theirs = {"Authorization": f"Bearer {other_secret}"}
        assert (await client.get("/v1/payments")).status_code == 200
        assert (await client.get("/v1/payments")).status_code == 200
        assert (await client.get("/v1/payments", headers=theirs)).status_code == 200
        refused = await client.get("/v1/payments", headers=theirs)
        _, stranger = await _stranger(stack)
        elsewhere = await client.get(
            "/v1/payments", headers={"Authorization": f"Bearer {stranger}"}
        )
    assert refused.status_code == 429
    assert "for this merchant" in refused.json()["detail"]
    assert sf_list(refused.headers["ratelimit-policy"]) == {
        "key": {"q": 10, "w": 60},
        "merchant": {"q": 3, "w": 60},
    }
    assert list(sf_list(refused.headers["ratelimit"])) == ["merchant"]
    assert elsewhere.status_code == 200  # another merchant has a window of its own


async def test_a_runaway_key_does_not_use_up_its_siblings_share(stack: Stack) -> None:
    _, sibling = await create_key(stack.db, stack.merchant.id, actor="cli")
    rates = {"rate_limit_per_key": "1/minute", "rate_limit_per_merchant": "2/minute"}
    async with limited(stack, **rates) as (client, _app):
        assert (await client.get("/v1/payments")).status_code == 200
        for _ in range(3):  # refused by the key's own limit: not counted for the merchant
            assert (await client.get("/v1/payments")).status_code == 429
        theirs = {"Authorization": f"Bearer {sibling}"}
        assert (await client.get("/v1/payments", headers=theirs)).status_code == 200
        full = await client.get("/v1/payments", headers=theirs)
    assert full.status_code == 429
    assert list(sf_list(full.headers["ratelimit"])) == ["key"]


async def _stranger(stack: Stack) -> tuple[str, str]:
    from oncepay.payments.merchants import create_merchant

    merchant, secret = await create_merchant(stack.db, "Another shop")
    return merchant.id, secret


@dataclass(frozen=True)
class RecordedWaits(RetryPolicy):
    """The client's policy, its waits recorded instead of slept: the test stands for them."""

    waits: list[float] = field(default_factory=list)

    def backoff(self, state: RetryCallState) -> float:
        self.waits.append(super().backoff(state))
        return 0.0


async def test_the_client_waits_out_a_429_and_pays_once(stack: Stack) -> None:
    """The OncePay client retries a 429 after its Retry-After with the same key: the window
    is emptied when the first answer leaves, standing for the wait having passed."""
    async with limited(stack, rate_limit_per_key="1/minute") as (_client, app):
        inner = httpx.ASGITransport(app=app)

        class WindowPasses(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                response = await inner.handle_async_request(request)
                if response.status_code == 429:
                    await app.state.rate_limits.storage.reset()
                return response

        policy = RecordedWaits(attempts=3, total=120.0)
        async with AsyncClient(
            transport=WindowPasses(),
            base_url="http://p",
            headers={"Authorization": f"Bearer {stack.api_key}"},
            retry=policy,
        ) as client:
            assert (await client.get("/v1/payments")).status_code == 200
            paid = await client.post("/v1/payments", json=PAYMENT)
    assert paid.status_code == 201, paid.text
    assert paid.extensions[ATTEMPTS] == 2
    assert len(policy.waits) == 1
    assert policy.waits[0] >= 1  # the server's Retry-After, not the client's own short backoff
    assert await stack.count("payments") == 1


def test_a_bad_rate_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="'100/fortnight' is not a rate such as"):
        Settings(database_url="sqlite:///unused.db", rate_limit_per_key="100/fortnight")
    with pytest.raises(ConfigurationError, match="100/fortnight"):
        parse_rate("100/fortnight")
    assert parse_rate("100/second").amount == 100


def test_limits_are_off_by_default() -> None:
    limits = RateLimits.from_settings(Settings(database_url="sqlite:///unused.db"))
    assert not limits.enabled


# -- Redis: one count for every process ---------------------------------------------------------


def redis_url() -> str:
    return f"{REDIS_URL}?prefix=oncepay-test:rl-{uuid.uuid4().hex[:8]}:"


async def forget_prefix(url: str) -> None:
    prefix = url.split("prefix=", 1)[1]
    client = redis.asyncio.Redis.from_url(url.split("?", 1)[0])
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_two_limiters_on_one_redis_share_the_count() -> None:
    """Two processes' limiters, interleaved by hand: the third request, wherever it lands,
    is the one refused."""
    require_redis()
    url = redis_url()
    rate = parse_rate("2/minute")
    first, second = (RateLimits(rate, None, storage_for(url)) for _ in range(2))
    try:
        await first.check("key_a", "mer_a")
        await second.check("key_a", "mer_a")
        with pytest.raises(RateLimited) as refused:
            await first.check("key_a", "mer_a")
        await second.check("key_b", "mer_a")  # another key has its own window
        alone = RateLimits(rate, None, storage_for(None))  # a process without Redis
        await alone.check("key_a", "mer_a")
    finally:
        await first.aclose()
        await second.aclose()
        await forget_prefix(url)
    assert refused.value.retry_after is not None
    assert 1 <= refused.value.retry_after <= 60


async def test_an_unreachable_redis_serves_uncounted_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nothing listens at the port: every request is served, one warning line each."""
    limits = RateLimits(
        parse_rate("1/minute"), None, storage_for(f"redis://127.0.0.1:{free_port()}/0")
    )
    try:
        for _ in range(3):
            await limits.check("key_a", "mer_a")
    finally:
        await limits.aclose()
    warnings = [r.getMessage() for r in caplog.records if "rate limits" in r.getMessage()]
    assert len(warnings) == 3
    assert "storage unavailable" in warnings[0]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_api_processes_share_one_limit_through_redis(tmp_path: Path) -> None:
    """Two real `oncepay serve` processes on one PostgreSQL and one Redis, a key allowed 4
    requests a minute: two on each process pass, then both refuse."""
    require_postgres()
    require_redis()
    db = f"{POSTGRES_URL}?schema=oncepay_rl_{uuid.uuid4().hex[:8]}"
    url = redis_url()
    ports = [free_port(), free_port()]
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_REDIS_URL": url,
        "ONCEPAY_RATE_LIMIT_PER_KEY": "4/minute",
        "ONCEPAY_RUN_WORKER": "false",
    }
    try:
        created = subprocess.run(
            oncepay_args("merchants", "create", "Shop"),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        api_key = json.loads(created.stdout)["api_key"]
        with (
            running(_serve(ports[0]), ports[0], _own_acquirer(env, tmp_path, ports[0])),
            running(_serve(ports[1]), ports[1], _own_acquirer(env, tmp_path, ports[1])),
        ):
            statuses = asyncio.run(_alternate(ports, api_key, 6))
    finally:
        asyncio.run(drop_schema(db))
        asyncio.run(forget_prefix(url))
    assert statuses == [200, 200, 200, 200, 429, 429]


def _serve(port: int) -> list[str]:
    return oncepay_args("serve", "--port", str(port), "--quiet")


def _own_acquirer(env: dict[str, str], tmp_path: Path, port: int) -> dict[str, str]:
    return {**env, "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / f'acq-{port}.db'}"}


async def _alternate(ports: list[int], api_key: str, count: int) -> list[int]:
    auth = {"Authorization": f"Bearer {api_key}"}
    statuses = []
    async with httpx.AsyncClient(headers=auth, timeout=10) as client:
        for n in range(count):
            port = ports[n % 2]
            statuses.append((await client.get(f"http://127.0.0.1:{port}/v1/payments")).status_code)
    return statuses
