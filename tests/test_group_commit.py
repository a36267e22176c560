"""Group commit on SQLite (oncepay._drivers.sqlite.GroupCommit under oncepay.storage.db): a
transaction is visible at COMMIT and reported durable — ``write()`` returns, the acquirer is
called, the answer leaves — only after an fdatasync of the WAL that began after it committed.

The syncs are real; the tests wrap the fdatasync to hold it, count it, fail it, or copy the
files as a power cut could leave them (the state as of the last sync that completed)."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from oncepay._drivers.sqlite import GroupCommit
from oncepay.errors import ConfigurationError
from oncepay.storage.db import Database, read, write
from tests.payments.stack import running_stack

# A guard, not a measure: a barrier that never comes fails the test instead of hanging it.
HANG = 60.0


class HeldSync:
    """An fdatasync that waits, on the sync thread, for the test to let it go, after calling
    ``inspect`` there (a snapshot of what the sync is about to make durable)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, inspect: Callable[[], object]) -> None:
        self.loop, self.inspect = loop, inspect
        self._entered: asyncio.Queue[object] = asyncio.Queue()
        self.gate = threading.Semaphore(0)

    async def entered(self) -> object:
        """The snapshot of the next sync, once it is held."""
        async with asyncio.timeout(HANG):
            return await self._entered.get()

    def __call__(self, fd: int) -> None:
        seen = self.inspect()
        self.loop.call_soon_threadsafe(self._entered.put_nowait, seen)
        self.gate.acquire()
        os.fdatasync(fd)

    def release(self) -> None:
        self.gate.release()


def rows(path: Path, sql: str = "SELECT n FROM t ORDER BY n") -> list[int]:
    conn = sqlite3.connect(path)
    try:
        return [n for (n,) in conn.execute(sql).fetchall()]
    finally:
        conn.close()


async def insert(db: Database, n: int) -> None:
    async with write(db) as conn:
        await conn.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})


async def new_table(
    tmp_path: Path, name: str = "group.db", columns: str = "n INTEGER PRIMARY KEY"
) -> tuple[Database, GroupCommit, Path]:
    path = tmp_path / name
    db = Database.from_url(f"sqlite:///{path}")
    assert db.group is not None
    async with write(db) as conn:
        await conn.execute(text(f"CREATE TABLE t ({columns})"))
    return db, db.group, path


async def until(holds: Callable[[], bool]) -> None:
    """Let the writers run until ``holds()`` (they commit on the loop and its threads)."""
    async with asyncio.timeout(HANG):
        while not holds():  # noqa: ASYNC110 - the condition is the database's, no event to wait on
            await asyncio.sleep(0)


async def next_event(held: HeldSync, task: asyncio.Task[object]) -> object | None:
    """The next held sync's snapshot, or None once ``task`` finished without another sync."""
    getter = asyncio.ensure_future(held.entered())
    done, _ = await asyncio.wait({getter, task}, timeout=HANG, return_when=asyncio.FIRST_COMPLETED)
    assert done, "neither a sync nor the answer came"
    if getter in done:
        return getter.result()
    getter.cancel()
    return None


async def test_sqlite_defaults_to_group_commit_and_full_is_an_option(tmp_path: Path) -> None:
    group = Database.from_url(f"sqlite:///{tmp_path / 'a.db'}")
    full = Database.from_url(f"sqlite:///{tmp_path / 'b.db'}?synchronous=FULL")
    assert group.group is not None
    assert full.group is None
    assert full.url == f"sqlite:///{tmp_path / 'b.db'}"  # our option is not passed on
    await group.aclose()
    await full.aclose()
    with pytest.raises(ConfigurationError):
        Database.from_url(f"sqlite:///{tmp_path / 'c.db'}?synchronous=OFF")


async def test_connections_commit_without_a_sync_of_their_own(tmp_path: Path) -> None:
    """NORMAL under group commit (the sync is GroupCommit's), FULL when asked for."""
    for suffix, expected in (("", 1), ("?synchronous=FULL", 2)):
        db = Database.from_url(f"sqlite:///{tmp_path / 'p.db'}{suffix}")
        try:
            async with write(db) as conn:
                level = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            assert level == expected
        finally:
            await db.aclose()


