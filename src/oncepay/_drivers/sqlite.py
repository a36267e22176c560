"""SQLite for the event loop: the driver-level connection behind SQLAlchemy's aiosqlite dialect,
with the waiting done on a thread and the rest done on the loop.

aiosqlite runs every call on the connection's own thread: a statement costs four thread hops
(open a cursor, execute, fetch, close), and a payment's two dozen statements about a hundred,
each a wake-up of another thread and a hand-over of the GIL — measured as the largest single
cost of a payment on SQLite (bench/e2e/PROFILE.md).

In WAL mode the only SQLite calls that wait are the ones that take the write lock or sync to
disk: ``BEGIN IMMEDIATE`` (it waits, up to the busy timeout, for another process's writer) and
``COMMIT`` (an fsync with ``synchronous=FULL``). Those run on the connection's own thread (one
per connection, as aiosqlite has, but used only for these; a ``BEGIN IMMEDIATE`` that finds the
lock free is taken on the loop, see ``Connection._begun_at_once``): on a shared pool of threads, a
``COMMIT`` could queue behind other connections' ``BEGIN IMMEDIATE`` statements that wait for
the very lock it is about to release, and they would all time out. Every other
statement — reads, and writes under a write lock already held — runs on the loop: it touches
pages in the cache and the WAL, costs microseconds, and does not wait for a lock (WAL readers
do not block writers nor writers readers; a writer that holds the lock needs no other). The one
exception is brief: while a connection rebuilds the WAL index after a process crashed, others
wait for it (the busy timeout bounds that). A payment then costs six thread hops instead of a
hundred.

The class offers what SQLAlchemy's ``AsyncAdapt_aiosqlite_connection`` uses of an
``aiosqlite.Connection``; :func:`connect` is passed to ``create_async_engine`` as its
``async_creator``.

:class:`GroupCommit` is the durability of a database whose connections commit with
``synchronous=NORMAL`` (no fsync at ``COMMIT``, so none under the write lock): one
``fdatasync`` of the WAL, on a thread of its own, shared by every transaction committed before
it started. ``await group.durable()`` returns once everything this process could see in the
database when it was called is on disk — the barrier to pass before a transaction's effects are
relied on outside the process (docs/guarantees.md, "SQLite durability").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["Connection", "GroupCommit", "connect", "enable_wal", "is_busy"]

# How soon a process retries switching a new file to WAL while another switches it: the switch
# takes a few milliseconds in the process that makes it.
WAL_RETRY_INTERVAL = 0.01

# Group commit's checkpoints (GroupCommit): one at most every CHECKPOINT_INTERVAL seconds, on a
# thread of its own, after a sync; a WAL file grown past WAL_LIMIT bytes (checkpoints that could
# not finish while writers kept appending, so it never restarted from its beginning) is
# checkpointed before the process's next write transaction, with its writers held.
CHECKPOINT_INTERVAL = 0.25
WAL_LIMIT = 64 * 1024 * 1024

# Statements that may wait for another process (the write lock) or for the disk.
_WAITING = ("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "COMMIT", "END")


def _waits(sql: str) -> bool:
    return sql.lstrip()[:15].upper().startswith(_WAITING)


class Cursor:
    """A cursor whose rows are fetched as it executes: fetching and closing never wait."""

    __slots__ = ("_connection", "_rows", "arraysize", "description", "lastrowid", "rowcount")

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._rows: list[Any] = []
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self.arraysize = 1

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _run(self, sql: str, parameters: Any, many: bool) -> None:
        cursor = self._connection._conn.cursor()
        try:
            if many:
                cursor.executemany(sql, parameters)
            elif parameters is None:
                cursor.execute(sql)
            else:
                cursor.execute(sql, parameters)
            self.description = cursor.description
            self._rows = cursor.fetchall() if cursor.description else []
            self.rowcount, self.lastrowid = cursor.rowcount, cursor.lastrowid
        finally:
            cursor.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        if _waits(sql):
            if not parameters and self._connection._begun_at_once(sql):
                self.description, self._rows, self.rowcount = None, [], -1
                return self
            await self._connection._on_thread(self._run, sql, parameters, False)
        else:
            self._run(sql, parameters, False)
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any]]) -> Cursor:
        self._run(sql, parameters, True)
        return self

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    async def fetchone(self) -> Any:
        return self._rows.pop(0) if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        size = size or self.arraysize
        rows, self._rows = self._rows[:size], self._rows[size:]
        return rows

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *sizes: Any) -> None:
        return None

    async def close(self) -> None:
        self._rows = []


class Connection:
    """One sqlite3 connection, used by one task at a time (SQLAlchemy's pool guarantees it)."""

    def __init__(
        self, conn: sqlite3.Connection, thread: ThreadPoolExecutor, *, commit_waits: bool = True
    ) -> None:
        self._conn = conn
        self._thread = thread
        self._busy_timeout: str | None = None  # PRAGMA busy_timeout as set, read once
        # False under group commit: COMMIT then neither syncs (synchronous=NORMAL) nor
        # checkpoints (wal_autocheckpoint=0, GroupCommit checkpoints), so it only writes the
        # transaction's frames to the WAL and runs on the loop, without a thread hop.
        self._commit_waits = commit_waits

    def _begun_at_once(self, sql: str) -> bool:
        """``BEGIN IMMEDIATE`` on the loop when the write lock is free: tried with no busy
        handler (SQLite answers SQLITE_BUSY at once instead of sleeping in it), the
        connection's busy timeout (read at the first attempt, after connect's pragmas) set back
        right after. False — nothing begun — when another
        connection holds the lock (another process; within one, the service's writer lock
        queues its own transactions first): the caller then waits for it on the thread, as
        every ``BEGIN IMMEDIATE`` did. A thread hop costs far more CPU than the two pragmas."""
        if not sql.lstrip()[:15].upper().startswith(("BEGIN IMMEDIATE", "BEGIN EXCLUSIVE")):
            return False
        conn = self._conn
        if self._busy_timeout is None:
            self._busy_timeout = (
                f"PRAGMA busy_timeout={conn.execute('PRAGMA busy_timeout').fetchone()[0]}"
            )
        conn.execute("PRAGMA busy_timeout=0").close()
        try:
            conn.execute(sql).close()
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                return False
            raise
        finally:
            conn.execute(self._busy_timeout).close()
        return True

    def begin_here(self, *, immediate: bool) -> bool:
        """Begin a transaction on the calling thread, without a thread hop or SQLAlchemy's
        statement machinery (its ``exec_driver_sql`` cost more CPU than the ``BEGIN``): a
        deferred ``BEGIN`` always (it takes no lock); ``BEGIN IMMEDIATE`` when the write lock
        is free (:meth:`_begun_at_once`). False, nothing begun, when another connection holds
        the lock: the caller then waits for it on the connection's thread."""
        if immediate:
            return self._begun_at_once("BEGIN IMMEDIATE")
        self._conn.execute("BEGIN").close()
        return True

    async def begin_immediate(self) -> sqlite3.Connection:
        """``BEGIN IMMEDIATE`` as SQLAlchemy's begin event does it (on the loop when the
        write lock is free, else waiting for it on the connection's thread, in the busy
        handler), for a transaction run on the sqlite3 connection itself, which it returns
        (storage/db.py's ``write_raw``)."""
        if not self._begun_at_once("BEGIN IMMEDIATE"):
            await self._on_thread(self._conn.execute, "BEGIN IMMEDIATE")
        return self._conn

    @property
    def _connection(self) -> sqlite3.Connection | None:  # read by SQLAlchemy's adapter
        return self._conn

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    async def _on_thread(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)

    def cursor(self) -> Cursor:
        return Cursor(self)

    async def execute(self, sql: str, parameters: Sequence[Any] | None = None) -> Cursor:
        return await Cursor(self).execute(sql, parameters)

    async def commit(self) -> None:
        if self._commit_waits:
            await self._on_thread(self._conn.commit)
        else:
            self._conn.commit()

    async def rollback(self) -> None:
        self._conn.rollback()  # drops the transaction's pages: no lock to wait for, no sync

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        self._conn.close()
        self._thread.shutdown(wait=False)


async def connect(path: str, *, timeout: float, group_commit: bool = False) -> Connection:
    """A connection in autocommit mode (we say ``BEGIN`` ourselves), usable from the loop's
    thread and the worker threads in turn, never at once.

    ``group_commit``: the database's durability and checkpoints are a :class:`GroupCommit`'s
    (the caller sets ``synchronous=NORMAL``): this connection never checkpoints at ``COMMIT``
    (``wal_autocheckpoint=0``) and commits on the loop."""

    def open_it() -> sqlite3.Connection:
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            # SQLite does not call the busy handler for the switch to WAL: processes opening a
            # new file together retry it (the idempotency store's SQLite connections too).
            enable_wal(conn, deadline=time.monotonic() + timeout)
            if group_commit:
                conn.execute("PRAGMA wal_autocheckpoint=0").close()
                conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}").close()
        except BaseException:
            conn.close()
            raise
        return conn

    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oncepay-sqlite")
    try:
        conn = await asyncio.get_running_loop().run_in_executor(thread, open_it)
    except BaseException:
        thread.shutdown(wait=False)
        raise
    return Connection(conn, thread, commit_waits=not group_commit)


