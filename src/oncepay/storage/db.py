"""Databases of the payments service and of the simulated acquirer: one SQLAlchemy Core
engine over SQLite (SQLAlchemy's aiosqlite dialect on oncepay's own loop-friendly driver,
:mod:`oncepay._drivers.sqlite`) or PostgreSQL (asyncpg), chosen by URL.

URLs are the ones users type — ``sqlite:///oncepay.db``, ``postgresql://user@host/db`` — and
are mapped to SQLAlchemy's async drivers here. ``?schema=NAME`` on a PostgreSQL URL puts every
table in that schema (created on first use), which is how tests and side-by-side deployments
share one database.

SQLite durability: group commit by default. Connections commit with ``synchronous=NORMAL`` (no
fsync under the write lock) and :func:`write` returns only after one ``fdatasync`` of the WAL,
shared by every transaction that committed meanwhile, has covered its commit
(:class:`oncepay._drivers.sqlite.GroupCommit`): nothing a caller can act on after
:func:`write` is lost to a power cut, as with ``synchronous=FULL``, but the disk is waited for
outside the lock and once for many transactions. Data read from the database that another
transaction committed is durable once :meth:`Database.durable` returns — the barrier before
answering it, which :func:`read` passes on the way out.
``sqlite:///path.db?synchronous=FULL`` restores an fsync inside every ``COMMIT``
(docs/guarantees.md, "SQLite durability", says why both keep what was answered).

SQLite write transactions start with ``BEGIN IMMEDIATE``: a deferred transaction that reads and
then writes fails at once with ``SQLITE_BUSY`` when another connection wrote in between, while
an immediate one takes the write lock first and waits for it up to the busy timeout. Read-only
work opens its connection with :func:`read` and starts a plain deferred ``BEGIN``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import event
from sqlalchemy.engine import Connection as SyncConnection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from oncepay._drivers import sqlite as _sqlite
from oncepay.errors import ConfigurationError

if TYPE_CHECKING:
    from oncepay._drivers.pgpool import Pool

__all__ = ["Database", "read", "write", "write_on", "write_raw"]

# A write transaction holds SQLite's lock for a millisecond or two; five seconds of waiting
# means a wedged database, and a clean error beats a request hung for ever.
SQLITE_BUSY_TIMEOUT_MS = 5000
# Connections per process: each request runs at most one transaction at a time, and more
# than a handful only queues up on SQLite's single writer or PostgreSQL's CPUs. Kept small so
# several processes (API, workers, restarts overlapping a killed one) stay well inside
# PostgreSQL's default max_connections of 100: a long chaos run exhausted it at 10 + 10.
POOL_SIZE = 5
POOL_OVERFLOW = 5
POOL_TIMEOUT = 30.0  # seconds a statement waits for a pooled connection (SQLAlchemy's default)


class _Writer:
    """SQLite: the one connection :func:`write` uses, transaction after transaction (the
    process's writers take turns under ``Database.writers``, so one is all they can use). It
    stays checked out of the pool: a write then pays neither the pool's check-out and check-in
    nor SQLAlchemy's close, which runs in a task of its own (together some 4 % of a payment's
    CPU in three transactions). A transaction that fails drops it (closed as the pool would
    have, its state unknown), and the next write checks out another."""

    __slots__ = ("conn", "driver")

    def __init__(self) -> None:
        self.conn: AsyncConnection | None = None
        self.driver: _sqlite.Connection | None = None  # the connection's own, for write_raw

    async def get(self, engine: AsyncEngine) -> AsyncConnection:
        conn = self.conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self.conn = await engine.connect()
            self.driver = None
        return conn

    async def get_driver(self, engine: AsyncEngine) -> _sqlite.Connection:
        conn = await self.get(engine)
        if self.driver is None:
            driver: _sqlite.Connection = (await conn.get_raw_connection()).driver_connection  # type: ignore[assignment]
            self.driver = driver
        return self.driver

    async def drop(self) -> None:
        conn, self.conn, self.driver = self.conn, None, None
        if conn is not None:
            # Closed to the end even if the caller is cancelled meanwhile (as SQLAlchemy's own
            # ``async with`` does): the connection goes back to the pool whole, or not at all.
            closing = asyncio.ensure_future(conn.close())
            cancelled = False
            while True:
                try:
                    await asyncio.shield(closing)
                    break
                except asyncio.CancelledError:
                    if closing.done():
                        raise
                    cancelled = True
            if cancelled:
                raise asyncio.CancelledError


@dataclass(frozen=True, slots=True)
class Database:
    """An engine plus what the rest of the service needs to know about it."""

    url: str  # as the user gave it, without our own options
    engine: AsyncEngine
    dialect: str  # "sqlite" or "postgresql"
    schema: str | None = None
    # SQLite has one writer at a time. Writers of one process queue here, in order, instead of
    # in SQLite's busy handler, which sleeps up to 100 ms between tries and so turns a queue of
    # millisecond transactions into a queue of tenth-of-a-second waits.
    writers: asyncio.Lock = field(default_factory=asyncio.Lock)
    # SQLite with group commit (the default): the shared fsync of the WAL; None when every
    # COMMIT syncs itself (PostgreSQL, or SQLite with ?synchronous=FULL).
    group: _sqlite.GroupCommit | None = None
    # SQLite: the connection write() uses, kept checked out between transactions.
    writer: _Writer = field(default_factory=_Writer)
    # PostgreSQL: connections for statements that are a transaction each (:meth:`once`), outside
    # SQLAlchemy; opened on first use. None on SQLite.
    statements: Pool | None = None

    @classmethod
    def from_url(cls, url: str) -> Database:
        parts = urlsplit(url)
        if parts.scheme == "sqlite":
            path = parts.path[1:]  # sqlite:///relative.db, sqlite:////absolute.db
            options = dict(parse_qsl(parts.query))
            sync = options.pop("synchronous", "GROUP").upper()
            if parts.netloc or not path or options or sync not in {"GROUP", "FULL"}:
                raise ConfigurationError(
                    f"expected sqlite:///path.db[?synchronous=FULL], not {url!r}"
                )
            group = _sqlite.GroupCommit(path) if sync == "GROUP" else None
            return cls(
                url.partition("?")[0],
                _sqlite_engine(path, group is not None),
                "sqlite",
                group=group,
            )
        if parts.scheme in {"postgresql", "postgres"}:
            options = dict(parse_qsl(parts.query))
            schema = options.pop("schema", None)
            plain = urlunsplit(parts._replace(scheme="postgresql", query=urlencode(options)))
            engine = _postgres_engine(plain, schema)
            return cls(plain, engine, "postgresql", schema, statements=_statements(plain, schema))
        raise ConfigurationError(
            f"unsupported database URL {url!r}: use sqlite:///path.db or postgresql://…"
        )

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def store_url(self, table: str) -> str:
        """The URL of an idempotency store whose table lives in this same database."""
        qualified = f"{self.schema}.{table}" if self.schema else table
        separator = "&" if "?" in self.url else "?"
        return f"{self.url}{separator}table={qualified}"

    async def durable(self) -> None:
        """The durability barrier: return once every transaction this process can see in the
        database is on disk. :func:`write` passes it for its own transaction; call it before
        answering (or acting on) what a read found that other transactions committed. Free
        when nothing committed since the last sync, and on PostgreSQL or ``synchronous=FULL``,
        where a commit is on disk before anyone sees it."""
        if self.group is not None:
            await self.group.durable()

    async def once(self, statement: str, *args: Any) -> list[Any]:
        """PostgreSQL: one statement that is a whole transaction by itself (data-modifying
        ``WITH`` queries, say), sent outside any transaction so that it commits on its own:
        one round trip, no ``BEGIN``/``COMMIT`` (payments/operations/onestatement.py). Its
        rows; the driver's errors as they come (asyncpg's, ``OSError``)."""
        if self.statements is None:
            raise ValueError("Database.once() is for PostgreSQL: a SQLite phase is a transaction")
        return await self.statements.fetch(statement, *args)

    async def aclose(self) -> None:
        if self.statements is not None:
            await self.statements.close()
        await self.writer.drop()
        await self.engine.dispose()
        if self.group is not None:
            self.group.close()


def _sqlite_engine(path: str, group_commit: bool) -> AsyncEngine:
    engine = create_async_engine(
        f"sqlite+aiosqlite:///{path}",  # the dialect; connections come from oncepay's driver
        async_creator=partial(
            _sqlite.connect,
            path,
            timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
            group_commit=group_commit,
        ),
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The connection is in autocommit mode: we say BEGIN ourselves, below.
        cursor = dbapi_connection.cursor()
        # WAL mode is set by _sqlite.connect, which retries it while another process holds
        # the new file.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # Every transaction must be on disk before anything relies on it: with NORMAL alone a
        # power cut could lose a committed phase 1 (the payment and its key) while the
        # acquirer kept the authorization, and the client's retry would start a second
        # payment. FULL syncs inside COMMIT, under the write lock, once per transaction;
        # group commit (NORMAL here, then GroupCommit's shared fdatasync before write()
        # returns) keeps that rule with one sync for many transactions, outside the lock.
        cursor.execute(f"PRAGMA synchronous={'NORMAL' if group_commit else 'FULL'}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: SyncConnection) -> None:
        readonly = conn.get_execution_options().get("oncepay_readonly", False)
        driver: _sqlite.Connection = conn.connection.driver_connection  # type: ignore[assignment]
        try:
            if driver.begin_here(immediate=not readonly):
                return
        except sqlite3.Error:
            pass  # SQLAlchemy's path below raises it again, as its own DBAPIError
        # The write lock is held by another connection (another process): wait for it on the
        # connection's thread, through SQLAlchemy (errors come out as its DBAPIErrors).
        conn.exec_driver_sql("BEGIN" if readonly else "BEGIN IMMEDIATE")

    return engine


def _postgres_engine(url: str, schema: str | None) -> AsyncEngine:
    rest = url.split("://", 1)[1]
    connect_args: dict[str, Any] = {}
    if schema:
        connect_args["server_settings"] = {"search_path": schema}
    # Every connection stays pooled (no overflow that is closed at check-in and reopened a
    # moment later: a new backend every 14-25 payments under load), and a check-out costs no
    # round trip: pre-ping sent BEGIN, an empty query and ROLLBACK at each. A connection the
    # server closed while idle (a restart, pg_terminate_backend) is noticed by asyncpg as its
    # socket closes, and _alive swaps it for a new one at check-out; one that breaks mid-use
    # fails that transaction, and SQLAlchemy then invalidates the pool's older connections.
    engine = create_async_engine(
        f"postgresql+asyncpg://{rest}",
        pool_size=POOL_SIZE + POOL_OVERFLOW,
        max_overflow=0,
        connect_args=connect_args,
    )
    event.listen(engine.sync_engine, "checkout", _alive)
    return engine


def _statements(url: str, schema: str | None) -> Pool:
    """The pool behind :meth:`Database.once`: oncepay's lean asyncpg pool (no reset query at
    release: an autocommit statement leaves nothing behind), as many connections at most as
    SQLAlchemy's, in the same schema."""
    import asyncpg  # PostgreSQL's driver, imported only where a PostgreSQL URL is used

    from oncepay._drivers.pgpool import Pool

    settings = {"search_path": schema} if schema else {}
    connect = partial(asyncpg.connect, url, server_settings=settings)
    return Pool(connect, max_size=POOL_SIZE + POOL_OVERFLOW, timeout=POOL_TIMEOUT)


