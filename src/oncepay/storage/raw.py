"""The hot path's statements on the raw driver, inside SQLAlchemy's own transaction.

A payment's dozen hot statements (the payment row, ledger postings, outbox events) and the
simulated acquirer's authorization cost more in SQLAlchemy Core — compile-cache look-ups,
parameter and result processing, the greenlet bridge — than in the database
(bench/e2e/PROFILE.md, "data layer"). Here each is written once as SQL text and sent straight
to the driver SQLAlchemy's connection wraps: ``sqlite3`` (the service's own SQLite driver runs
statements that do not wait on the loop), or ``asyncpg`` (prepared once per connection by its
statement cache). The transaction stays SQLAlchemy's: :func:`raw` joins the one
``write()``/``read()`` opened, so raw statements and Core statements (the rest of the service,
and migrations) commit or roll back together. It sits in the package below both users: the
simulator imports nothing from the payments service (tests/test_import_graph.py).

Driver errors are translated at this boundary into SQLAlchemy's ``DatabaseError``, which the
phases already answer as "the database failed midway" (the key stays locked, to be resumed).
"""

from __future__ import annotations

import re
from collections import namedtuple
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sqlalchemy import Boolean, Table
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["Raw", "Rows", "Sql", "raw", "trace_statements"]

_NUMBERED = re.compile(r"\$(\d+)")


class Sql:
    """One statement, written with PostgreSQL's numbered parameters (``$1``); SQLite reads the
    same numbers as ``?1``. ``lock`` is appended on PostgreSQL only (``FOR UPDATE``: SQLite's
    write transaction already excludes every other writer)."""

    __slots__ = ("postgresql", "sqlite")

    def __init__(self, text: str, *, lock: str = "") -> None:
        self.postgresql = f"{text} {lock}" if lock else text
        self.sqlite = _NUMBERED.sub(r"?\1", text)


class Rows:
    """Typed rows of one table: a named tuple per row, booleans as ``bool`` on either
    database (SQLite gives 0 and 1). ``columns`` is the select list, in the table's order."""

    __slots__ = ("_booleans", "_width", "columns", "make", "table")

    def __init__(self, table: Table) -> None:
        names = [column.name for column in table.columns]
        self.table, self._width = table.name, len(names)
        self.columns = ", ".join(names)
        self.make: Callable[..., Any] = namedtuple(f"{table.name}_row", names)  # type: ignore[misc]
        self._booleans = [
            i for i, column in enumerate(table.columns) if isinstance(column.type, Boolean)
        ]

    def insert(self, suffix: str = "") -> Sql:
        """The insert of one whole row, its values in column order (a row as :attr:`make`
        builds it binds as it is); ``suffix`` follows the values (``ON CONFLICT …``)."""
        marks = ", ".join(f"${n}" for n in range(1, self._width + 1))
        text = f"INSERT INTO {self.table} ({self.columns}) VALUES ({marks})"
        return Sql(f"{text} {suffix}" if suffix else text)

    def one(self, row: Sequence[Any], *, integers_as_booleans: bool) -> Any:
        if not integers_as_booleans:
            return self.make(*row)
        values = list(row)
        for i in self._booleans:
            values[i] = bool(values[i])
        return self.make(*values)


class Raw(Protocol):
    """A transaction's connection, raw. Every method is one statement (one round trip)."""

    integers_as_booleans: bool  # SQLite: boolean columns come back as 0 and 1
    # The driver's connection itself (sqlite3 or asyncpg), for the idempotency store's
    # statements in the same transaction (Engine.acheckpoint_in / acomplete_in take it).
    driver: Any

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        """The rows a statement returned (``SELECT``, or a write ``RETURNING``)."""
        ...

    async def run(self, sql: Sql, *args: Any) -> None:
        """A write whose rows are not needed."""
        ...

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        """The same write for each of ``rows``."""
        ...


