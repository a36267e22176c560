"""oncepay._drivers.sqlite: the driver-level SQLite connection under SQLAlchemy."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import event, text

from oncepay._drivers import sqlite as _sqlite
from oncepay.storage.db import Database, read, write


async def test_a_commit_never_queues_behind_begins_that_wait_for_its_lock(tmp_path: Path) -> None:
    """Connection A holds the write lock; four others wait in BEGIN IMMEDIATE for it. A's COMMIT
    must not wait for a thread they hold: on the loop's shared pool (two threads here) it
    queued behind them, and they timed out with 'database is locked' before it could run."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
    path = str(tmp_path / "locks.db")
    holder = await _sqlite.connect(path, timeout=3.0)
    waiters = [await _sqlite.connect(path, timeout=3.0) for _ in range(4)]
    try:
        await holder.execute("CREATE TABLE t (n INTEGER)")
        await holder.execute("BEGIN IMMEDIATE")
        await holder.execute("INSERT INTO t VALUES (0)")

        async def write(conn: _sqlite.Connection, n: int) -> None:
            await conn.execute("BEGIN IMMEDIATE")
            await conn.execute("INSERT INTO t VALUES (?)", (n,))
            await conn.execute("COMMIT")

        # submitted before the holder's COMMIT, so on a shared pool they take its threads first
        tasks = [asyncio.ensure_future(write(conn, n)) for n, conn in enumerate(waiters, 1)]
        for _ in range(5):
            await asyncio.sleep(0)
        await holder.execute("COMMIT")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
        rows = await (await holder.execute("SELECT n FROM t ORDER BY n")).fetchall()
        assert [n for (n,) in rows] == [0, 1, 2, 3, 4]
    finally:
        for conn in (holder, *waiters):
            await conn.close()


async def test_a_closed_connection_is_closed_and_its_thread_stopped(tmp_path: Path) -> None:
    conn = await _sqlite.connect(str(tmp_path / "c.db"), timeout=1.0)
    await conn.execute("BEGIN IMMEDIATE")
    await conn.execute("COMMIT")
    await conn.close()
    with pytest.raises(sqlite3.ProgrammingError):
        await conn.execute("SELECT 1")
    with pytest.raises(RuntimeError):
        await conn.commit()  # its thread is gone: nothing can run there any more


async def test_connect_switches_to_wal(tmp_path: Path) -> None:
    conn = await _sqlite.connect(str(tmp_path / "w.db"), timeout=1.0)
    try:
        rows = await (await conn.execute("PRAGMA journal_mode")).fetchall()
        assert rows == [("wal",)]
    finally:
        await conn.close()


async def test_begin_immediate_runs_on_the_loop_when_the_lock_is_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A free write lock is taken on the loop (no thread hop); a held one is waited for on the
    connection's thread, up to its busy timeout, which the attempt leaves as it was."""
    path = str(tmp_path / "free.db")
    conn = await _sqlite.connect(path, timeout=2.5)
    other = sqlite3.connect(path, isolation_level=None)  # another process, as far as locks go
    hops: list[str] = []
    original = _sqlite.Connection._on_thread

    async def counted(self: _sqlite.Connection, function: object, *args: object) -> object:
        hops.append(str(args[0]) if args else getattr(function, "__name__", "?"))
        return await original(self, function, *args)

    monkeypatch.setattr(_sqlite.Connection, "_on_thread", counted)
    try:
        await conn.execute("CREATE TABLE t (n INTEGER)")
        await conn.execute("BEGIN IMMEDIATE")
        assert conn._conn.in_transaction
        await conn.execute("INSERT INTO t VALUES (1)")
        await conn.execute("COMMIT")
        assert hops == ["COMMIT"]  # the BEGIN took no thread
        timeout = await (await conn.execute("PRAGMA busy_timeout")).fetchall()
        assert timeout == [(2500,)]

        other.execute("BEGIN IMMEDIATE")  # the lock is held elsewhere: the BEGIN must wait
        waiting = asyncio.ensure_future(conn.execute("BEGIN IMMEDIATE"))
        for _ in range(20):
            await asyncio.sleep(0.01)
            if "BEGIN IMMEDIATE" in hops:
                break
        assert hops[-1] == "BEGIN IMMEDIATE"
        assert not waiting.done()
        other.execute("INSERT INTO t VALUES (2)")
        other.execute("COMMIT")
        await waiting  # begun once the other committed
        rows = await (await conn.execute("SELECT n FROM t ORDER BY n")).fetchall()
        assert rows == [(1,), (2,)]
        await conn.execute("COMMIT")
        timeout = await (await conn.execute("PRAGMA busy_timeout")).fetchall()
        assert timeout == [(2500,)]
    finally:
        other.close()
        await conn.close()