def _alive(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    if dbapi_connection.driver_connection.is_closed():  # no round trip: the socket's state
        raise DisconnectionError("the server closed this pooled connection")


@asynccontextmanager
async def write(db: Database) -> AsyncIterator[AsyncConnection]:
    """One read-write transaction: committed when the block ends, and on disk when the block
    is left (with group commit, after the shared sync, outside the write lock); rolled back
    on error."""
    if not db.is_sqlite:
        async with db.engine.begin() as conn:
            yield conn
        return
    async with db.writers:
        await _writable(db)
        conn = await db.writer.get(db.engine)
        try:
            async with conn.begin():
                yield conn
        except BaseException:
            await db.writer.drop()
            raise
    if db.group is not None:
        await db.group.durable()


def write_raw(db: Database) -> AbstractAsyncContextManager[sqlite3.Connection]:
    """SQLite: :func:`write`'s transaction — the process's writers in turn, ``BEGIN
    IMMEDIATE``, committed when the block ends and on disk when it is left (group commit),
    rolled back on error — run on the writer's own ``sqlite3`` connection, which the block
    gets, without SQLAlchemy's transaction around it (its begin, commit and greenlet hops
    cost more CPU than a payment's statements: payments/operations/onestatement.py). The
    connection is in autocommit mode between transactions, as SQLAlchemy leaves it."""
    if not db.is_sqlite:
        raise ValueError("write_raw() is for SQLite: use write() or Database.once()")
    return _RawWrite(db)


class _RawWrite:
    """:func:`write_raw`'s block, a class rather than a generator: an async generator costs
    its creation, the loop's hook that registers it and two resumptions, on every money move
    of the embedded acquirer and every phase of a payment on SQLite."""

    __slots__ = ("conn", "db", "driver")

    def __init__(self, db: Database) -> None:
        self.db = db
        self.driver: _sqlite.Connection | None = None
        self.conn: sqlite3.Connection | None = None

    async def __aenter__(self) -> sqlite3.Connection:
        db = self.db
        await db.writers.acquire()
        try:
            await _writable(db)
            driver = self.driver = await db.writer.get_driver(db.engine)
            try:
                conn = self.conn = await driver.begin_immediate()
                return conn
            except BaseException:
                await db.writer.drop()  # its state unknown: the pool closes it (as write() does)
                raise
        except BaseException:
            db.writers.release()
            raise

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _trace: Any
    ) -> None:
        db, driver, conn = self.db, self.driver, self.conn
        assert driver is not None
        assert conn is not None
        try:
            if kind is not None:
                try:
                    conn.rollback()  # the connection is whole again: kept for the next writer
                except BaseException:
                    await db.writer.drop()
                    raise
                return  # the block's error goes on
            try:
                await driver.commit()
            except BaseException:
                await db.writer.drop()
                raise
        finally:
            db.writers.release()
        if db.group is not None:
            await db.group.durable()


