"""``@idempotent(transaction=...)``: the function's writes and its stored result commit
together (SPEC §3), on every driver a function may hold: sqlite3, psycopg (sync and async),
asyncpg, and SQLAlchemy sessions (sync over SQLite, async over asyncpg)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from oncepay import ConfigurationError, Engine, RequestInProgress, idempotent
from oncepay.idempotency import Record, RecordState
from oncepay.idempotency.stores import Store
from tests.clock import FakeClock
from tests.conftest import make_spec
from tests.http.transactional_apps import Database, postgres_database, sqlite_database

LEASE = 30.0
SCOPE = "orders"
SIGKILLED = -9  # a child's exitcode when SIGKILL ended it
CHILD_TIMEOUT = 60.0  # spawning an interpreter and one call; a minute means it hung
ASYNC_DRIVERS = {"psycopg-async", "asyncpg", "sqlalchemy-asyncpg"}
DRIVERS = {  # driver -> database
    "sqlite3": "sqlite",
    "sqlalchemy-sqlite": "sqlite",
    "psycopg": "postgres",
    "psycopg-async": "postgres",
    "asyncpg": "postgres",
    "sqlalchemy-asyncpg": "postgres",
}


class Rollback(Exception):
    """Raised to roll a transaction back on purpose."""


@dataclass(frozen=True)
class Case:
    driver: str
    db: Database


def _params() -> list[Any]:
    return [
        pytest.param(d, id=d, marks=[pytest.mark.postgres] if kind == "postgres" else [])
        for d, kind in DRIVERS.items()
    ]


@pytest.fixture(params=_params())
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    driver: str = request.param
    if DRIVERS[driver] == "sqlite":
        return Case(driver, sqlite_database(str(tmp_path)))
    return Case(driver, postgres_database(request.getfixturevalue("postgres_schema")))


@pytest.fixture
async def store(case: Case) -> AsyncIterator[Store]:
    """The decorator's store. A sync function's store calls run on the decorator's loop
    thread, so the store is closed there; tests read records through :func:`record_of`."""
    built = case.db.build_store()
    yield built
    if case.driver in ASYNC_DRIVERS:
        await built.aclose()
    else:
        from oncepay.idempotency.decorator import _LOOP

        _LOOP.run(built.aclose())


async def record_of(case: Case, key: str) -> Record | None:
    """The record as stored, read through a store of our own (on this loop)."""
    reader = case.db.build_store()
    try:
        return await reader.get(SCOPE, key)
    finally:
        await reader.aclose()


# -- the function, per driver ----------------------------------------------------------------------


def decorated(case: Case, engine: Engine, runs: list[str]) -> Callable[..., Any]:
    """``place(order_id, amount, conn)``: inserts a row, returns a receipt; ``amount`` < 0
    raises after the insert (the transaction rolls back)."""
    table = case.db.table

    def receipt(order_id: str, amount: int) -> dict[str, Any]:
        runs.append(order_id)
        if amount < 0:
            raise Rollback
        return {"order": order_id, "amount": amount}

    if case.driver in ASYNC_DRIVERS:

        @idempotent(engine, key="order_id", scope=SCOPE, transaction="conn")
        async def place_async(order_id: str, amount: int, conn: Any) -> dict[str, Any]:
            await _ainsert(case.driver, conn, table, order_id)
            return receipt(order_id, amount)

        return place_async

    @idempotent(engine, key="order_id", scope=SCOPE, transaction="conn")
    def place(order_id: str, amount: int, conn: Any) -> dict[str, Any]:
        if case.driver == "sqlite3":
            conn.execute(f"INSERT INTO {table} VALUES (?, 1)", (order_id,))
        elif case.driver == "psycopg":
            conn.execute(f"INSERT INTO {table} VALUES (%s, 1)", (order_id,))
        else:
            conn.execute(text(f"INSERT INTO {table} VALUES (:k, 1)"), {"k": order_id})
        return receipt(order_id, amount)

    return place


async def _ainsert(driver: str, conn: Any, table: str, key: str) -> None:
    if driver == "psycopg-async":
        await conn.execute(f"INSERT INTO {table} VALUES (%s, 1)", (key,))
    elif driver == "asyncpg":
        await conn.execute(f"INSERT INTO {table} VALUES ($1, 1)", key)
    else:
        await conn.execute(text(f"INSERT INTO {table} VALUES (:k, 1)"), {"k": key})


@contextlib.asynccontextmanager
async def connection(case: Case) -> AsyncIterator[Any]:
    """A fresh connection (or session) of the case's driver, closed afterwards."""
    db, driver = case.db, case.driver
    if driver == "sqlite3":
        conn = sqlite3.connect(db.target, check_same_thread=False)  # called via to_thread
        try:
            yield conn
        finally:
            conn.close()
    elif driver == "sqlalchemy-sqlite":
        engine = create_engine(db.sqlalchemy_url(asynchronous=False))
        try:
            with Session(engine) as session:
                yield session
        finally:
            engine.dispose()
    elif driver == "psycopg":
        with psycopg.connect(db.target) as pg:
            yield pg
    elif driver == "psycopg-async":
        async with await psycopg.AsyncConnection.connect(db.target) as apg:
            yield apg
    elif driver == "asyncpg":
        raw = await asyncpg.connect(db.target)
        try:
            yield raw
        finally:
            await raw.close()
    else:
        async_engine = create_async_engine(db.sqlalchemy_url(asynchronous=True))
        try:
            async with AsyncSession(async_engine) as async_session:
                yield async_session
        finally:
            await async_engine.dispose()