async def test_transactions_begin_beside_sqlalchemy_and_wait_through_it_when_locked(
    tmp_path: Path,
) -> None:
    """``write()`` and ``read()`` begin on the driver directly (no statement through
    SQLAlchemy's machinery) while the write lock is free; a write that finds the lock held by
    another connection waits for it through SQLAlchemy, then commits its rows."""
    path = tmp_path / "begin.db"
    db = Database.from_url(f"sqlite:///{path}")
    through: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        through.append(statement)

    event.listen(db.engine.sync_engine, "before_cursor_execute", seen)
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        async with write(db) as conn:
            await conn.execute(text("CREATE TABLE t (n INTEGER)"))
        async with read(db) as conn:
            assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
        assert through == ["CREATE TABLE t (n INTEGER)", "SELECT count(*) FROM t"]

        other.execute("BEGIN IMMEDIATE")  # another process, as far as SQLite's locks go

        async def insert() -> None:
            async with write(db) as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))

        waiting = asyncio.ensure_future(insert())
        async with asyncio.timeout(10):
            while "BEGIN IMMEDIATE" not in through:  # noqa: ASYNC110 - SQLAlchemy's event
                await asyncio.sleep(0.01)
        assert not waiting.done()
        other.execute("COMMIT")
        async with asyncio.timeout(10):
            await waiting
        assert [n for (n,) in other.execute("SELECT n FROM t")] == [1]
    finally:
        other.close()
        await db.aclose()


async def test_writes_keep_one_connection_and_drop_it_when_a_transaction_fails(
    tmp_path: Path,
) -> None:
    """SQLite's ``write()`` transactions use one connection, checked out of the pool once; a
    transaction that fails is rolled back and its connection goes back to the pool, and the
    next write checks out another; ``aclose()`` returns the one held."""
    db = Database.from_url(f"sqlite:///{tmp_path / 'writer.db'}")
    pool: list[str] = []
    event.listen(db.engine.sync_engine.pool, "checkout", lambda *_: pool.append("out"))
    event.listen(db.engine.sync_engine.pool, "checkin", lambda *_: pool.append("in"))
    try:
        seen = []
        for n in range(3):
            async with write(db) as conn:
                if not n:
                    await conn.execute(text("CREATE TABLE t (n INTEGER)"))
                await conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
                seen.append(conn)
        assert seen[0] is seen[1] is seen[2]
        assert pool == ["out"]

        async def failing() -> None:
            async with write(db) as conn:
                await conn.execute(text("INSERT INTO t VALUES (99)"))
                raise LookupError("the block fails after writing")

        with pytest.raises(LookupError):
            await failing()
        assert pool == ["out", "in"]
        async with write(db) as conn:
            assert conn is not seen[0]
            rows = (await conn.execute(text("SELECT n FROM t ORDER BY n"))).all()
        assert [n for (n,) in rows] == [0, 1, 2]  # 99 rolled back
        assert pool == ["out", "in", "out"]
    finally:
        await db.aclose()
    assert pool == ["out", "in", "out", "in"]