async def test_a_commit_is_not_reported_durable_before_a_sync_that_began_after_it(
    tmp_path: Path,
) -> None:
    db, group, path = await new_table(tmp_path)
    held = HeldSync(asyncio.get_running_loop(), lambda: rows(path))
    group.fdatasync = held
    try:
        first = asyncio.ensure_future(insert(db, 1))
        assert await held.entered() == [1]  # committed and visible, its sync under way
        assert not first.done()
        # committed while that sync runs: it needs the next one
        second = asyncio.ensure_future(insert(db, 2))
        await until(lambda: rows(path) == [1, 2])
        held.release()
        await first
        assert await held.entered() == [1, 2]
        assert not second.done()
        held.release()
        await second
        assert group.done == group.started
    finally:
        await db.aclose()


async def test_one_sync_serves_every_transaction_that_committed_meanwhile(
    tmp_path: Path,
) -> None:
    db, group, path = await new_table(tmp_path)
    held = HeldSync(asyncio.get_running_loop(), lambda: None)
    group.fdatasync = held
    before = group.syncs
    try:
        writers = [asyncio.ensure_future(insert(db, n)) for n in range(1, 41)]
        await held.entered()  # the first writer's sync, the others queue behind the lock
        await until(lambda: len(rows(path)) == 40)
        held.release()  # everything else committed meanwhile: one more sync covers it
        await held.entered()
        held.release()
        await asyncio.gather(*writers)
        assert group.syncs - before == 2
    finally:
        await db.aclose()


async def test_the_barrier_is_free_when_nothing_committed_and_sees_other_connections(
    tmp_path: Path,
) -> None:
    db, group, path = await new_table(tmp_path)
    try:
        syncs = group.syncs
        await db.durable()
        assert group.syncs == syncs  # nothing committed since write()'s own sync
        # Another connection (another process, say) commits without a sync of its own: what
        # this process can now read is not on disk until a barrier syncs it.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("PRAGMA synchronous=NORMAL")
        other.execute("INSERT INTO t VALUES (7)")
        other.close()
        await db.durable()
        assert group.syncs == syncs + 1
    finally:
        await db.aclose()


async def test_a_read_returns_only_what_is_on_disk(tmp_path: Path) -> None:
    """A read that finds a transaction whose sync is under way leaves its block only once
    that sync is done: whatever it answers with is durable."""
    db, group, path = await new_table(tmp_path)
    held = HeldSync(asyncio.get_running_loop(), lambda: rows(path))
    group.fdatasync = held
    try:
        writer = asyncio.ensure_future(insert(db, 1))
        assert await held.entered() == [1]
        found: list[int] = []

        async def read_it() -> None:
            async with read(db) as conn:
                found.extend((await conn.execute(text("SELECT n FROM t"))).scalars())

        reader = asyncio.ensure_future(read_it())
        await until(lambda: found == [1])  # it saw the row...
        assert not reader.done()  # ...and waits for a sync that makes it durable:
        held.release()
        await writer
        # not the one under way when it looked (it cannot tell what that one covers), the next
        assert await held.entered() == [1]
        assert not reader.done()
        held.release()
        await reader
    finally:
        await db.aclose()