async def call(case: Case, place: Callable[..., Any], key: str, amount: int = 100) -> Any:
    async with connection(case) as conn:
        if case.driver in ASYNC_DRIVERS:
            return await place(key, amount, conn)
        return await asyncio.to_thread(place, key, amount, conn)


def engine_for(store: Store, clock: FakeClock) -> Engine:
    return Engine(store, clock=clock, ttl=3600.0, lease=LEASE)


# -- the tests -----------------------------------------------------------------------------------


async def test_the_functions_row_and_its_result_commit_together(
    case: Case, store: Store, clock: FakeClock
) -> None:
    runs: list[str] = []
    place = decorated(case, engine_for(store, clock), runs)
    key = uuid.uuid4().hex
    first = await call(case, place, key)
    assert first == {"order": key, "amount": 100}
    assert case.db.rows(key) == 1
    record = await record_of(case, key)
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert await call(case, place, key) == first  # replayed: not run, no second row
    assert runs == [key]
    assert case.db.rows(key) == 1


async def test_a_function_that_raises_leaves_neither_row_nor_record(
    case: Case, store: Store, clock: FakeClock
) -> None:
    runs: list[str] = []
    place = decorated(case, engine_for(store, clock), runs)
    key = uuid.uuid4().hex
    with pytest.raises(Rollback):
        await call(case, place, key, amount=-1)
    assert case.db.rows(key) == 0
    record = await record_of(case, key)
    assert record is not None
    assert record.state is RecordState.RELEASED  # nothing committed: a retry runs at once
    assert await call(case, place, key) == {"order": key, "amount": 100}
    assert case.db.rows(key) == 1


async def test_in_the_callers_transaction_its_rollback_leaves_neither_until_the_lease_lapses(
    case: Case, store: Store, clock: FakeClock
) -> None:
    runs: list[str] = []
    place = decorated(case, engine_for(store, clock), runs)
    key = uuid.uuid4().hex
    async with connection(case) as conn:
        with contextlib.suppress(Rollback):
            await _in_callers_transaction(case, conn, place, key)
    assert case.db.rows(key) == 0
    record = await record_of(case, key)
    assert record is not None
    assert record.state is RecordState.EXECUTING  # its completion went with the rollback
    with pytest.raises(RequestInProgress):
        await call(case, place, key)
    clock.advance(LEASE + 1)
    assert await call(case, place, key) == {"order": key, "amount": 100}
    assert runs == [key, key]
    assert case.db.rows(key) == 1