def enable_wal(conn: sqlite3.Connection, *, deadline: float) -> None:
    """Switch the file to WAL, which lets readers (replays) run while a claim writes.

    SQLite does not call the busy handler for this switch, so processes opening a new file
    together can see "database is locked": retry until the busy timeout would have run out.
    ``synchronous`` stays FULL: a completion lost to a power cut would let a retry execute a
    second time.
    """
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except sqlite3.OperationalError as exc:
            if not is_busy(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(WAL_RETRY_INTERVAL)


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY or one of its extended codes (SQLITE_BUSY_SNAPSHOT, ...)."""
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY


class _SyncThread:
    """One thread running the calls handed to it in turn, each answered on its caller's
    loop: ``run_in_executor`` on a one-thread ``ThreadPoolExecutor`` without its per-call
    ``concurrent.futures.Future`` (a ``Condition`` and its lock) and asyncio's chaining of it
    to a future of the loop's — a good part of a sync's CPU, paid by most commits
    (bench/e2e/PROFILE.md). A daemon thread: at exit nothing waits for a sync nobody awaits
    (the transactions it covers are in the OS's cache; only a power cut could lose them)."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._calls: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    def run(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._calls.put((loop, answer, call))
        return answer

    def shutdown(self) -> None:
        """Stop once the calls handed over so far have run (it does not wait for them)."""
        self._closed = True
        self._calls.put(None)

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, answer, call = item
            try:
                result = call()
            except BaseException as exc:  # handed to the caller, as an executor does
                _answer(loop, answer.set_exception, answer, exc)
            else:
                _answer(loop, answer.set_result, answer, result)


def _answer(
    loop: asyncio.AbstractEventLoop,
    settle: Callable[[Any], None],
    answer: asyncio.Future[Any],
    value: Any,
) -> None:
    def settled() -> None:
        if not answer.done():  # a caller that was cancelled meanwhile gets nothing
            settle(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
        loop.call_soon_threadsafe(settled)


class GroupCommit:
    """Group commit for one SQLite database file in one process (its connections commit with
    ``synchronous=NORMAL``): a commit is visible at once and durable after the next
    ``fdatasync`` of the WAL, which one caller at a time runs on this object's thread for
    everyone waiting.

    A sync covers every frame written to the WAL before it started, by any process (the page
    cache is the file's, not the descriptor's). :meth:`durable` waits for a sync that started
    after it was called — unless no transaction has committed, anywhere, since the last sync
    started, when there is nothing to wait for.

    What has committed is read through SQLite, never from its files: ``PRAGMA data_version`` on a
    connection of this object's own that never writes changes with every commit by any
    connection of any process. Opening and closing the ``-shm`` file here instead (as this class
    first did) drops every POSIX lock the process holds on it (fcntl locks belong to the
    process and the file, not to the descriptor): the WAL's read marks and the "in use" lock go,
    another process then checkpoints over pages a reader still uses or rebuilds the index under
    it, and the database is corrupt (sqlite.org/howtocorrupt.html §2.2; found by the chaos
    audit's kill -9). The WAL file, which SQLite never locks, is the only file opened here.

    After a failed sync every later call raises the same ``OSError``: once ``fsync`` has failed
    the kernel may have dropped the pages it could not write, and a later ``fsync`` that
    succeeds would prove nothing (the service must restart; SQLite's recovery then reads what
    the disk really has).

    Checkpoints are this object's too (its database's connections have ``wal_autocheckpoint``
    off): SQLite's automatic one ran inside the ``COMMIT`` that took the WAL past 1,000 pages,
    under the write lock, copying the WAL into the database file and syncing both while every
    writer waited (a reconciliation batch: ~50 of its ~250 ms). Here a ``PASSIVE`` checkpoint
    runs after a sync, at most every :data:`CHECKPOINT_INTERVAL` seconds, on a thread and a
    connection of its own, beside the writers. It syncs the WAL before it copies a frame and
    the database file after, as SQLite's does, so a power cut finds the same state either way.
    A ``PASSIVE`` checkpoint cannot finish while writers append, and the WAL only starts again
    from its beginning after one has; :meth:`overgrown` says when the file has grown past
    :data:`WAL_LIMIT` that way, and the caller then runs :meth:`checkpoint` with its writers
    held (:func:`oncepay.storage.db.write`).
    """

    def __init__(self, path: str, *, fdatasync: Callable[[int], None] = os.fdatasync) -> None:
        self.wal, self.shm = f"{path}-wal", f"{path}-shm"
        self.directory = os.path.dirname(os.path.abspath(path))
        self.fdatasync = fdatasync  # what syncs the WAL's descriptor (tests wrap it)
        self._thread = _SyncThread("oncepay-sqlite-sync_0")
        self.started = 0  # syncs started, in order: sync n covers what was written before it began
        self.done = 0  # every sync up to this one has completed
        self.syncs = 0  # fdatasync calls made (the figure group commit divides)
        self._running: list[asyncio.Future[None]] | None = None  # the sync's waiters, if one runs
        self._path = path
        self._watcher: sqlite3.Connection | None = None  # reads data_version; never writes
        self._synced_header: object = None  # the data_version as the last completed sync began
        self._wal_inode: int | None = None  # the WAL file whose directory entry is on disk
        self._failed: OSError | None = None
        self.wal_size = 0  # the WAL file's size at the last sync
        self.checkpoint_interval = CHECKPOINT_INTERVAL
        self.wal_limit = WAL_LIMIT
        self.checkpoints = 0  # checkpoints run (the figure the tests wait for)
        self._checkpointer = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="oncepay-sqlite-checkpoint"
        )
        self._checkpointing: asyncio.Future[None] | None = None
        self._checkpointed_at = time.monotonic()
        self._checkpoint_conn: sqlite3.Connection | None = None  # the checkpointer's own
        self._closed = False

    async def durable(self) -> None:
        """Return once every transaction visible to this process now is on disk."""
        if self._failed is not None:
            raise self._failed
        if self._running is None and self._header() == self._synced_header:
            return
        wanted = self.started + 1
        while self.done < wanted:
            if self._running is None:
                await self._sync_now()
            else:
                # The running sync's end, waited for on a future of our own (what
                # asyncio.shield would make): a cancelled waiter cancels only itself.
                waiter = asyncio.get_running_loop().create_future()
                self._running.append(waiter)
                await waiter
            if self._failed is not None:
                raise self._failed

    async def _sync_now(self) -> None:
        self.started += 1
        number = self.started
        waiters: list[asyncio.Future[None]] = []
        self._running = waiters
        try:
            header = self._header()  # before the sync: what it is sure to cover
            await self._thread.run(self._sync_wal)
            self.done, self._synced_header = max(self.done, number), header
        except OSError as exc:
            self._failed = exc
            raise
        finally:
            self._running = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        if (
            self._checkpointing is None
            and time.monotonic() - self._checkpointed_at >= self.checkpoint_interval
        ):
            self._checkpointing = asyncio.ensure_future(self._checkpoint_soon())

    async def _checkpoint_soon(self) -> None:
        with contextlib.suppress(RuntimeError):  # the checkpointer was shut down (close)
            await self.checkpoint()

    def overgrown(self) -> bool:
        """The WAL file had grown past :attr:`wal_limit` at the last sync: checkpoints ran
        while writers appended and none could finish. The caller runs :meth:`checkpoint` with
        its writers held before its next write transaction."""
        return self.wal_size > self.wal_limit

    async def checkpoint(self) -> None:
        """One ``PASSIVE`` checkpoint, on the checkpointer's thread (the one running, if any,
        is waited for first). A checkpoint that fails (another process's checkpoint holds the
        lock, say) is left to the next one: SQLite's WAL stays correct without it."""
        running = self._checkpointing
        if running is not None and running is not asyncio.current_task():
            await asyncio.shield(running)
        try:
            await asyncio.get_running_loop().run_in_executor(self._checkpointer, self._checkpoint)
        finally:
            self._checkpointed_at = time.monotonic()
            if self._checkpointing is asyncio.current_task():
                self._checkpointing = None

    def _close_checkpointer(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    def _checkpoint(self) -> None:
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(
                    self._path, check_same_thread=False, isolation_level=None, timeout=0
                )
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            return
        self.checkpoints += 1
        try:
            self.wal_size = os.stat(self.wal).st_size
        except FileNotFoundError:
            self.wal_size = 0

    def _sync_wal(self) -> None:
        try:
            fd = os.open(self.wal, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: the last connection checkpointed it (with syncs) and removed it
        try:
            self.fdatasync(fd)
            self.syncs += 1
            found = os.fstat(fd)
            inode, self.wal_size = found.st_ino, found.st_size
        finally:
            os.close(fd)
        if inode != self._wal_inode:
            # A new WAL file: its name must survive a power cut too. SQLite syncs the directory
            # at a file's first sync, which with NORMAL comes only at a checkpoint.
            directory = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
            self._wal_inode = inode

    def _header(self) -> object:
        """What has committed, by any connection of any process: the watcher's data_version
        (a fresh object, which equals nothing, when it cannot be read: then a sync runs)."""
        try:
            if self._watcher is None:
                self._watcher = sqlite3.connect(
                    self._path, check_same_thread=False, isolation_level=None, timeout=0
                )
            row = self._watcher.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:  # busy while another connection recovers the WAL, say
            return object()
        return row[0] if row is not None else object()

    def close(self) -> None:
        """Stop (idempotent: a database may be closed twice)."""
        self._thread.shutdown()
        if self._closed:
            return
        self._closed = True
        if self._checkpointing is not None:
            self._checkpointing.cancel()  # its thread's checkpoint, if begun, runs to its end
        self._checkpointer.submit(self._close_checkpointer)  # after that checkpoint, if any
        self._checkpointer.shutdown(wait=False)
        if self._watcher is not None:
            self._watcher.close()  # through SQLite, which keeps the other connections' locks
            self._watcher = None
