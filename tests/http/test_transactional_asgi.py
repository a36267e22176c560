"""Transactional completion through the ASGI middleware (SPEC §3): FastAPI with SQLAlchemy
(async and sync sessions), Starlette with asyncpg and a plain ASGI app with psycopg, on
SQLite and PostgreSQL, each completing its request's record inside its own transaction."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import uuid
from collections.abc import AsyncIterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.errors import ConfigurationError
from oncepay.http import IdempotencyMiddleware, RequestTicket, request_ticket
from oncepay.idempotency import Engine, RecordState, StoredResponse
from oncepay.idempotency.stores import Store
from tests.clock import FakeClock
from tests.conftest import make_spec
from tests.http.transactional_apps import (
    ASGI_APPS,
    AUTH,
    Database,
    adispose_engines,
    answer,
    postgres_database,
    sqlite_database,
)

SIGKILLED = -9  # a child's exitcode when SIGKILL ended it
CHILD_TIMEOUT = 60.0  # spawning an interpreter and one request; a minute means it hung
LEASE = 30.0

VARIANTS = [  # (app, database)
    ("fastapi-sqlalchemy-async", "sqlite"),
    ("fastapi-sqlalchemy-async", "postgres"),
    ("fastapi-sqlalchemy-sync", "sqlite"),
    ("fastapi-sqlalchemy-sync", "postgres"),
    ("starlette-asyncpg", "postgres"),
    ("asgi-psycopg", "postgres"),
]


def _params() -> list[Any]:
    return [
        pytest.param(v, id=f"{v[0]}-{v[1]}",
                     marks=[pytest.mark.postgres] if v[1] == "postgres" else [])
        for v in VARIANTS
    ]  # fmt: skip


@pytest.fixture(params=_params())
def variant(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Database]:
    app, kind = request.param
    if kind == "sqlite":
        return app, sqlite_database(str(tmp_path))
    return app, postgres_database(request.getfixturevalue("postgres_schema"))


@pytest.fixture
async def store(variant: tuple[str, Database]) -> AsyncIterator[Store]:
    built = variant[1].build_store()
    yield built
    await built.aclose()
    await adispose_engines()


def middleware(app_name: str, db: Database, store: Store, clock: Any) -> IdempotencyMiddleware:
    engine = Engine(store, clock=clock, ttl=3600.0, lease=LEASE)
    return IdempotencyMiddleware(ASGI_APPS[app_name](db), engine=engine, transactional=True)


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def pay(client: httpx.AsyncClient, key: str, **headers: str) -> httpx.Response:
    sent = {"authorization": AUTH, "idempotency-key": key, **headers}
    return await client.post("/payments", json={"amount": 100}, headers=sent)


async def test_the_apps_row_and_the_stored_response_commit_together(
    variant: tuple[str, Database], store: Store, clock: FakeClock
) -> None:
    app_name, db = variant
    built = middleware(app_name, db, store, clock)
    key = uuid.uuid4().hex
    async with client_for(built) as client:
        first = await pay(client, key)
        assert first.status_code == 201
        assert first.json() == answer(key)
        assert db.rows(key) == 1
        record = await store.get(_scope(), key)
        assert record is not None
        assert record.state is RecordState.COMPLETED
        assert record.response is not None
        assert record.response.body == first.content
        replay = await pay(client, key)
    assert replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == first.content
    assert db.rows(key) == 1
    assert built.gate.mismatches == 0  # what was sent is what was stored


async def test_a_rollback_leaves_neither_row_nor_record_and_the_key_runs_again(
    variant: tuple[str, Database], store: Store, clock: FakeClock
) -> None:
    app_name, db = variant
    key = uuid.uuid4().hex
    async with client_for(middleware(app_name, db, store, clock)) as client:
        failed = await pay(client, key, **{"x-rollback": "1"})
        assert failed.status_code == 500
        assert db.rows(key) == 0
        record = await store.get(_scope(), key)
        assert record is not None
        assert record.state is not RecordState.COMPLETED
        clock.advance(LEASE + 1)  # released, or once the lease is over: either way it runs
        retried = await pay(client, key)
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert db.rows(key) == 1


def _pay_then_get_killed(app_name: str, db: Database, key: str) -> None:
    asyncio.run(_pay_in_child(app_name, db, key))


async def _pay_in_child(app_name: str, db: Database, key: str) -> None:
    store = db.build_store()
    async with client_for(middleware(app_name, db, store, FakeClock())) as client:
        await pay(client, key, **{"x-crash": "1"})  # SIGKILLed after the commit


@pytest.mark.slow
async def test_a_process_killed_after_the_commit_replays_on_retry_with_one_row(
    variant: tuple[str, Database], store: Store, clock: FakeClock
) -> None:
    app_name, db = variant
    key = uuid.uuid4().hex
    child = multiprocessing.get_context("spawn").Process(
        target=_pay_then_get_killed, args=(app_name, db, key)
    )
    child.start()
    await asyncio.to_thread(child.join, CHILD_TIMEOUT)
    assert child.exitcode == SIGKILLED
    assert db.rows(key) == 1
    clock.advance(LEASE + 1)  # even once the dead worker's lease is over...
    async with client_for(middleware(app_name, db, store, clock)) as client:
        retried = await pay(client, key)
    assert retried.status_code == 201  # ...the retry replays instead of paying again
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.json() == answer(key)
    assert db.rows(key) == 1


def _scope() -> str:
    from oncepay.idempotency.keys import scope_from_authorization

    return scope_from_authorization(AUTH)


# -- the contract around the ticket ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_store_that_cannot_complete_in_a_transaction_is_refused_when_built(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = make_spec(request, backend, tmp_path).build()
    with pytest.raises(ConfigurationError, match="transactional=True"):
        IdempotencyMiddleware(_echo_ticket, store=store, transactional=True)


async def _echo_ticket(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    """Answers whether it found a ticket (``ticket``/``none``) or no middleware (``error``)."""
    try:
        found = "none" if request_ticket(scope) is None else "ticket"
    except ConfigurationError:
        found = "error"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": found.encode()})


async def test_request_ticket_is_none_for_unmanaged_requests_and_an_error_without_middleware(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'keys.db'}"
    async with client_for(IdempotencyMiddleware(_echo_ticket, store=store_url,
                                                 transactional=True)) as client:  # fmt: skip
        managed = await client.post("/x", headers={"authorization": AUTH, "idempotency-key": "k"})
        assert managed.text == "ticket"
        assert (await client.get("/x")).text == "none"
    async with client_for(IdempotencyMiddleware(_echo_ticket, store=store_url)) as client:
        assert (await client.get("/x")).text == "error"  # not transactional: no tickets at all


async def test_a_response_sent_other_than_the_one_completed_is_logged_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.http.transactional_apps import sqlite_database

    db = sqlite_database(str(tmp_path))

    async def liar(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        ticket = request_ticket(scope)
        assert isinstance(ticket, RequestTicket)
        import sqlite3

        with sqlite3.connect(db.target) as conn:
            ticket.complete_in(conn, StoredResponse(201, (), b"stored"))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"sent"})

    built = IdempotencyMiddleware(liar, store=db.build_store(), transactional=True)
    with caplog.at_level(logging.ERROR, logger="oncepay.http"):
        async with client_for(built) as client:
            first = await client.post("/x", headers={"authorization": AUTH, "idempotency-key": "k"})
            again = await client.post("/x", headers={"authorization": AUTH, "idempotency-key": "k"})
    assert first.content == b"sent"
    assert again.content == b"stored"  # the record is the app's completion, not stored twice
    assert built.gate.mismatches == 1
    assert "not the one completed" in caplog.text


async def test_a_status_that_is_never_stored_cannot_be_completed(tmp_path: Path) -> None:
    db = sqlite_database(str(tmp_path))
    errors: list[Exception] = []

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        ticket = request_ticket(scope)
        assert ticket is not None
        try:
            ticket.complete_in(object(), StoredResponse(503, (), b""))
        except ConfigurationError as exc:
            errors.append(exc)
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    built = IdempotencyMiddleware(app, store=db.build_store(), transactional=True)
    async with client_for(built) as client:
        await client.post("/x", headers={"authorization": AUTH, "idempotency-key": "k"})
    assert len(errors) == 1
    assert "never stored" in str(errors[0])


async def _run_asgi(app: Any, sent: list[dict[str, Any]]) -> None:
    """One managed POST straight through ``app``, recording every message it sends."""
    scope = {
        "type": "http", "method": "POST", "path": "/x", "query_string": b"",
        "headers": [(b"authorization", AUTH.encode()), (b"idempotency-key", b"k")],
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)


def _completing_app(db: Database, after: Any) -> Any:
    """Completes and commits on sqlite3, sends its answer, then runs ``after()`` (awaited)."""

    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        ticket = request_ticket(scope)
        assert ticket is not None
        import sqlite3

        with sqlite3.connect(db.target) as conn:
            ticket.complete_in(conn, StoredResponse(201, (), b"done"))
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await after()

    return app


async def test_the_answer_waits_for_the_app_to_return_after_completing_in_its_transaction(
    tmp_path: Path,
) -> None:
    """A FastAPI dependency's teardown (the commit, say) runs after the endpoint's response:
    the last chunk must not go out before it is done."""
    db = sqlite_database(str(tmp_path))
    sent: list[dict[str, Any]] = []
    seen_while_running: list[list[str]] = []

    async def teardown() -> None:
        for _ in range(3):  # suspends, as a commit's round trip would
            await asyncio.sleep(0)
        seen_while_running.append([m["type"] for m in sent])

    built = IdempotencyMiddleware(
        _completing_app(db, teardown), store=db.build_store(), transactional=True
    )
    await _run_asgi(built, sent)
    assert seen_while_running == [[]]  # nothing sent while the app still ran
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == b"done"


async def test_an_app_that_fails_after_completing_sends_nothing_more_and_keeps_its_record(
    tmp_path: Path,
) -> None:
    db = sqlite_database(str(tmp_path))
    sent: list[dict[str, Any]] = []

    async def fail() -> None:
        raise RuntimeError("after the commit")

    store = db.build_store()
    built = IdempotencyMiddleware(_completing_app(db, fail), store=store, transactional=True)
    with pytest.raises(RuntimeError):
        await _run_asgi(built, sent)
    assert sent == []  # the server answers 500; the client retries and gets the replay
    record = await store.get(_scope(), "k")
    assert record is not None
    assert record.state is RecordState.COMPLETED  # the fenced release changed nothing
    await store.aclose()