async def _in_callers_transaction(
    case: Case, conn: Any, place: Any, key: str, amount: int = 100
) -> None:
    """The caller opens the transaction, calls the function inside it, then rolls back."""
    if case.driver == "sqlite3":
        conn.execute("BEGIN")
        await asyncio.to_thread(place, key, amount, conn)
        conn.rollback()
        raise Rollback
    if case.driver in ("psycopg", "sqlalchemy-sqlite"):
        with conn.transaction() if case.driver == "psycopg" else conn.begin():
            await asyncio.to_thread(place, key, amount, conn)
            raise Rollback
    if case.driver == "sqlalchemy-asyncpg":
        async with conn.begin():
            await place(key, amount, conn)
            raise Rollback
    async with conn.transaction():  # psycopg async, asyncpg
        await place(key, amount, conn)
        raise Rollback


async def test_in_the_callers_transaction_a_raise_is_the_callers_to_roll_back(
    case: Case, store: Store, clock: FakeClock
) -> None:
    """The key is not released from inside the caller's transaction (on SQLite the release
    would wait for the write lock that very transaction holds): it is taken over later."""
    runs: list[str] = []
    place = decorated(case, engine_for(store, clock), runs)
    key = uuid.uuid4().hex
    async with connection(case) as conn:
        with contextlib.suppress(Rollback):
            await _in_callers_transaction(case, conn, place, key, amount=-1)
    assert case.db.rows(key) == 0
    record = await record_of(case, key)
    assert record is not None
    assert record.state is RecordState.EXECUTING
    clock.advance(LEASE + 1)
    with pytest.raises(Rollback):  # taken over: it runs again, on its own transaction now
        await call(case, place, key, amount=-1)
    assert runs == [key, key]
    record = await record_of(case, key)
    assert record is not None
    assert record.state is RecordState.RELEASED  # that one the decorator rolled back itself
    assert case.db.rows(key) == 0


def _place_then_get_killed(case: Case, key: str) -> None:
    asyncio.run(_place_in_child(case, key))


async def _place_in_child(case: Case, key: str) -> None:
    store = case.db.build_store()
    await call(case, decorated(case, engine_for(store, FakeClock()), []), key)
    os.kill(os.getpid(), signal.SIGKILL)  # committed; the caller never hears back


@pytest.mark.slow
async def test_a_process_killed_after_the_commit_replays_on_retry_with_one_row(
    case: Case, store: Store, clock: FakeClock
) -> None:
    key = uuid.uuid4().hex
    child = multiprocessing.get_context("spawn").Process(
        target=_place_then_get_killed, args=(case, key)
    )
    child.start()
    await asyncio.to_thread(child.join, CHILD_TIMEOUT)
    assert child.exitcode == SIGKILLED
    clock.advance(LEASE + 1)  # even once the dead caller's lease is over...
    runs: list[str] = []
    result = await call(case, decorated(case, engine_for(store, clock), runs), key)
    assert result == {"order": key, "amount": 100}
    assert runs == []  # ...the retry replays instead of running again
    assert case.db.rows(key) == 1


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["memory", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_store_that_cannot_complete_in_a_transaction_is_refused_when_decorating(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    store = make_spec(request, backend, tmp_path).build()
    with pytest.raises(ConfigurationError, match="cannot complete inside your transaction"):
        idempotent(store, key="order_id", transaction="conn")


def test_a_transaction_argument_the_function_does_not_have_is_refused(tmp_path: Path) -> None:
    decorate = idempotent(f"sqlite:///{tmp_path / 'k.db'}", key="order_id", transaction="session")
    with pytest.raises(ConfigurationError, match="'session'"):

        @decorate
        def place(order_id: str, conn: Any) -> None: ...


async def test_a_sync_function_given_an_async_connection_is_refused_and_frees_its_key(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = sqlite_database(str(tmp_path))
    store = db.build_store()
    runs: list[str] = []

    @idempotent(engine_for(store, clock), key="order_id", transaction="conn")
    def place(order_id: str, conn: Any) -> None:
        runs.append(order_id)

    engine = create_async_engine(db.sqlalchemy_url(asynchronous=True))
    try:
        async with AsyncSession(engine) as session:
            with pytest.raises(ConfigurationError, match="sync function"):
                await asyncio.to_thread(place, "k1", session)
    finally:
        await engine.dispose()
    assert runs == []
    record = await store.get("default", "k1")
    assert record is not None
    assert record.state is RecordState.RELEASED
    await store.aclose()
