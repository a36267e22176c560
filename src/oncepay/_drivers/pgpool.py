"""A minimal pool of asyncpg connections, for the PostgreSQL store.

asyncpg's own ``Pool`` runs a reset query at every release (``pg_advisory_unlock_all(); CLOSE
ALL; UNLISTEN *; RESET ALL``, one more round trip) and wraps each release in
``asyncio.shield()``: about three times the client CPU of this pool (bench/drivers/RESULTS.md).
The store needs no reset: each statement it runs on a pooled connection is one autocommit
statement, which leaves no transaction, cursor, lock, LISTEN or setting behind.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

__all__ = ["Pool"]

Connection = Any  # an asyncpg.Connection (asyncpg ships no type hints)


class Pool:
    """At most ``max_size`` connections: idle ones in a deque, callers beyond them waiting in
    line (up to ``timeout`` seconds) for the next one released. Opens ``min_size`` up front and
    more on demand; never shrinks, but drops a connection that broke."""

    def __init__(
        self, connect: Callable[[], Awaitable[Connection]], *, max_size: int, timeout: float
    ) -> None:
        self._connect = connect
        self._max_size = max_size
        self._timeout = timeout
        self._idle: deque[Connection] = deque()
        # Each waiter gets a connection, or None: a place was freed, open a connection in it.
        self._waiters: deque[asyncio.Future[Connection | None]] = deque()
        self._size = 0  # connections open or being opened
        self._closed = False

    async def open(self, min_size: int) -> None:
        for _ in range(min_size):
            self._size += 1
            self._idle.append(await self._open_one())

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        """One statement on a pooled connection (prepared once per connection, by asyncpg)."""
        conn = await self._acquire()
        try:
            rows: list[Any] = await conn.fetch(query, *args)
        except asyncpg.PostgresError:
            self._release(conn)  # the server refused the statement; the connection is fine
            raise
        except BaseException:
            self._discard(conn)  # lost, or cancelled mid-statement: out of step
            raise
        self._release(conn)
        return rows

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        conn = await self._acquire()
        try:
            yield conn
        except asyncpg.PostgresError:
            self._release(conn)
            raise
        except BaseException:
            self._discard(conn)
            raise
        self._release(conn)

    async def close(self) -> None:
        """Close the idle connections; one still in use is closed when it comes back."""
        self._closed = True
        while self._waiters:
            if not (waiter := self._waiters.popleft()).done():
                waiter.set_exception(asyncpg.InterfaceError("the connection pool is closed"))
        idle, self._idle = self._idle, deque()
        self._size -= len(idle)
        # A connection that cannot close gracefully (its server is gone) is aborted by asyncpg.
        await asyncio.gather(
            *(c.close(timeout=self._timeout) for c in idle), return_exceptions=True
        )

    async def _acquire(self) -> Connection:
        while self._idle:
            conn = self._idle.popleft()
            if not conn.is_closed():
                return conn
            self._discard(conn)  # the server closed it while it was idle
        self._check_open()
        if self._size < self._max_size:
            self._size += 1
        elif (conn := await self._wait()) is not None:
            return conn
        return await self._open_one()

    async def _wait(self) -> Connection | None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Connection | None] = loop.create_future()
        # A bare timer: asyncio.timeout() costs ~3.5 us more per queued call (measured with a
        # fake connection: 12.3 against 8.8 us of pool and loop work per call at concurrency 32).
        timer = loop.call_later(self._timeout, _time_out, waiter)
        self._waiters.append(waiter)
        try:
            return await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._hand_over(waiter.result())  # it came just as we gave up: pass it on
            waiter.cancel()
            raise
        finally:
            timer.cancel()

    async def _open_one(self) -> Connection:
        """Open a connection in a place already counted; free the place if that fails."""
        try:
            self._check_open()
            return await self._connect()
        except BaseException:
            self._hand_over(None)
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise asyncpg.InterfaceError("the connection pool is closed")

    def _release(self, conn: Connection) -> None:
        if self._closed or conn.is_closed():
            self._discard(conn)
        else:
            self._hand_over(conn)

    def _discard(self, conn: Connection) -> None:
        conn.terminate()
        self._hand_over(None)

    def _hand_over(self, conn: Connection | None) -> None:
        """Give a connection, or a freed place (None), to the first waiter still waiting."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        if conn is None:
            self._size -= 1
        else:
            self._idle.append(conn)


def _time_out(waiter: asyncio.Future[Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("no PostgreSQL connection came free in time"))
