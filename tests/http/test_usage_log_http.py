"""SPEC §9 on the HTTP surfaces: every decision the ASGI and WSGI middleware and the gateway
make lands in the key-usage log with its fields, and the log never fails or holds a request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from werkzeug.test import Client

from oncepay.http import IdempotencyMiddleware, IdempotencyWSGIMiddleware
from oncepay.idempotency import fingerprint, scope_from_authorization
from oncepay.insight.usage_log import UsageLog
from tests.conftest import make_spec
from tests.http.apps import Executions, fastapi_app, starlette_app
from tests.http.wsgi_apps import Runs, flask_app
from tests.insight.test_usage_log import NEVER, BlockedFile, DeadFile
from tests.processes import free_port, oncepay_args, running, uvicorn_args

AUTH = {"authorization": "Bearer tenant-a"}
TENANT = scope_from_authorization("Bearer tenant-a")
DAY = 86400.0


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def by_key(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["key"], r["decision"]): r for r in records}


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def post(client: httpx.AsyncClient, path: str, key: str | None, body: bytes) -> int:
    headers = {**AUTH, **({"idempotency-key": key} if key is not None else {})}
    return (await client.post(path, content=body, headers=headers)).status_code


# -- ASGI --------------------------------------------------------------------------------------


@pytest.fixture(params=["starlette", "fastapi"])
def framework(request: pytest.FixtureRequest) -> Any:
    return starlette_app if request.param == "starlette" else fastapi_app


async def test_asgi_records_every_decision_with_its_fields(framework: Any, tmp_path: Path) -> None:
    runs = Executions()
    usage = UsageLog(tmp_path / "usage.jsonl", raw_keys=True, interval=NEVER)
    app = IdempotencyMiddleware(framework(runs), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/payments", "k1", b'{"a": 1}') == 201
        assert await post(client, "/payments", "k1", b'{"a": 1}') == 201  # replayed
        assert await post(client, "/payments", "k1", b'{"a": 2}') == 422  # reused
        assert await post(client, "/payments", None, b"{}") == 400  # missing
        assert await post(client, "/payments", "a,b", b"{}") == 400  # invalid (folded)
        runs.hold.clear()
        first = asyncio.create_task(post(client, "/slow", "k2", b""))
        await runs.held.wait()
        assert await post(client, "/slow", "k2", b"") == 409  # in_progress
        runs.hold.set()
        assert await first == 201
        assert await post(client, "/status/202", "k3", b"") == 202
        assert await post(client, "/status/202", "k3", b"") == 202  # replayed, before routing
    usage.close()

    records = lines(tmp_path / "usage.jsonl")
    assert len(records) == 9
    seen = by_key(records)
    assert {(k, d): r["status"] for (k, d), r in seen.items()} == {
        ("k1", "executed"): 201,
        ("k1", "replayed"): 201,
        ("k1", "reused"): 422,
        ("", "missing"): 400,
        ("a,b", "invalid"): 400,
        ("k2", "in_progress"): 409,
        ("k2", "executed"): 201,
        ("k3", "executed"): 202,
        ("k3", "replayed"): 202,
    }
    executed = seen["k1", "executed"]
    assert executed["fingerprint"] == fingerprint("POST", "/payments", b'{"a": 1}')
    assert seen["k1", "replayed"]["fingerprint"] == executed["fingerprint"]
    assert seen["k1", "reused"]["fingerprint"] == fingerprint("POST", "/payments", b'{"a": 2}')
    assert {r["tenant"] for r in records} == {TENANT}
    assert {r["source"] for r in records} == {"127.0.0.1"}
    assert {r["ttl"] for r in records if r["decision"] not in ("missing", "invalid")} == {DAY}
    # no record was stored for a missing or malformed key: no TTL (a review found 86400)
    assert {r["ttl"] for r in records if r["decision"] in ("missing", "invalid")} == {None}
    assert executed["route"] == "POST /payments"


def refunds_app(framework: str) -> Any:
    """One route with a path parameter, as Starlette's Route or FastAPI's APIRoute."""
    if framework == "fastapi":
        from fastapi import FastAPI

        app = FastAPI()

        @app.post("/orders/{order_id}/refunds", status_code=201)
        async def refund(order_id: str) -> dict[str, str]:
            return {"order": order_id}

        return app
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"order": request.path_params["order_id"]}, status_code=201)

    return Starlette(routes=[Route("/orders/{order_id}/refunds", endpoint, methods=["POST"])])


@pytest.mark.parametrize("kind", ["starlette", "fastapi"])
async def test_asgi_logs_the_route_template_also_for_replays(kind: str, tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", interval=NEVER)
    app = IdempotencyMiddleware(refunds_app(kind), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/orders/o-1/refunds", "k1", b"") == 201
        assert await post(client, "/orders/o-1/refunds", "k1", b"") == 201  # never routed
    usage.close()
    records = lines(tmp_path / "usage.jsonl")
    assert [r["decision"] for r in records] == ["executed", "replayed"]
    assert {r["route"] for r in records} == {"POST /orders/{order_id}/refunds"}


async def test_asgi_logs_keys_hashed_by_default(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", interval=NEVER)
    app = IdempotencyMiddleware(starlette_app(Executions()), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/payments", "secret-key-1", b"{}") == 201
    usage.close()
    (record,) = lines(tmp_path / "usage.jsonl")
    assert record["key"] != "secret-key-1"
    assert len(record["key"]) == 32
    assert "secret-key-1" not in (tmp_path / "usage.jsonl").read_text()


async def test_asgi_user_route_function_wins(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", interval=NEVER)
    app = IdempotencyMiddleware(
        starlette_app(Executions()), usage_log=usage, route_template=lambda request: "/p/{x}"
    )
    async with client_for(app) as client:
        assert await post(client, "/payments", "k1", b"{}") == 201
        assert await post(client, "/payments", "k1", b"{}") == 201
    usage.close()
    assert [r["route"] for r in lines(tmp_path / "usage.jsonl")] == ["POST /p/{x}"] * 2


async def test_asgi_a_stalled_log_drops_and_counts_and_never_holds_a_request() -> None:
    file = BlockedFile()
    usage = UsageLog(file, capacity=1, interval=0.001)  # type: ignore[arg-type]
    runs = Executions()
    app = IdempotencyMiddleware(starlette_app(runs), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/payments", "k0", b"{}") == 201
        assert await asyncio.to_thread(file.entered.wait, 30)  # the writer is stuck in write()
        for i in range(1, 5):  # 1 buffered, 3 dropped: every request answered all the same
            assert await post(client, "/payments", f"k{i}", b"{}") == 201
    assert runs["pay"] == 5
    assert usage.dropped == 3
    file.release.set()
    usage.close()
    assert usage.written == 2


async def test_asgi_a_dead_disk_is_counted_and_never_fails_a_request(tmp_path: Path) -> None:
    usage = UsageLog(DeadFile(), interval=NEVER)  # type: ignore[arg-type]
    app = IdempotencyMiddleware(starlette_app(Executions()), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/payments", "k1", b"{}") == 201
        usage.flush()
        assert await post(client, "/payments", "k1", b"{}") == 201
    usage.close()
    assert usage.write_errors == 2
    assert usage.dropped == 2


async def test_asgi_lifespan_shutdown_writes_the_last_batch(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", interval=NEVER)
    app = IdempotencyMiddleware(starlette_app(Executions()), usage_log=usage)
    async with client_for(app) as client:
        assert await post(client, "/payments", "k1", b"{}") == 201
    assert not (tmp_path / "usage.jsonl").exists() or lines(tmp_path / "usage.jsonl") == []
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    assert sent[-1] == "lifespan.shutdown.complete"
    assert len(lines(tmp_path / "usage.jsonl")) == 1


# -- WSGI --------------------------------------------------------------------------------------


def wsgi_post(client: Client, path: str, key: str | None, body: bytes = b"{}") -> int:
    headers = {"Authorization": "Bearer tenant-a", "Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    client_address = {"REMOTE_ADDR": "10.1.2.3"}
    return client.post(path, data=body, headers=headers, environ_base=client_address).status_code


def test_wsgi_records_every_decision_with_its_fields(tmp_path: Path) -> None:
    runs = Runs()
    usage = UsageLog(tmp_path / "usage.jsonl", raw_keys=True, interval=NEVER)

    def template(request: Any) -> str | None:
        return "/status/{code}" if request.path.startswith("/status/") else None

    middleware = IdempotencyWSGIMiddleware(
        flask_app(runs), usage_log=usage, route_template=template
    )
    client = Client(middleware)
    try:
        assert wsgi_post(client, "/payments", "k1") == 201
        assert wsgi_post(client, "/payments", "k1") == 201
        assert wsgi_post(client, "/payments", "k1", b'{"b": 2}') == 422
        assert wsgi_post(client, "/payments", None) == 400
        assert wsgi_post(client, "/payments", "a,b") == 400
        runs.hold.clear()
        answers: list[int] = []
        first = threading.Thread(target=lambda: answers.append(wsgi_post(client, "/slow", "k2")))
        first.start()
        assert runs.held.wait(10)
        assert wsgi_post(client, "/slow", "k2") == 409
        runs.hold.set()
        first.join()
        assert answers == [201]
        assert wsgi_post(client, "/status/202", "k3") == 202
    finally:
        middleware.close()  # writes the last batch
    records = lines(tmp_path / "usage.jsonl")
    seen = by_key(records)
    assert {(k, d): r["status"] for (k, d), r in seen.items()} == {
        ("k1", "executed"): 201,
        ("k1", "replayed"): 201,
        ("k1", "reused"): 422,
        ("", "missing"): 400,
        ("a,b", "invalid"): 400,
        ("k2", "in_progress"): 409,
        ("k2", "executed"): 201,
        ("k3", "executed"): 202,
    }
    assert seen["k1", "executed"]["fingerprint"] == fingerprint("POST", "/payments", b"{}")
    assert {r["tenant"] for r in records} == {TENANT}
    assert {r["source"] for r in records} == {"10.1.2.3"}
    assert seen["k3", "executed"]["route"] == "POST /status/{code}"
    assert seen["k1", "replayed"]["route"] == "POST /payments"  # no template: the path
    assert seen["k2", "executed"]["ttl"] == DAY


def test_wsgi_a_dead_disk_never_fails_a_request() -> None:
    usage = UsageLog(DeadFile(), interval=NEVER)  # type: ignore[arg-type]
    middleware = IdempotencyWSGIMiddleware(flask_app(Runs()), usage_log=usage)
    client = Client(middleware)
    assert wsgi_post(client, "/payments", "k1") == 201
    middleware.close()
    assert usage.write_errors == 1
    assert usage.dropped == 1


# -- the gateway, a real process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    with running(uvicorn_args("tests.http.upstream:app", port), port):
        yield f"http://127.0.0.1:{port}"


@pytest.mark.slow
def test_the_gateway_writes_the_usage_log(
    upstream: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = make_spec(request, "sqlite", tmp_path).url
    log_path = tmp_path / "usage.jsonl"
    port = free_port()
    args = oncepay_args(
        "gateway",
        "--upstream",
        upstream,
        "--store",
        store,
        "--port",
        str(port),
        "--usage-log",
        str(log_path),
    )
    with running(args, port):
        url = f"http://127.0.0.1:{port}"
        headers = {**AUTH, "idempotency-key": "gw-key-1"}
        with httpx.Client(base_url=url) as client:
            assert client.post("/pay", content=b"{}", headers=headers).status_code == 201
            assert client.post("/pay", content=b"{}", headers=headers).status_code == 201
            assert client.post("/pay", content=b"{}", headers=AUTH).status_code == 400
    records = lines(log_path)  # the gateway has stopped: its last batch was written
    assert [(r["decision"], r["status"]) for r in records] == [
        ("executed", 201),
        ("replayed", 201),
        ("missing", 400),
    ]
    assert records[0]["key"] == records[1]["key"] != "gw-key-1"  # hashed, alike
    assert {r["route"] for r in records} == {"POST /pay"}
    assert {r["source"] for r in records} == {"127.0.0.1"}
    assert {r["tenant"] for r in records} == {TENANT}


def test_the_gateway_refuses_a_usage_log_in_a_missing_directory(tmp_path: Path) -> None:
    args = oncepay_args(
        "gateway", "--upstream", "http://127.0.0.1:9", "--usage-log", str(tmp_path / "no" / "u")
    )
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "directory does not exist" in " ".join((done.stdout + done.stderr).split())  # wrapped
