"""The state of one simulated acquirer: its database, its faults and their dice, its clock,
its fee schedule, and the latch that creates the schema once. Handlers reach it through the
request's app.

Its database is a :class:`~oncepay.storage.db.Database`, the SQLite and PostgreSQL engines the
payments service uses too, from the package below both: the simulator imports nothing from
``oncepay.payments`` (``tests/test_import_graph.py`` checks it).
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response

from oncepay.reconciliation.fees import DEFAULT_SCHEDULE, FeeSchedule
from oncepay.simulator.faults import Faults, Operation, strike_after, strike_before
from oncepay.simulator.schema import create_schema
from oncepay.storage.db import Database, read, write, write_raw
from oncepay.storage.raw import Raw, raw, raw_sqlite

__all__ = ["Simulator", "simulator_of"]


class Simulator:
    """State of one simulator app: its database, faults and dice, and the schema latch."""

    def __init__(
        self,
        db: Database,
        faults: Faults,
        seed: int | None,
        clock: Callable[[], float],
        fees: FeeSchedule = DEFAULT_SCHEDULE,
    ) -> None:
        self.db = db
        self.faults = faults
        self.fees = fees  # what settlement reports charge per line
        self.random = random.Random(seed)  # noqa: S311 - fault dice, not secrets
        self.clock = clock
        self._ready = False
        self._lock = asyncio.Lock()
        self._inflight: set[asyncio.Task[Response]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        faults: Faults,
        seed: int | None,
        clock: Callable[[], float],
        fees: FeeSchedule = DEFAULT_SCHEDULE,
    ) -> Simulator:
        return cls(Database.from_url(url), faults, seed, clock, fees)

    async def ready(self) -> None:
        if self._ready:
            return
        async with self._lock:
            if not self._ready:
                async with write(self.db) as conn:
                    await create_schema(conn, sqlite=self.db.is_sqlite, schema=self.db.schema)
                self._ready = True

    async def aclose(self) -> None:
        await asyncio.gather(*self._inflight, return_exceptions=True)
        await self.db.aclose()

    async def before(self, operation: Operation) -> None:
        await strike_before(self.faults, self.random, operation)

    async def run(
        self, operation: Operation, work: Callable[[], Coroutine[Any, Any, Response]]
    ) -> Response:
        await self.before(operation)
        await self.ready()
        response = await self._whole(work)
        return await strike_after(self.faults, self.random, operation, response)

    async def _whole(self, work: Callable[[], Coroutine[Any, Any, Response]]) -> Response:
        """Run ``work`` to its end even if the caller gives up, as a server does when its
        client hangs up: in-process, a caller's timeout would otherwise cancel us mid-way.
        (``asyncio.shield`` by hand: one done callback hands the task's outcome to the
        caller's waiter and forgets the task; a cancelled caller cancels only its waiter.)"""
        loop = asyncio.get_running_loop()
        task = loop.create_task(work())
        waiter: asyncio.Future[Response] = loop.create_future()
        self._inflight.add(task)
        task.add_done_callback(functools.partial(self._finished, waiter))
        return await waiter

    def _finished(self, waiter: asyncio.Future[Response], task: asyncio.Task[Response]) -> None:
        self._inflight.discard(task)
        if task.cancelled():
            waiter.cancel()
            return
        error = task.exception()  # retrieved even when nobody waits any more
        if waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(task.result())

    def transaction(self) -> AbstractAsyncContextManager[Raw]:
        """One write transaction on the raw driver (every money move is raw statements): on
        SQLite the writer's own connection, without SQLAlchemy's transaction around it."""
        if self.db.is_sqlite:
            return _RawTransaction(self.db)
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Raw]:
        async with write(self.db) as conn:
            yield await raw(conn)

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        async with read(self.db) as conn:
            yield conn


class _RawTransaction:
    """``write_raw``'s transaction as a :class:`Raw` (a class, not a generator: see
    ``storage.db._RawWrite``)."""

    __slots__ = ("_write",)

    def __init__(self, db: Database) -> None:
        self._write = write_raw(db)

    async def __aenter__(self) -> Raw:
        return raw_sqlite(await self._write.__aenter__())

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: Any
    ) -> None:
        await self._write.__aexit__(kind, error, trace)


def simulator_of(request: Request) -> Simulator:
    simulator: Simulator = request.app.state.simulator
    return simulator
