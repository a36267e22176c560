"""``Idempotency-Key-Expires`` and learned TTLs through the ASGI and WSGI middleware: a learned
shorter TTL really expires the record sooner (the engine's clock moved by hand), the header
says when, a replay carries its record's expiry, and without a policy nothing changes."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner
from werkzeug.test import Client

from oncepay import TtlPolicy
from oncepay.cli import app
from oncepay.errors import ConfigurationError
from oncepay.http import IdempotencyMiddleware, IdempotencyWSGIMiddleware
from oncepay.idempotency import Engine, scope_from_authorization
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock
from tests.http.apps import Executions, fastapi_app, starlette_app
from tests.http.wsgi_apps import Runs, django_app, flask_app
from tests.processes import free_port, oncepay_args, running, uvicorn_args

DAY = 86400.0
TENANT_A = scope_from_authorization("Bearer tenant-a")
TENANT_B = scope_from_authorization("Bearer tenant-b")


def http_date(at: float) -> str:
    return formatdate(int(at), usegmt=True)


def policy_for(route: str, ttl: float = 600.0, tenant: str = TENANT_A) -> TtlPolicy:
    policy = TtlPolicy(minimum=300, maximum=7 * DAY)
    policy.update([{"tenant": tenant, "route": route, "ttl_seconds": ttl, "basis": 500}])
    return policy


class UsageSink:
    """A key-usage log sink that keeps (decision, ttl) in memory."""

    def __init__(self) -> None:
        self.records: list[tuple[str, float | None]] = []

    def record(self, *fields: Any) -> None:
        self.records.append((fields[4], fields[7]))

    def close(self) -> None:
        pass


# -- ASGI ------------------------------------------------------------------------------------


@pytest.fixture(params=["starlette", "fastapi"])
def asgi(request: pytest.FixtureRequest) -> Any:
    clock = FakeClock()
    runs = Executions()
    app = starlette_app(runs) if request.param == "starlette" else fastapi_app(runs)

    def make(**options: Any) -> httpx.AsyncClient:
        engine = Engine(MemoryStore(), clock=clock)
        middleware = IdempotencyMiddleware(app, engine=engine, **options)
        transport = httpx.ASGITransport(app=middleware)
        return httpx.AsyncClient(transport=transport, base_url="http://test")

    make.clock, make.runs = clock, runs  # type: ignore[attr-defined]
    return make


def asgi_post(client: httpx.AsyncClient, path: str, key: str, tenant: str = "tenant-a") -> Any:
    body = {"amount": 100, "currency": "EUR"}
    headers = {"authorization": f"Bearer {tenant}", "idempotency-key": key}
    return client.post(path, json=body, headers=headers)


async def test_asgi_a_learned_shorter_ttl_expires_the_record_sooner_and_says_so(asgi: Any) -> None:
    clock, runs = asgi.clock, asgi.runs
    async with asgi(ttl_policy=policy_for("POST /payments", 600)) as client:
        first = await asgi_post(client, "/payments", "k1")
        other = await asgi_post(client, "/payments", "k1", tenant="tenant-b")
        assert first.status_code == other.status_code == 201
        assert first.headers["idempotency-key-expires"] == http_date(clock.now + 600)
        assert other.headers["idempotency-key-expires"] == http_date(clock.now + DAY)

        clock.advance(599)
        replay = await asgi_post(client, "/payments", "k1")
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.headers["idempotency-key-expires"] == first.headers["idempotency-key-expires"]
        assert runs["pay"] == 2

        clock.advance(2)  # past the learned 600 s, far inside the fixed 24 h
        again = await asgi_post(client, "/payments", "k1")
        kept = await asgi_post(client, "/payments", "k1", tenant="tenant-b")
    assert "idempotent-replayed" not in again.headers
    assert again.headers["idempotency-key-expires"] == http_date(clock.now + 600)
    assert kept.headers["idempotent-replayed"] == "true"
    assert runs["pay"] == 3


async def test_asgi_a_learned_template_applies_to_every_path_it_matches(asgi: Any) -> None:
    policy = policy_for("POST /status/{code}", 900)
    async with asgi(ttl_policy=policy) as client:
        response = await asgi_post(client, "/status/201", "k1")
    assert response.headers["idempotency-key-expires"] == http_date(asgi.clock.now + 900)
    assert policy.savings().records == 1
    assert (policy.savings().learned_seconds, policy.savings().fixed_seconds) == (900, DAY)


async def test_asgi_without_a_policy_the_header_is_the_fixed_ttl_and_replays_keep_it(
    asgi: Any,
) -> None:
    clock = asgi.clock
    async with asgi() as client:
        first = await asgi_post(client, "/payments", "k1")
        clock.advance(3600)
        replay = await asgi_post(client, "/payments", "k1")
    expires = first.headers["idempotency-key-expires"]
    assert expires == http_date(clock.now - 3600 + DAY)
    assert replay.headers["idempotency-key-expires"] == expires
    assert parsedate_to_datetime(expires).tzname() == "UTC"  # an IMF-fixdate, in GMT


async def test_asgi_replays_and_conflicts_are_not_counted_as_stored_records(asgi: Any) -> None:
    sink = UsageSink()
    policy = policy_for("POST /payments", 600)
    async with asgi(ttl_policy=policy, usage_log=sink) as client:
        await asgi_post(client, "/payments", "k1")
        await asgi_post(client, "/payments", "k1")
        reused = await client.post(
            "/payments",
            json={"amount": 5, "currency": "EUR"},
            headers={"authorization": "Bearer tenant-a", "idempotency-key": "k1"},
        )
    assert reused.status_code == 422
    assert reused.headers["idempotency-key-expires"] == http_date(asgi.clock.now + 600)
    assert policy.savings().records == 1
    assert sink.records == [("executed", 600), ("replayed", 600), ("reused", 600)]


def test_a_policy_whose_minimum_does_not_outlast_the_lease_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="longer than the lease"):
        IdempotencyMiddleware(starlette_app(Executions()), ttl_policy=TtlPolicy(minimum=60))
    with pytest.raises(ConfigurationError, match="longer than the lease"):
        IdempotencyWSGIMiddleware(flask_app(Runs()), ttl_policy=TtlPolicy(minimum=30))


# -- WSGI ------------------------------------------------------------------------------------


@pytest.fixture(params=["flask", "django"])
def wsgi(request: pytest.FixtureRequest) -> Iterator[Any]:
    clock = FakeClock()
    runs = Runs()
    built: list[IdempotencyWSGIMiddleware] = []

    def make(**options: Any) -> Client:
        app = (flask_app if request.param == "flask" else django_app)(runs)
        engine = Engine(MemoryStore(), clock=clock)
        middleware = IdempotencyWSGIMiddleware(app, engine=engine, **options)
        built.append(middleware)
        return Client(middleware)

    make.clock, make.runs = clock, runs  # type: ignore[attr-defined]
    yield make
    for middleware in built:
        middleware.close()


def wsgi_post(client: Client, path: str, key: str, tenant: str = "tenant-a") -> Any:
    headers = {"Authorization": f"Bearer {tenant}", "Idempotency-Key": key}
    return client.post(path, data=b'{"amount": 100}', headers=headers)


def test_wsgi_a_learned_shorter_ttl_expires_the_record_sooner_and_says_so(wsgi: Any) -> None:
    clock, runs = wsgi.clock, wsgi.runs
    client = wsgi(ttl_policy=policy_for("POST /payments", 600))
    first = wsgi_post(client, "/payments", "k1")
    other = wsgi_post(client, "/payments", "k1", tenant="tenant-b")
    assert first.status_code == other.status_code == 201
    assert first.headers["Idempotency-Key-Expires"] == http_date(clock.now + 600)
    assert other.headers["Idempotency-Key-Expires"] == http_date(clock.now + DAY)

    clock.advance(599)
    replay = wsgi_post(client, "/payments", "k1")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Idempotency-Key-Expires"] == first.headers["Idempotency-Key-Expires"]
    assert runs["pay"] == 2

    clock.advance(2)
    again = wsgi_post(client, "/payments", "k1")
    kept = wsgi_post(client, "/payments", "k1", tenant="tenant-b")
    assert "Idempotent-Replayed" not in again.headers
    assert again.headers["Idempotency-Key-Expires"] == http_date(clock.now + 600)
    assert kept.headers["Idempotent-Replayed"] == "true"
    assert runs["pay"] == 3


def test_wsgi_a_learned_template_matches_the_path_the_gate_sees(wsgi: Any) -> None:
    client = wsgi(ttl_policy=policy_for("POST /status/{code}", 900))
    response = wsgi_post(client, "/status/201", "k1")
    assert response.status_code == 201
    assert response.headers["Idempotency-Key-Expires"] == http_date(wsgi.clock.now + 900)


def test_wsgi_without_a_policy_the_header_is_the_fixed_ttl(wsgi: Any) -> None:
    client = wsgi()
    first = wsgi_post(client, "/payments", "k1")
    wsgi.clock.advance(60)
    replay = wsgi_post(client, "/payments", "k1")
    expires = first.headers["Idempotency-Key-Expires"]
    assert expires == http_date(wsgi.clock.now - 60 + DAY)
    assert replay.headers["Idempotency-Key-Expires"] == expires


# -- the gateway, as a real process ----------------------------------------------------------


def write_ttl(path: Path, ttl: float) -> None:
    """Written whole, then renamed over the old file: a reader never sees half of it."""
    entries = [{"tenant": TENANT_A, "route": "POST /pay", "ttl_seconds": ttl, "basis": 100}]
    part = path.with_suffix(".part")
    part.write_text(json.dumps({"findings": [], "ttl": entries}))
    os.replace(part, path)


def expires_in(response: httpx.Response, before: float, after: float) -> tuple[float, float]:
    """The header's expiry less the time of sending and of answering (an HTTP-date counts
    whole seconds)."""
    at = parsedate_to_datetime(response.headers["idempotency-key-expires"]).timestamp()
    return at - after, at - before + 1


@pytest.mark.slow
async def test_the_gateway_applies_a_ttl_file_and_reloads_it(tmp_path: Path) -> None:
    learned = tmp_path / "ttl.json"
    write_ttl(learned, 600)
    upstream_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    args = oncepay_args(
        "gateway", "--upstream", upstream, "--store", f"sqlite:///{tmp_path / 'g.db'}",
        "--port", str(port), "--adaptive-ttl", str(learned), "--adaptive-ttl-reload", "0.1",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    upstream_app = uvicorn_args("tests.http.upstream:app", upstream_port)
    with running(upstream_app, upstream_port), running(args, port):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def pay(key: str, tenant: str = "tenant-a") -> Any:
                before = time.time()
                response = await client.post("/pay", json={"amount": 1}, headers={
                    "authorization": f"Bearer {tenant}", "idempotency-key": key})  # fmt: skip
                assert response.status_code == 201, response.text
                return response, expires_in(response, before, time.time())

            first, (low, high) = await pay("k1")
            assert low <= 600 <= high
            _, (low, high) = await pay("k1", tenant="tenant-b")
            assert low <= DAY <= high
            replay, _ = await pay("k1")
            assert replay.headers["idempotent-replayed"] == "true"
            expires = first.headers["idempotency-key-expires"]
            assert replay.headers["idempotency-key-expires"] == expires

            write_ttl(learned, 1800)
            for attempt in range(600):  # the reloader checks every 0.1 s
                _, (low, high) = await pay(f"after-{attempt}")
                if high >= 1800:
                    break
                await asyncio.sleep(0.05)
            assert low <= 1800 <= high


def test_the_gateway_refuses_a_ttl_file_it_cannot_use(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    result = CliRunner().invoke(
        app,
        ["gateway", "--upstream", "http://127.0.0.1:9", "--adaptive-ttl", str(missing)],
    )
    assert result.exit_code == 2
    assert f"adaptive TTL file {missing}: cannot read it" in result.output