class _SQLite:
    __slots__ = ("_conn", "driver")
    integers_as_booleans = True

    def __init__(self, conn: Any) -> None:
        self._conn = self.driver = conn  # a sqlite3.Connection in SQLAlchemy's transaction

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        try:
            rows: list[Any] = self._conn.execute(sql.sqlite, args).fetchall()
        except _SQLITE_ERRORS as exc:
            raise _translated(sql.sqlite, exc) from exc
        return rows

    async def run(self, sql: Sql, *args: Any) -> None:
        try:
            self._conn.execute(sql.sqlite, args)
        except _SQLITE_ERRORS as exc:
            raise _translated(sql.sqlite, exc) from exc

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        try:
            self._conn.executemany(sql.sqlite, rows)
        except _SQLITE_ERRORS as exc:
            raise _translated(sql.sqlite, exc) from exc


class _Asyncpg:
    __slots__ = ("_conn", "driver")
    integers_as_booleans = False

    def __init__(self, conn: Any) -> None:
        self._conn = self.driver = conn  # an asyncpg.Connection in SQLAlchemy's transaction

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        try:
            rows: list[Any] = await self._conn.fetch(sql.postgresql, *args)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(sql.postgresql, exc) from exc
        return rows

    async def run(self, sql: Sql, *args: Any) -> None:
        try:
            await self._conn.execute(sql.postgresql, *args)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(sql.postgresql, exc) from exc

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(sql.postgresql, rows)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(sql.postgresql, exc) from exc


def _driver_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    import sqlite3

    try:
        import asyncpg
    except ImportError:  # a SQLite-only installation
        return (sqlite3.Error,), ()
    return (sqlite3.Error,), (asyncpg.PostgresError, asyncpg.InterfaceError)


_SQLITE_ERRORS, _ASYNCPG_ERRORS = _driver_errors()


def _translated(statement: str, exc: Exception) -> DatabaseError:
    return DatabaseError(statement, None, exc)


class _Traced:
    """A raw connection whose statements each make a span (what SQLAlchemy's instrumentation
    does for its own statements: these never pass through its events)."""

    __slots__ = ("_inner", "_span", "_system", "driver", "integers_as_booleans")

    def __init__(self, inner: Raw, system: str, span: StatementSpan) -> None:
        self._inner, self._system, self._span = inner, system, span
        self.driver, self.integers_as_booleans = inner.driver, inner.integers_as_booleans

    def _text(self, sql: Sql) -> str:
        return sql.sqlite if self._system == "sqlite" else sql.postgresql

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        with self._span(self._system, self._text(sql)):
            return await self._inner.rows(sql, *args)

    async def run(self, sql: Sql, *args: Any) -> None:
        with self._span(self._system, self._text(sql)):
            await self._inner.run(sql, *args)

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        with self._span(self._system, self._text(sql)):
            await self._inner.many(sql, rows)


# (database system, statement) -> a span around the statement.
StatementSpan = Callable[[str, str], AbstractContextManager[Any]]


class _Statements:
    # Set while statements are traced (ONCEPAY_TRACE_SQL with tracing on); None costs nothing.
    span: StatementSpan | None = None


def trace_statements(span: StatementSpan | None) -> None:
    """Trace every raw statement from now on with ``span`` (None: stop)."""
    _Statements.span = span


_KEY = "oncepay.raw"


async def raw(conn: AsyncConnection) -> Raw:
    """The raw connection under ``conn``, in the transaction ``conn`` holds (begun on the
    server first if SQLAlchemy has not sent anything yet: asyncpg begins lazily). Kept for
    the rest of the transaction."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection else None
    kept = conn.info.get(_KEY)
    if kept is not None and kept[0] is transaction:
        return kept[1]  # type: ignore[no-any-return]
    fairy = await conn.get_raw_connection()
    adapted: Any = fairy.dbapi_connection
    found: Raw
    if conn.dialect.name == "sqlite":
        found = _SQLite(fairy.driver_connection._connection)  # type: ignore[union-attr]
    else:
        if adapted._transaction is None:  # SQLAlchemy's asyncpg adapter begins at first use
            await adapted._start_transaction()
        found = _Asyncpg(fairy.driver_connection)
    if _Statements.span is not None:
        found = _Traced(found, conn.dialect.name, _Statements.span)
    conn.info[_KEY] = (transaction, found)
    return found