async def test_a_failed_sync_fails_every_later_barrier(tmp_path: Path) -> None:
    db, group, _path = await new_table(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    group.fdatasync = broken
    try:
        with pytest.raises(OSError, match="I/O error"):
            await insert(db, 1)
        group.fdatasync = os.fdatasync  # a later sync that succeeds proves nothing any more
        with pytest.raises(OSError, match="I/O error"):
            await insert(db, 2)
        with pytest.raises(OSError, match="I/O error"):
            await db.durable()
    finally:
        await db.aclose()


async def test_a_power_cut_keeps_every_transaction_write_reported(tmp_path: Path) -> None:
    """The disk as a power cut could leave it is at least the files as they were when the last
    completed sync began: copy them there (before the real fdatasync). Every write() that had
    returned by then must be in that copy."""
    db, group, path = await new_table(tmp_path)
    images: list[Path] = []

    def imaging_sync(fd: int) -> None:
        image = tmp_path / f"image-{len(images)}"
        image.mkdir()
        for suffix in ("", "-wal"):  # not -shm: recovery rebuilds it from the WAL
            if Path(f"{path}{suffix}").exists():
                shutil.copyfile(f"{path}{suffix}", image / f"group.db{suffix}")
        os.fdatasync(fd)
        images.append(image)  # complete: the state it copied is now on disk

    group.fdatasync = imaging_sync
    reported: dict[int, int] = {}  # row -> the image that was the disk when write() returned

    async def insert_and_report(n: int) -> None:
        await insert(db, n)
        reported[n] = len(images) - 1

    try:
        await asyncio.gather(*(insert_and_report(n) for n in range(1, 61)))
    finally:
        await db.aclose()
    assert len(images) < 60  # the syncs were shared
    for n, image in reported.items():
        assert n in rows(images[image] / "group.db"), f"row {n} reported durable, not on disk"


CRASHING_CHILD = """
import asyncio, sys, threading
from sqlalchemy import text
from oncepay.storage.db import Database, read, write

async def main():
    db = Database.from_url(f"sqlite:///{sys.argv[1]}")
    async with write(db) as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
    def stuck(fd):
        print("committed, syncing", flush=True)
        threading.Event().wait()  # killed here, between the commit and its sync
    db.group.fdatasync = stuck
    async with write(db) as conn:
        await conn.execute(text("INSERT INTO t VALUES (1)"))
    print("reported durable", flush=True)

asyncio.run(main())
"""


def test_kill_9_between_commit_and_sync_recovers_the_commit_unreported(tmp_path: Path) -> None:
    """A process killed after its COMMIT and before the sync had reported nothing (write() had
    not returned, so nothing was answered or sent to the acquirer). The commit is in the OS's
    page cache, so it survives the process; SQLite's recovery reads it back, intact. (Only a
    power cut could lose it, and then nothing had relied on it.)"""
    path = tmp_path / "killed.db"
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHING_CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "committed, syncing\n"
        child.send_signal(signal.SIGKILL)
        rest = child.stdout.read()
    finally:
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert "reported durable" not in rest
    assert rows(path) == [1]
    assert rows(path, "PRAGMA integrity_check") == ["ok"]  # type: ignore[comparison-overlap]


async def test_a_payment_calls_the_acquirer_and_answers_only_after_its_commits_are_durable(
    tmp_path: Path,
) -> None:
    """Every sync of the payments database is held while the test looks at what it is about to
    make durable: the acquirer is not called before a sync covering the payment's creation has
    completed, and the answer does not leave before one covering the stored response has."""
    path = tmp_path / "payments.db"
    async with running_stack(f"sqlite:///{path}", tmp_path) as stack:
        assert stack.db.group is not None

        def snapshot() -> tuple[int, int, int]:
            payments = rows(path, "SELECT count(*) FROM payments")[0]
            done = "SELECT count(*) FROM oncepay_idempotency WHERE state = 'completed'"
            return payments, rows(path, done)[0], stack.sent()

        held = HeldSync(asyncio.get_running_loop(), snapshot)
        stack.db.group.fdatasync = held
        payment = asyncio.ensure_future(stack.pay())
        created_durable = completed_durable = False
        while (seen := await next_event(held, payment)) is not None:
            assert isinstance(seen, tuple)
            payments, completed, sent = seen
            if payments and not created_durable:
                assert sent == 0
                assert stack.sent() == 0
                created_durable = True
            if completed and not completed_durable:
                assert not payment.done()  # the answer waits for this sync
                completed_durable = True
            held.release()
        assert (await payment).status_code == 201
        assert created_durable
        assert completed_durable
        assert stack.sent() == 1


# -- checkpoints ----------------------------------------------------------------------------------


def checkpointed_rows(path: Path, scratch: Path) -> list[int]:
    """The rows the database file itself holds: what checkpoints copied out of the WAL (the
    file is read alone, without its WAL)."""
    scratch.mkdir(exist_ok=True)
    alone = scratch / "alone.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{alone}{suffix}").unlink(missing_ok=True)
    shutil.copyfile(path, alone)
    if not rows(alone, "SELECT count(*) FROM sqlite_master WHERE name = 't'")[0]:
        return []  # not even the table has been copied out
    return rows(alone)