@asynccontextmanager
async def write_on(db: Database, conn: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """:func:`write` on a connection the caller checked out (and used outside a transaction,
    to stage a batch in its TEMP tables, say): SQLite only."""
    if not db.is_sqlite or conn.in_transaction():
        raise ValueError("write_on() takes a SQLite connection outside a transaction")
    async with db.writers:
        await _writable(db)
        async with conn.begin():
            yield conn
    if db.group is not None:
        await db.group.durable()


async def _writable(db: Database) -> None:
    if db.group is not None and db.group.overgrown():
        # Checkpoints beside the writers could not finish: one with this process's writers
        # held can, and the WAL starts again from its beginning.
        await db.group.checkpoint()


@asynccontextmanager
async def read(db: Database) -> AsyncIterator[AsyncConnection]:
    """One read-only transaction (a deferred BEGIN on SQLite, so it never waits for writers).
    With group commit, the block is left once what it could see is on disk: a read may find
    a transaction whose sync is under way, and its caller is about to answer with it."""
    async with db.engine.connect() as plain:
        conn = await plain.execution_options(oncepay_readonly=True)
        await conn.begin()
        try:
            yield conn
        finally:
            await conn.rollback()  # nothing to keep, and unlike a commit it never waits
    if db.group is not None:
        await db.group.durable()
