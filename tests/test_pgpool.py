"""The asyncpg pool under ``PostgresStore`` (``oncepay/_drivers/pgpool.py``), on the real server.

What the store relies on: no more than ``max_size`` connections, callers beyond them served in
turn as connections come back, a connection kept after the server refused a statement but
dropped when it broke, a place freed by a caller that gave up, and a closed pool that refuses
loudly. Every pool counts the connections it opens, so "reused" and "opened anew" are facts, not
guesses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from oncepay._drivers.pgpool import Connection, Pool
from tests.servers import POSTGRES_URL, require_postgres

pytestmark = pytest.mark.postgres

# Long enough that a loaded machine never times a test out by accident; the timeout test
# waits for it once.
TIMEOUT = 5.0
PID = "SELECT pg_backend_pid() AS pid"


class Opened:
    """A connect function that remembers what it opened."""

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.first = asyncio.Event()

    async def __call__(self) -> Connection:
        conn = await asyncpg.connect(POSTGRES_URL, timeout=TIMEOUT)
        self.connections.append(conn)
        self.first.set()
        return conn


@pytest.fixture
async def opened() -> AsyncIterator[Opened]:
    require_postgres()
    opened = Opened()
    yield opened
    for conn in opened.connections:
        conn.terminate()


def pool(opened: Opened, max_size: int = 2, timeout: float = TIMEOUT) -> Pool:
    return Pool(opened, max_size=max_size, timeout=timeout)


async def pid(p: Pool) -> Any:
    return (await p.fetch(PID))[0]["pid"]


async def test_opens_min_size_up_front_and_reuses_an_idle_connection(opened: Opened) -> None:
    p = pool(opened)
    await p.open(1)
    assert len(opened.connections) == 1
    assert {await pid(p) for _ in range(5)} == {opened.connections[0].get_server_pid()}
    assert len(opened.connections) == 1
    await p.close()


async def test_callers_beyond_max_size_wait_for_a_connection_to_come_back(
    opened: Opened,
) -> None:
    p = pool(opened, max_size=2)
    release = asyncio.Event()
    out = [asyncio.Event(), asyncio.Event()]

    async def hold(taken: asyncio.Event) -> None:
        async with p.connection():
            taken.set()
            await release.wait()

    holders = [asyncio.create_task(hold(taken)) for taken in out]
    await asyncio.gather(*(taken.wait() for taken in out))  # both connections are out
    waiter = asyncio.create_task(pid(p))
    await asyncio.sleep(0)
    assert not waiter.done()
    release.set()
    await asyncio.gather(*holders)
    assert await waiter in {c.get_server_pid() for c in opened.connections}
    assert len(opened.connections) == 2
    await p.close()


async def test_a_caller_that_waits_longer_than_the_timeout_fails(opened: Opened) -> None:
    p = pool(opened, max_size=1, timeout=0.2)
    async with p.connection():
        with pytest.raises(TimeoutError, match="no PostgreSQL connection came free"):
            await p.fetch(PID)
    assert len(opened.connections) == 1
    await p.close()


async def test_a_refused_statement_keeps_its_connection(opened: Opened) -> None:
    p = pool(opened, max_size=1)
    first = await pid(p)
    with pytest.raises(asyncpg.PostgresError):
        await p.fetch("SELECT no_such_column FROM pg_class")
    assert await pid(p) == first
    assert len(opened.connections) == 1
    await p.close()


async def test_a_connection_the_server_killed_is_dropped_and_replaced(opened: Opened) -> None:
    p = pool(opened, max_size=1)
    closed = asyncio.Event()
    async with p.connection() as conn:
        first = conn.get_server_pid()
        conn.add_termination_listener(lambda _conn: closed.set())
    killer = await asyncpg.connect(POSTGRES_URL, timeout=TIMEOUT)
    try:
        await killer.execute("SELECT pg_terminate_backend($1)", first)
    finally:
        await killer.close()
    await asyncio.wait_for(closed.wait(), TIMEOUT)  # the EOF has reached the client
    assert await pid(p) != first
    assert len(opened.connections) == 2
    await p.close()


async def running(watcher: Connection, server_pid: int) -> None:
    """Until the server runs the statement: polling a condition with a deadline."""
    query = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep%'"
    deadline = time.monotonic() + TIMEOUT
    for _ in iter(lambda: time.monotonic() < deadline, False):
        if await watcher.fetchval(query, server_pid):
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the statement never reached the server")


async def test_a_caller_cancelled_mid_statement_drops_its_connection(opened: Opened) -> None:
    p = pool(opened, max_size=1)
    sleeping = asyncio.create_task(p.fetch("SELECT pg_sleep(60)"))
    await opened.first.wait()
    conn = opened.connections[0]
    server_pid = conn.get_server_pid()
    watcher = await asyncpg.connect(POSTGRES_URL, timeout=TIMEOUT)
    try:
        await running(watcher, server_pid)
    finally:
        await watcher.close()
    sleeping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sleeping
    assert conn.is_closed()  # out of step with the server: terminated, never reused
    assert await pid(p) != server_pid
    await p.close()


async def test_a_waiter_that_gives_up_does_not_take_a_place_with_it(opened: Opened) -> None:
    p = pool(opened, max_size=1)
    async with p.connection():
        waiter = asyncio.create_task(pid(p))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert await pid(p) == opened.connections[0].get_server_pid()
    assert len(opened.connections) == 1
    await p.close()


async def test_close_fails_the_waiters_and_refuses_new_callers(opened: Opened) -> None:
    p = pool(opened, max_size=1)
    async with p.connection() as conn:
        waiter = asyncio.create_task(pid(p))
        await asyncio.sleep(0)
        await p.close()
        with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
            await waiter
    assert conn.is_closed()  # in use at close: closed when it came back
    with pytest.raises(asyncpg.InterfaceError, match="pool is closed"):
        await p.fetch(PID)
