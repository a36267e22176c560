"""Transactional completion (SPEC §3): an application whose data lives in the store's database
completes the idempotency record inside its own transaction, so its writes and the stored
response commit together or not at all.

Every test runs once per driver an application may hold: sqlite3, psycopg (sync and async),
asyncpg (plain and pooled), and SQLAlchemy sessions over each database. The application's
unit of work is ``pay``: insert a payment row and complete the record, in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from oncepay.errors import LeaseLost
from oncepay.idempotency import (
    Engine,
    Execute,
    Replay,
    StoredResponse,
    Ticket,
    fingerprint,
)
from oncepay.idempotency.records import RecordState
from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.postgres import PostgresStore
from oncepay.idempotency.stores.sqlite import SQLiteStore
from tests.clock import FakeClock
from tests.conftest import StoreSpec
from tests.servers import POSTGRES_URL

SCOPE = "merchant-a"
FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')
# The exit status of a child that crashed on purpose, told apart from one that failed (1).
CRASHED = 17
# How long the parent waits for the crashing child: it spawns an interpreter and makes three
# round trips; a minute means it hung.
CHILD_TIMEOUT = 60.0
# A watch timeout no test reaches, and the bound on a wake-up that should come at once.
NEVER = 600.0
WAKE_BOUND = 10.0

DRIVERS = {
    "sqlite3": "sqlite",
    "sqlalchemy-sqlite": "sqlite",
    "psycopg": "postgres",
    "psycopg-async": "postgres",
    "asyncpg": "postgres",
    "asyncpg-pool": "postgres",
    "sqlalchemy-psycopg": "postgres",
    "sqlalchemy-asyncpg": "postgres",
}
PG_DRIVERS = [driver for driver, backend in DRIVERS.items() if backend == "postgres"]


@dataclass(frozen=True)
class App:
    """An application with one business table in the store's database, reached through one
    driver. Picklable, so that a child process can rebuild it."""

    driver: str
    spec: StoreSpec
    database: str  # a SQLite path or a PostgreSQL URL
    table: str

    def build_store(self) -> TransactionalStore:
        store = self.spec.build()
        assert isinstance(store, SQLiteStore | PostgresStore)
        return store


TransactionalStore = SQLiteStore | PostgresStore  # the stores with complete_in / acomplete_in


def _driver_params(drivers: list[str]) -> list[object]:
    return [
        pytest.param(d, id=d, marks=[pytest.mark.postgres] if DRIVERS[d] == "postgres" else [])
        for d in drivers
    ]


@pytest.fixture(params=_driver_params(list(DRIVERS)))
def app(request: pytest.FixtureRequest, tmp_path: Path) -> App:
    driver: str = request.param
    if DRIVERS[driver] == "sqlite":
        path = tmp_path / "app.db"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE payments (idempotency_key TEXT NOT NULL, amount INTEGER)")
        return App(driver, StoreSpec("sqlite", f"sqlite:///{path}"), str(path), "payments")
    schema = request.getfixturevalue("postgres_schema")
    unique = uuid.uuid4().hex[:12]
    table = f"{schema}.payments_{unique}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (idempotency_key text NOT NULL, amount integer)")
    spec = StoreSpec("postgres", POSTGRES_URL, {"table": f"{schema}.rec_{unique}"})
    return App(driver, spec, POSTGRES_URL, table)


@pytest.fixture
async def store(app: App) -> AsyncIterator[TransactionalStore]:
    built = app.build_store()
    try:
        yield built
    finally:
        await built.aclose()


def engine_for(store: Store, clock: Callable[[], float]) -> Engine:
    return Engine(store, clock=clock, ttl=3600.0, lease=30.0)


async def executed(engine: Engine, key: str = "k1") -> Execute:
    decision = await engine.begin(SCOPE, key, FP)
    assert isinstance(decision, Execute), decision
    return decision


# -- the application's unit of work, per driver --------------------------------------------------


class Rollback(Exception):
    """Raised inside the application's transaction to roll it back on purpose."""


