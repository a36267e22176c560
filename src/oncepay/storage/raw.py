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

On PostgreSQL a write whose rows are not needed (:meth:`Raw.run`, :meth:`Raw.many` of a plain
``INSERT``) is not sent at once: it travels with the transaction's next statement, as a
data-modifying ``WITH`` in front of it, so the dozen statements of a payment cost half as many
round trips (asyncpg's execution was a quarter of the API's CPU there: bench/e2e/PROFILE.md).
An ``UPDATE`` of rows the transaction holds locked, whose outcome the caller knows without its
answer (:meth:`Raw.update`: a payment's new state, read ``FOR UPDATE`` before), is deferred the
same way. A statement that names a table a pending write goes to sends the pending writes
first, on their own (it would not see them otherwise: one statement, one snapshot), except
more rows of the same pending insert, which join it; so does any other ``UPDATE`` or an insert
with ``ON CONFLICT``, which are never deferred. Whatever is still pending goes before the
transaction's ``COMMIT`` and before any SQLAlchemy statement on the connection (engine
events), and is dropped with a rollback. An error in a deferred write surfaces at the
statement it travelled with, and fails the transaction as it would have.

Driver errors are translated at this boundary into SQLAlchemy's ``DatabaseError``, which the
phases already answer as "the database failed midway" (the key stays locked, to be resumed).
"""

from __future__ import annotations

import functools
import re
import weakref
from collections import namedtuple
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol

from sqlalchemy import Boolean, Table, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.util import await_only

__all__ = ["DRIVER_ERRORS", "Raw", "Rows", "Sql", "raw", "raw_sqlite", "trace_statements"]

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
    """A transaction's connection, raw. Every method is one statement (one round trip; on
    PostgreSQL a deferred write travels with the next)."""

    integers_as_booleans: bool  # SQLite: boolean columns come back as 0 and 1
    # The driver's connection itself (sqlite3 or asyncpg). A statement sent on it directly
    # goes ahead of any write still pending: ``await flush()`` first when order matters.
    driver: Any

    @property
    def store(self) -> Any:
        """What the idempotency store's in-transaction methods take (Engine.aclaim_in,
        acheckpoint_in, acomplete_in): the sqlite3 connection; on PostgreSQL this raw
        connection, whose ``fetch`` carries the pending writes."""
        ...

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        """The rows a statement returned (``SELECT``, or a write ``RETURNING``)."""
        ...

    async def run(self, sql: Sql, *args: Any) -> None:
        """A write whose rows are not needed (on PostgreSQL, a plain insert is deferred)."""
        ...

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        """The same write for each of ``rows`` (deferred as :meth:`run` is)."""
        ...

    async def update(self, sql: Sql, *args: Any) -> None:
        """An ``UPDATE`` whose outcome the caller knows without asking: of rows this
        transaction holds locked (read ``FOR UPDATE``; SQLite's write transaction excludes every
        other writer), so exactly the rows it names, with the values it binds. On PostgreSQL it
        is deferred as a plain insert is; its row count is never read."""
        ...

    async def update_row(self, table: str, key: str, value: Any, changes: dict[str, Any]) -> None:
        """:meth:`update` of one row, ``table``'s whose ``key`` is ``value``, by column name. On
        PostgreSQL a second update of the same row while the first still waits is merged into
        it (the later value of a column wins): one statement may not change a row twice, and
        sending the first apart would cost a round trip."""
        ...

    async def flush(self) -> None:
        """Send whatever write is pending (nothing to do on SQLite)."""
        ...


class _SQLite:
    __slots__ = ("_conn", "driver")
    integers_as_booleans = True

    def __init__(self, conn: Any) -> None:
        self._conn = self.driver = conn  # a sqlite3.Connection in SQLAlchemy's transaction

    @property
    def store(self) -> Any:
        return self._conn

    async def flush(self) -> None:
        pass

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

    update = run

    async def update_row(self, table: str, key: str, value: Any, changes: dict[str, Any]) -> None:
        await self.run(_row_update(table, key, tuple(changes)), value, *changes.values())


class AsyncpgRaw:
    """PostgreSQL: statements on the asyncpg connection, deferred writes sent with the next
    statement (the module's docstring). Also what the idempotency store's in-transaction
    methods take (:attr:`Raw.store`): their statements carry the pending writes too."""

    __slots__ = ("_conn", "_pending", "_rows", "_updated", "driver")
    integers_as_booleans = False

    def __init__(self, conn: Any) -> None:
        self._conn = self.driver = conn  # an asyncpg.Connection in SQLAlchemy's transaction
        self._pending: list[tuple[str, Sequence[Sequence[Any]]]] = []
        self._rows = 0  # the pending writes' rows, to bound a statement's parameters
        # Rows with an update pending (update_row): (table, key, value) -> its place in
        # _pending and the changes so far.
        self._updated: dict[tuple[str, str, Any], tuple[int, dict[str, Any]]] = {}

    @property
    def store(self) -> AsyncpgRaw:
        return self

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    async def rows(self, sql: Sql, *args: Any) -> Sequence[Sequence[Any]]:
        try:
            return await self.fetch(sql.postgresql, *args)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(sql.postgresql, exc) from exc

    async def fetch(self, text: str, *args: Any) -> list[Any]:
        """asyncpg's ``fetch``, the pending writes in front (the idempotency store calls it:
        its statement's errors are asyncpg's, as on the bare connection; a pending write's
        failing on its own is this module's ``DatabaseError``)."""
        if self._pending:
            text, args = await self._carrying(text, args)
        rows: list[Any] = await self._conn.fetch(text, *args)
        return rows

    async def run(self, sql: Sql, *args: Any) -> None:
        await self._write(sql.postgresql, (args,))

    async def many(self, sql: Sql, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self._write(sql.postgresql, rows)

    async def update(self, sql: Sql, *args: Any) -> None:
        await self._update(sql.postgresql, args)

    async def update_row(self, table: str, key: str, value: Any, changes: dict[str, Any]) -> None:
        row = (table, key, value)
        kept = self._updated.get(row)
        if kept is not None:
            place, earlier = kept
            merged = {**earlier, **changes}
            text = _row_update(table, key, tuple(merged)).postgresql
            self._pending[place] = (text, ((value, *merged.values()),))
            self._updated[row] = (place, merged)
            return
        text = _row_update(table, key, tuple(changes)).postgresql
        if await self._update(text, (value, *changes.values())):
            self._updated[row] = (len(self._pending) - 1, dict(changes))

    async def _update(self, text: str, args: tuple[Any, ...]) -> bool:
        """Whether the update was deferred (else it was sent, after what was pending)."""
        shape = _shape(text)
        if shape.target is not None and not shape.row and shape.width == len(args):
            if self._pending and (
                self._rows + 1 > _MAX_DEFERRED_ROWS or not self._apart(shape.names)
            ):
                await self.flush()
            self._pending.append((text, (args,)))
            self._rows += 1
            return True
        await self.flush()  # text that cannot be cut safely: at once, after what is pending
        try:
            await self._conn.execute(text, *args)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(text, exc) from exc
        return False

    async def flush(self) -> None:
        """Send the pending writes now (one statement)."""
        if not self._pending:
            return
        text, args = await self._carrying("SELECT 1", ())
        try:
            await self._conn.execute(text, *args)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(text, exc) from exc

    def drop(self) -> None:
        """Forget the pending writes (their transaction rolled back)."""
        self._pending.clear()
        self._updated.clear()
        self._rows = 0

    async def _write(self, text: str, rows: Sequence[Sequence[Any]]) -> None:
        shape = _shape(text)
        if (
            shape.row
            and len(rows) <= _MAX_DEFERRED_ROWS
            and all(len(row) == shape.width for row in rows)
        ):
            if self._pending and (
                self._rows + len(rows) > _MAX_DEFERRED_ROWS or not self._apart(shape.names)
            ):
                if self._rows + len(rows) <= _MAX_DEFERRED_ROWS and self._joined(text, rows):
                    return
                await self.flush()
            self._pending.append((text, rows))
            self._rows += len(rows)
            return
        await self.flush()
        try:
            if len(rows) == 1:
                await self._conn.execute(text, *rows[0])
            else:
                await self._conn.executemany(text, rows)
        except _ASYNCPG_ERRORS as exc:
            raise _translated(text, exc) from exc

    def _joined(self, text: str, rows: Sequence[Sequence[Any]]) -> bool:
        """More rows of a pending insert (the same statement: a second event of the
        transaction, say) join its row list, after its own — one ``INSERT`` writes its rows in
        order, as :meth:`many` relies on — when no other pending write goes to a table the
        statement names. A plain ``VALUES`` insert reads no table, so nothing it does moves."""
        shape, found = _shape(text), -1
        if "(" in shape.row[1:]:  # a subquery (or function) in the row: it would not see
            return False  # the rows it joined, as it saw them sent before it
        for n, (written, _) in enumerate(self._pending):
            if _shape(written).target in shape.names:
                if written != text or found >= 0:
                    return False
                found = n
        if found < 0:
            return False
        written, earlier = self._pending[found]
        self._pending[found] = (written, [*earlier, *rows])
        self._rows += len(rows)
        return True

    def _apart(self, names: frozenset[str]) -> bool:
        """Whether a statement naming ``names`` sees nothing the pending writes change."""
        return all(_shape(text).target not in names for text, _ in self._pending)

    async def _carrying(self, text: str, args: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
        """``text`` with the pending writes in front as data-modifying ``WITH`` queries, and
        its parameters; the pending writes are taken. A statement that names a table they
        write to would not see their rows: they are sent first, on their own."""
        shape = _shape(text)
        if not shape.carrier or not self._apart(shape.names):
            await self.flush()
            return text, args
        shapes = tuple((written, len(rows)) for written, rows in self._pending)
        merged = _merged(text, len(args), shapes)
        if merged is None:  # WITH RECURSIVE: not joined; sent apart
            await self.flush()
            return text, args
        pending, self._pending, self._rows = self._pending, [], 0
        self._updated.clear()
        values = list(args)
        for _, rows in pending:
            for row in rows:
                values.extend(row)
        return merged, tuple(values)


# A deferred write's rows at most (a statement's parameters stay far below PostgreSQL's 32,767).
_MAX_DEFERRED_ROWS = 64
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_ESCAPED = re.compile(r"\b[EeUu]&?'")  # E'…' and U&'…' strings
_DOLLAR = re.compile(r"\$(?!\d)")  # $$…$$ and $tag$…$tag$ strings (a parameter is $ and digits)
_CARRIER = re.compile(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH|VALUES)\b", re.IGNORECASE)
_PLAIN_UPDATE = re.compile(
    r"\s*UPDATE\s+(?:[A-Za-z_][A-Za-z0-9_]*\.)?([A-Za-z_][A-Za-z0-9_]*)\s+SET\b", re.IGNORECASE
)
_PLAIN_INSERT = re.compile(
    r"\s*INSERT\s+INTO\s+(?:[A-Za-z_][A-Za-z0-9_]*\.)?([A-Za-z_][A-Za-z0-9_]*)\s*\([^()]*\)"
    r"\s*VALUES\s*",
    re.IGNORECASE,
)


class _Shape(NamedTuple):
    names: frozenset[str]  # every word of the statement, lower case (tables among them)
    carrier: bool  # a statement pending writes may go in front of (one plain statement)
    target: str | None  # a deferrable write's table (an insert's, or an update's)
    head: str  # a deferrable insert: the text up to its row of values,
    row: str  # the row, ``( … )`` (empty: not an insert that can be cut),
    tail: str  # and what follows it
    width: int  # the row's parameters (an update: the statement's)


@functools.lru_cache(maxsize=512)
def _shape(text: str) -> _Shape:
    names = frozenset(word.lower() for word in _WORD.findall(text))
    # A carrier is only prefixed (its text is not read): one that begins otherwise (a comment,
    # SHOW, SET) goes after the pending writes. A deferred insert is cut into pieces: text
    # that cutting cannot see through (several statements, comments, dollar or escape
    # quoting) is sent as it is.
    carrier = _CARRIER.match(text) is not None
    opaque = (
        any(mark in text for mark in (";", "--", "/*"))
        or _ESCAPED.search(text)
        or _DOLLAR.search(text)
    )
    if not opaque and (updated := _PLAIN_UPDATE.match(text)) is not None:
        # Sent whole (:meth:`AsyncpgRaw.update`); RETURNING would be lost in a ``WITH``.
        width = max((int(number) for number in _NUMBERED.findall(text)), default=0)
        if "returning" in names or "$" in "".join(_QUOTED.findall(text)):
            return _Shape(names, carrier, None, "", "", "", 0)
        return _Shape(names, carrier, updated.group(1).lower(), "", "", "", width)
    found = None if opaque else _PLAIN_INSERT.match(text)
    if found is None or not text[found.end() :].startswith("("):
        return _Shape(names, carrier, None, "", "", "", 0)
    start = found.end()
    depth, end = 0, start
    for end in range(start, len(text)):  # the row's closing parenthesis
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    tail = text[end + 1 :]
    quoted = "".join(_QUOTED.findall(text))
    if (
        depth
        or any(c in tail for c in "($")
        or "conflict" in tail.lower()
        or any(c in quoted for c in "()$")
    ):
        return _Shape(names, carrier, None, "", "", "", 0)  # ON CONFLICT, a subquery: as it is
    row = text[start : end + 1]
    width = max((int(number) for number in _NUMBERED.findall(row)), default=0)
    return _Shape(names, carrier, found.group(1).lower(), text[:start], row, tail, width)


def _renumbered(text: str, offset: int) -> str:
    return _NUMBERED.sub(lambda found: f"${int(found[1]) + offset}", text)


@functools.lru_cache(maxsize=512)
def _merged(text: str, count: int, pending: tuple[tuple[str, int], ...]) -> str | None:
    """``text`` (``count`` parameters) behind ``WITH`` queries of the ``pending`` writes, each
    (statement, rows), their parameters numbered after the statement's."""
    queries, offset = [], count
    for n, (written, rows) in enumerate(pending):
        shape = _shape(written)
        if not shape.row:  # an update, whole (one row of parameters)
            queries.append(f"_oncepay_w{n} AS ({_renumbered(written, offset)})")
            offset += shape.width
            continue
        values = []
        for _ in range(rows):
            values.append(_renumbered(shape.row, offset))
            offset += shape.width
        queries.append(f"_oncepay_w{n} AS ({shape.head}{', '.join(values)}{shape.tail})")
    joined = ", ".join(queries)
    stripped = text.lstrip()
    if stripped[:4].upper() == "WITH":
        rest = stripped[4:].lstrip()
        if rest[:9].upper() == "RECURSIVE":
            return None
        return f"WITH {joined}, {rest}"
    return f"WITH {joined} {stripped}"


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@functools.lru_cache(maxsize=256)
def _row_update(table: str, key: str, columns: tuple[str, ...]) -> Sql:
    """``UPDATE table SET column = $2, … WHERE key = $1``: names only, never values."""
    for name in (table, key, *columns):
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain column or table name: {name!r}")
    assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(columns, start=2))
    return Sql(f"UPDATE {table} SET {assignments} WHERE {key} = $1")


def _driver_errors() -> tuple[tuple[type[Exception], ...], tuple[type[Exception], ...]]:
    import sqlite3

    try:
        import asyncpg
    except ImportError:  # a SQLite-only installation
        return (sqlite3.Error,), ()
    return (sqlite3.Error,), (asyncpg.PostgresError, asyncpg.InterfaceError)


_SQLITE_ERRORS, _ASYNCPG_ERRORS = _driver_errors()
# The drivers' own errors, which the idempotency store's in-transaction statements raise as
# they are (this module translates its own): a database failing midway, as SQLAlchemy's are.
DRIVER_ERRORS = _SQLITE_ERRORS + _ASYNCPG_ERRORS


def _translated(statement: str, exc: Exception) -> DatabaseError:
    return DatabaseError(statement, None, exc)


class _Traced:
    """A raw connection whose statements each make a span (what SQLAlchemy's instrumentation
    does for its own statements: these never pass through its events)."""

    __slots__ = ("_inner", "_span", "_system", "driver", "integers_as_booleans")

    def __init__(self, inner: Raw, system: str, span: StatementSpan) -> None:
        self._inner, self._system, self._span = inner, system, span
        self.driver, self.integers_as_booleans = inner.driver, inner.integers_as_booleans

    @property
    def store(self) -> Any:
        return self._inner.store

    async def flush(self) -> None:
        await self._inner.flush()

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

    async def update(self, sql: Sql, *args: Any) -> None:
        with self._span(self._system, self._text(sql)):
            await self._inner.update(sql, *args)

    async def update_row(self, table: str, key: str, value: Any, changes: dict[str, Any]) -> None:
        with self._span(self._system, self._text(_row_update(table, key, tuple(changes)))):
            await self._inner.update_row(table, key, value, changes)


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
    """The raw connection under ``conn``, in the transaction ``conn`` holds (begun first if
    there is none, and on the server if SQLAlchemy has not sent anything yet: asyncpg begins
    lazily). Kept for
    the rest of the transaction: on PostgreSQL the server's transaction (the asyncpg
    adapter's, which SQLAlchemy's own objects may come and go around: a connection that
    autobegins after a raw statement is still in it), on SQLite SQLAlchemy's."""
    kept = conn.info.get(_KEY)
    if kept is not None and kept[0] is not None and kept[0] is _current(conn):
        return kept[1]  # type: ignore[no-any-return]
    if not conn.in_transaction():
        # As SQLAlchemy's own first statement would (autobegin): its commit() then commits
        # what the raw statements wrote, instead of finding nothing to commit.
        await conn.begin()
    fairy = await conn.get_raw_connection()
    adapted: Any = fairy.dbapi_connection
    found: Raw
    deferring: AsyncpgRaw | None = None
    if conn.dialect.name == "sqlite":
        found = _SQLite(fairy.driver_connection._connection)  # type: ignore[union-attr]
        transaction = conn.sync_connection.get_transaction() if conn.sync_connection else None
    else:
        if adapted._transaction is None:  # SQLAlchemy's asyncpg adapter begins at first use
            await adapted._start_transaction()
        transaction = adapted._transaction
        found = deferring = AsyncpgRaw(fairy.driver_connection)
        _send_before_sqlalchemy(conn.sync_engine)
    if _Statements.span is not None:
        found = _Traced(found, conn.dialect.name, _Statements.span)
    conn.info[_KEY] = (transaction, found, deferring)
    return found


def raw_sqlite(conn: Any) -> Raw:
    """A ``sqlite3`` connection in a transaction its caller runs (storage/db.py's
    ``write_raw``: no SQLAlchemy transaction around it) as a :class:`Raw`, traced as
    :func:`raw`'s when statement spans are on."""
    found: Raw = _SQLite(conn)
    if _Statements.span is not None:
        found = _Traced(found, "sqlite", _Statements.span)
    return found


def _current(conn: AsyncConnection) -> Any:
    """What a kept raw connection belongs to: the server's transaction on PostgreSQL (None
    before it began, or when the pool's connection is not at hand), SQLAlchemy's on SQLite."""
    sync = conn.sync_connection
    if sync is None:
        return None
    if conn.dialect.name == "sqlite":
        return sync.get_transaction()
    return _server_transaction(sync)


def _server_transaction(sync: Connection) -> Any:
    fairy = sync._dbapi_connection  # no check-out nor revalidation here: None if not at hand
    if fairy is None:
        return None
    return getattr(fairy.dbapi_connection, "_transaction", None)


def _send_before_sqlalchemy(engine: Engine) -> None:
    """Pending writes go before any statement SQLAlchemy sends on the connection (its own,
    or ``COMMIT``) and are dropped with a rollback: listeners on the engine, added once."""
    if engine in _LISTENED:
        return
    event.listen(engine, "before_cursor_execute", _send_pending)
    event.listen(engine, "commit", _send_pending)
    event.listen(engine, "rollback", _drop_pending)
    _LISTENED.add(engine)


_LISTENED: weakref.WeakSet[Engine] = weakref.WeakSet()


def _pending_in(conn: Connection) -> AsyncpgRaw | None:
    kept = conn.info.get(_KEY)
    if kept is None or kept[2] is None or not kept[2].pending:
        return None
    if kept[0] is not _server_transaction(conn):  # left by an earlier server transaction
        kept[2].drop()
        return None
    return kept[2]  # type: ignore[no-any-return]


def _send_pending(conn: Connection, *_: Any) -> None:
    # Inside SQLAlchemy's greenlet (its asyncio bridge): the coroutine is awaited there.
    deferring = _pending_in(conn)
    if deferring is not None:
        await_only(deferring.flush())


def _drop_pending(conn: Connection) -> None:
    kept = conn.info.get(_KEY)
    if kept is not None and kept[2] is not None:
        kept[2].drop()
