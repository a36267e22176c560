"""oncepay._drivers.sqlite: the driver-level SQLite connection under SQLAlchemy."""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from oncepay._drivers import sqlite as _sqlite


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