async def pay(app: App, store: TransactionalStore, ticket: Ticket, *, commit: bool = True) -> None:
    """Insert a payment and complete the record in one transaction; commit it, or roll it back
    after the completion (as if a later step of the application failed)."""
    with contextlib.suppress(Rollback):
        await PAY[app.driver](app, store, ticket, commit)


def _then(commit: bool) -> None:
    if not commit:
        raise Rollback


async def _pay_sqlite3(app: App, store: TransactionalStore, ticket: Ticket, commit: bool) -> None:
    conn = sqlite3.connect(app.database)
    try:
        with conn:  # one transaction: committed on success, rolled back on any exception
            conn.execute(f"INSERT INTO {app.table} VALUES (?, 100)", (ticket.key,))
            store.complete_in(conn, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time())
            _then(commit)
    finally:
        conn.close()


async def _pay_psycopg(app: App, store: TransactionalStore, ticket: Ticket, commit: bool) -> None:
    with psycopg.connect(app.database) as conn, conn.transaction():
        conn.execute(f"INSERT INTO {app.table} VALUES (%s, 100)", (ticket.key,))
        store.complete_in(conn, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time())
        _then(commit)


async def _pay_psycopg_async(
    app: App, store: TransactionalStore, ticket: Ticket, commit: bool
) -> None:
    async with await psycopg.AsyncConnection.connect(app.database) as conn, conn.transaction():
        await conn.execute(f"INSERT INTO {app.table} VALUES (%s, 100)", (ticket.key,))
        await store.acomplete_in(conn, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time())
        _then(commit)


async def _pay_asyncpg(app: App, store: TransactionalStore, ticket: Ticket, commit: bool) -> None:
    conn = await asyncpg.connect(app.database)
    try:
        await _pay_on_asyncpg(conn, app, store, ticket, commit)
    finally:
        await conn.close()


async def _pay_asyncpg_pool(
    app: App, store: TransactionalStore, ticket: Ticket, commit: bool
) -> None:
    pool = asyncpg.create_pool(app.database, min_size=1, max_size=1)
    async with pool, pool.acquire() as conn:  # a pool's proxy, not an asyncpg.Connection
        await _pay_on_asyncpg(conn, app, store, ticket, commit)


async def _pay_on_asyncpg(
    conn: object, app: App, store: TransactionalStore, ticket: Ticket, commit: bool
) -> None:
    async with conn.transaction():  # type: ignore[attr-defined]
        await conn.execute(f"INSERT INTO {app.table} VALUES ($1, 100)", ticket.key)  # type: ignore[attr-defined]
        await store.acomplete_in(conn, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time())
        _then(commit)


def _sqlalchemy_url(app: App, postgres_driver: str) -> str:
    if DRIVERS[app.driver] == "sqlite":
        return f"sqlite:///{app.database}"
    return app.database.replace("postgresql://", f"postgresql+{postgres_driver}://", 1)


async def _pay_sqlalchemy(
    app: App, store: TransactionalStore, ticket: Ticket, commit: bool
) -> None:
    engine = create_engine(_sqlalchemy_url(app, "psycopg"))
    try:
        with Session(engine) as session, session.begin():
            insert = text(f"INSERT INTO {app.table} VALUES (:key, 100)")
            session.execute(insert, {"key": ticket.key})
            store.complete_in(session, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time())
            _then(commit)
    finally:
        engine.dispose()