async def insert_many(db: Database, first: int, count: int) -> None:
    """``count`` rows in one transaction, each ~1 KB: a few hundred WAL pages."""
    async with write(db) as conn:
        await conn.execute(
            text("INSERT INTO t (n, pad) VALUES (:n, :pad)"),
            [{"n": n, "pad": "x" * 1000} for n in range(first, first + count)],
        )


async def padded_table(tmp_path: Path) -> tuple[Database, GroupCommit, Path]:
    return await new_table(tmp_path, "padded.db", "n INTEGER PRIMARY KEY, pad TEXT")


async def test_commit_under_group_commit_runs_on_the_loop_and_never_checkpoints(
    tmp_path: Path,
) -> None:
    """Its COMMIT neither syncs nor checkpoints, so it does not leave the loop; with
    ``synchronous=FULL`` it syncs, on the connection's thread, and checkpoints as SQLite
    does."""
    for suffix, on_loop, autocheckpoint in (("", True, 0), ("?synchronous=FULL", False, 1000)):
        db = Database.from_url(f"sqlite:///{tmp_path / f'c{on_loop}.db'}{suffix}")
        seen: list[tuple[str, int]] = []
        try:
            async with write(db) as conn:
                await conn.execute(text("CREATE TABLE t (n INTEGER PRIMARY KEY)"))
                level = (await conn.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
                raw: Any = (await conn.get_raw_connection()).driver_connection
                raw._conn.set_trace_callback(
                    lambda sql, seen=seen: seen.append((sql, threading.get_ident()))
                )
            assert level == autocheckpoint
            commits = [ident for sql, ident in seen if sql.upper().startswith("COMMIT")]
            assert commits, seen
            assert (commits[-1] == threading.get_ident()) is on_loop
        finally:
            await db.aclose()


async def test_checkpoints_run_after_syncs_on_a_thread_of_their_own(tmp_path: Path) -> None:
    db, group, path = await padded_table(tmp_path)
    group.checkpoint_interval = 3600.0  # none on their own while the first rows go in
    try:
        for first in range(0, 3000, 500):  # ~3,000 pages: SQLite's own would have run
            await insert_many(db, first, 500)
        assert checkpointed_rows(path, tmp_path / "one") == []  # all still in the WAL
        assert group.checkpoints == 0
        group.checkpoint_interval = 0.0  # the next sync is followed by one
        await insert_many(db, 3000, 1)
        await until(lambda: group.checkpoints >= 1)
        assert checkpointed_rows(path, tmp_path / "two") == list(range(3001))
        assert rows(path) == list(range(3001))  # and the database reads as before
    finally:
        await db.aclose()


async def test_a_wal_grown_past_its_limit_is_checkpointed_before_the_next_write(
    tmp_path: Path,
) -> None:
    """Checkpoints beside the writers may never finish; the WAL then never starts again from
    its beginning and grows. Past ``wal_limit`` the next write checkpoints first, with the
    process's writers held, and the WAL is reused from its start."""
    db, group, path = await padded_table(tmp_path)
    group.checkpoint_interval = 3600.0  # no background checkpoint: only the limit acts
    group.wal_limit = 2 * 1024 * 1024
    largest = 0
    try:
        for first in range(0, 20_000, 500):  # ~20 MB of WAL frames in all
            await insert_many(db, first, 500)
            largest = max(largest, os.stat(f"{path}-wal").st_size)
        assert group.checkpoints >= 1
        # the limit, plus what was written before the sync that saw it passed
        assert largest < group.wal_limit + 2 * 1024 * 1024, largest
        assert rows(path) == list(range(20_000))
    finally:
        await db.aclose()


async def test_a_database_may_be_closed_twice(tmp_path: Path) -> None:
    db, group, _ = await padded_table(tmp_path)
    group.checkpoint_interval = 0.0
    await insert_many(db, 0, 10)
    await until(lambda: group.checkpoints >= 1)
    await db.aclose()
    await db.aclose()  # the simulator's and the service's owners both close it
