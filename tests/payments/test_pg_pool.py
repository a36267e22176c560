"""The payments database's PostgreSQL pool (issue 18): a check-out costs no round trip, every
connection stays pooled, and a connection the server closed while idle is replaced at
check-out, so the first request after a restart does not fail."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from oncepay.storage.db import POOL_OVERFLOW, POOL_SIZE, Database, write
from tests.payments.stack import drop_schema
from tests.servers import POSTGRES_URL, require_postgres


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    require_postgres()
    url = f"{POSTGRES_URL}?schema=oncepay_pool_{uuid.uuid4().hex[:10]}"
    database = Database.from_url(url)
    try:
        yield database
    finally:
        await database.aclose()
        await drop_schema(url)


async def backend_pids(db: Database, concurrency: int) -> set[int]:
    """The server processes of ``concurrency`` transactions held open at once."""
    gate = asyncio.Event()
    started = 0

    async def one() -> int:
        nonlocal started
        async with write(db) as conn:
            pid = int((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            started += 1
            if started == concurrency:
                gate.set()
            await gate.wait()  # every transaction holds its connection at once
            return pid

    return set(await asyncio.gather(*(one() for _ in range(concurrency))))


async def test_a_check_out_sends_nothing(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    await backend_pids(db, 2)  # connections opened
    sent: list[str] = []
    original = asyncpg.Connection.fetchrow

    async def fetchrow(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(query)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetchrow", fetchrow)
    for _ in range(5):
        async with write(db) as conn:
            await conn.execute(text("SELECT 1"))
    assert ";" not in sent  # SQLAlchemy's pre-ping: BEGIN, ";", ROLLBACK at every check-out


async def test_every_connection_stays_pooled(db: Database) -> None:
    """No overflow connections closed at check-in and reopened: the same backends serve a
    second burst as large as the pool."""
    size = POOL_SIZE + POOL_OVERFLOW
    first = await backend_pids(db, size)
    again = await backend_pids(db, size)
    assert len(first) == size
    assert again == first


async def test_connections_the_server_closed_while_idle_are_replaced(db: Database) -> None:
    pids = await backend_pids(db, 3)
    admin = await asyncpg.connect(POSTGRES_URL)
    try:
        # With a timeout, pg_terminate_backend returns once the backend has exited (and its
        # socket is closed).
        killed = await admin.fetch(
            "SELECT pg_terminate_backend(pid, 5000) FROM unnest($1::int[]) AS pid", list(pids)
        )
    finally:
        await admin.close()
    assert [row[0] for row in killed] == [True] * 3
    for _ in range(3):  # the loop reads each closed socket's end, then marks it closed
        await asyncio.sleep(0)
    after = await backend_pids(db, 3)  # would raise on a dead connection
    assert not after & pids