async def _pay_sqlalchemy_async(
    app: App, store: TransactionalStore, ticket: Ticket, commit: bool
) -> None:
    engine = create_async_engine(_sqlalchemy_url(app, "asyncpg"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            insert = text(f"INSERT INTO {app.table} VALUES (:key, 100)")
            await session.execute(insert, {"key": ticket.key})
            await store.acomplete_in(
                session, SCOPE, ticket.key, ticket.fence, RESPONSE, now=time.time()
            )
            _then(commit)
    finally:
        await engine.dispose()


PAY: dict[str, Callable[[App, TransactionalStore, Ticket, bool], Awaitable[None]]] = {
    "sqlite3": _pay_sqlite3,
    "sqlalchemy-sqlite": _pay_sqlalchemy,
    "psycopg": _pay_psycopg,
    "psycopg-async": _pay_psycopg_async,
    "asyncpg": _pay_asyncpg,
    "asyncpg-pool": _pay_asyncpg_pool,
    "sqlalchemy-psycopg": _pay_sqlalchemy,
    "sqlalchemy-asyncpg": _pay_sqlalchemy_async,
}


def payments(app: App) -> int:
    """How many payment rows the application has, read on a connection of our own."""
    query = f"SELECT count(*) FROM {app.table}"
    if DRIVERS[app.driver] == "sqlite":
        with sqlite3.connect(app.database) as lite:
            (count,) = lite.execute(query).fetchone()
    else:
        with psycopg.connect(app.database) as pg:
            (count,) = pg.execute(query).fetchone() or (None,)
    assert isinstance(count, int)
    return count


# -- the tests -----------------------------------------------------------------------------------


async def test_the_apps_writes_and_the_response_commit_together(
    app: App, store: TransactionalStore, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await pay(app, store, first.ticket)
    assert payments(app) == 1
    replay = await engine.begin(SCOPE, "k1", FP)
    assert isinstance(replay, Replay)
    assert replay.response == RESPONSE


async def test_a_rolled_back_transaction_leaves_the_key_executing_for_a_takeover(
    app: App, store: TransactionalStore, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await pay(app, store, first.ticket, commit=False)
    assert payments(app) == 0
    record = await store.get(SCOPE, "k1")
    assert record is not None
    assert (record.state, record.fence) == (RecordState.EXECUTING, first.ticket.fence)
    clock.advance(31)
    second = await executed(engine)
    assert second.ticket.resumed is True
    await pay(app, store, second.ticket)
    assert payments(app) == 1
    assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)


async def test_a_stale_fence_raises_and_the_app_rolls_back(
    app: App, store: TransactionalStore, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    clock.advance(31)
    second = await executed(engine)  # the first worker's lease ran out; this one took over
    with pytest.raises(LeaseLost):
        await pay(app, store, first.ticket)
    assert payments(app) == 0  # the stale worker's payment went with its transaction
    record = await store.get(SCOPE, "k1")
    assert record is not None
    assert (record.state, record.fence) == (RecordState.EXECUTING, second.ticket.fence)
    await pay(app, store, second.ticket)
    assert payments(app) == 1


def _pay_then_crash(app: App, key: str) -> None:
    asyncio.run(_claim_and_pay(app, key))
    os._exit(CRASHED)  # the transaction committed; the process dies before anyone hears back


async def _claim_and_pay(app: App, key: str) -> None:
    store = app.build_store()
    first = await executed(Engine(store, ttl=3600.0, lease=30.0), key)
    await pay(app, store, first.ticket)


@pytest.mark.slow
async def test_a_crash_after_the_business_commit_can_no_longer_cause_a_second_execution(
    app: App, store: TransactionalStore
) -> None:
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_pay_then_crash, args=(app, "k1"))
    child.start()
    await asyncio.to_thread(child.join, CHILD_TIMEOUT)
    assert child.exitcode == CRASHED
    clock = FakeClock()
    clock.advance(31)  # even once the crashed worker's lease has run out...
    retry = await engine_for(store, clock).begin(SCOPE, "k1", FP)
    assert isinstance(retry, Replay)  # ...the retry replays instead of executing again
    assert retry.response == RESPONSE
    assert payments(app) == 1


@pytest.mark.parametrize("app", _driver_params(PG_DRIVERS), indirect=True)
async def test_waiters_are_woken_when_the_apps_transaction_commits(
    app: App, store: TransactionalStore, clock: FakeClock
) -> None:
    first = await executed(engine_for(store, clock))
    async with store.watch(SCOPE, "k1") as watch:
        await pay(app, store, first.ticket)
        await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)


def test_the_sqlite_store_refuses_a_connection_type_it_does_not_know(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "keys.db"))
    with pytest.raises(TypeError, match="complete_in"):
        store.complete_in(object(), SCOPE, "k1", 1, RESPONSE, now=time.time())
    with pytest.raises(TypeError, match="acomplete_in"):
        asyncio.run(store.acomplete_in(object(), SCOPE, "k1", 1, RESPONSE, now=time.time()))
