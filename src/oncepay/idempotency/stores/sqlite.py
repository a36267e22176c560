"""``sqlite:///path.db``: the embedded default, safe across processes on one host.

The stdlib ``sqlite3`` driver blocks, so each store owns one connection that lives on one
dedicated worker thread: every primitive is one job on that thread, the event loop only awaits
it, and jobs never interleave (the thread is also what guards the lazy connect and schema
creation). Across processes SQLite's own locks do the work, in WAL mode so that readers never
wait for the writer.

Cost per primitive (see ``tests/test_store_sqlite.py``): a replay, a 409 or a 422 is one read
statement; a new request is one claim transaction (read, then write) and one ``UPDATE``.

Wait mode: this store wakes its own waiters when it completes or releases a record, and polls
for changes made by other processes, which SQLite cannot announce.

``complete_in`` / ``acomplete_in`` complete a record inside the caller's own transaction on
the same database file (see :class:`~oncepay.idempotency.stores._sql.TransactionalCompletion`).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from oncepay._drivers.sqlite import enable_wal as _enable_wal
from oncepay._drivers.sqlite import is_busy as _is_busy
from oncepay.errors import ConfigurationError, StoreUnavailable
from oncepay.idempotency.records import Claim, Record, StoredResponse
from oncepay.idempotency.stores._sql import (
    RECORD_COLUMNS,
    SELECT_LIST,
    EventWatch,
    KeyEvents,
    Statement,
    TransactionalCompletion,
    claim_new_sql,
    completion_params,
    lease_lost,
    record_from_row,
    topic,
)
from oncepay.idempotency.stores.base import (
    DEFAULT_PURGE_BATCH,
    POLL_INTERVAL,
    Watch,
    resolve_claim,
)

__all__ = ["DEFAULT_BUSY_TIMEOUT", "DEFAULT_TABLE", "SQLiteStore"]

T = TypeVar("T")

DEFAULT_TABLE = "oncepay_idempotency"
# How long a statement waits for another process's write lock before the store reports itself
# unavailable: a claim holds the lock for well under a millisecond, so five seconds of waiting
# means a wedged database (a long transaction elsewhere), and a 503 beats a hung request.
DEFAULT_BUSY_TIMEOUT = 5.0

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# A rowid table rather than WITHOUT ROWID: rows carry whole response bodies, and SQLite advises
# WITHOUT ROWID only for small rows. Table and index are created in one transaction, so a
# process starting alongside another either creates both or finds both.
_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS {table} (
    scope            TEXT    NOT NULL,
    idempotency_key  TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    state            TEXT    NOT NULL CHECK (state IN ('executing', 'completed', 'released')),
    fence            INTEGER NOT NULL,
    created_at       REAL    NOT NULL,
    lease_expires_at REAL    NOT NULL,
    expires_at       REAL    NOT NULL,
    recovery_point   TEXT,
    response_status  INTEGER,
    response_headers TEXT,
    response_body    BLOB,
    PRIMARY KEY (scope, idempotency_key)
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);
COMMIT;
"""

_FENCED = "scope = :scope AND idempotency_key = :key AND fence = :fence AND state = 'executing'"


class _Sql:
    """The store's statements, for one table."""

    def __init__(self, table: str) -> None:
        quoted = f'"{table}"'
        self.schema = _SCHEMA.format(table=quoted, index=f'"{table}_expires_at"')
        self.select = (
            f"SELECT {SELECT_LIST} FROM {quoted} WHERE scope = :scope AND idempotency_key = :key"
        )
        updates = ", ".join(f"{column} = excluded.{column}" for column in RECORD_COLUMNS[2:])
        values = ", ".join(f":{column}" for column in RECORD_COLUMNS)
        self.save = (
            f"INSERT INTO {quoted} ({SELECT_LIST}) VALUES ({values}) "
            f"ON CONFLICT (scope, idempotency_key) DO UPDATE SET {updates}"
        )
        self.complete = Statement(
            f"UPDATE {quoted} SET state = 'completed', response_status = :status, "
            f"response_headers = :headers, response_body = :body WHERE {_FENCED} RETURNING fence"
        )
        self.release = f"UPDATE {quoted} SET state = 'released' WHERE {_FENCED} RETURNING fence"
        # keep_until: a record whose request is still being driven (an unknown acquirer
        # outcome) must outlive its TTL, or a retry would be taken for a new request.
        self.checkpoint = Statement(
            f"UPDATE {quoted} SET recovery_point = :recovery_point, "
            "lease_expires_at = :lease_expires_at, expires_at = CASE WHEN expires_at < "
            f":keep_until THEN :keep_until ELSE expires_at END WHERE {_FENCED} RETURNING fence"
        )
        self.claim_new = claim_new_sql(quoted)
        self.purge = (
            f"DELETE FROM {quoted} WHERE (scope, idempotency_key) IN "
            f"(SELECT scope, idempotency_key FROM {quoted} WHERE expires_at <= :now LIMIT :limit)"
        )


class SQLiteStore(TransactionalCompletion):
    """An idempotency store in one SQLite table.

    ``on_connect`` is called with the store's connection, on its worker thread, once it is
    opened (to set a pragma, or to trace statements).
    """

    def __init__(
        self,
        path: str,
        *,
        table: str = DEFAULT_TABLE,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        on_connect: Callable[[sqlite3.Connection], object] | None = None,
    ) -> None:
        if not _IDENTIFIER.fullmatch(table):
            raise ConfigurationError(
                f"SQLite table name {table!r} must match {_IDENTIFIER.pattern}"
            )
        if busy_timeout < 0:
            raise ConfigurationError(f"busy_timeout must be >= 0 seconds, not {busy_timeout}")
        self.path = path
        self.table = table
        self._sql = _Sql(table)
        self._complete = self._sql.complete
        self._checkpoint = self._sql.checkpoint
        self._claim_new = self._sql.claim_new
        self._busy_timeout = busy_timeout
        self._on_connect = on_connect
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oncepay-sqlite")
        self._conn: sqlite3.Connection | None = None  # touched only on self._thread
        self._events = KeyEvents()
        self._closed = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> SQLiteStore:
        """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` (SQLAlchemy's form)."""
        parts = urlsplit(url)
        path = parts.path[1:]
        if parts.netloc or not path or parts.query:
            raise ConfigurationError(
                f"expected sqlite:///path.db with options as keyword arguments, not {url!r}"
            )
        return cls(path, **options)

    # -- primitives ------------------------------------------------------------------------------

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        def decide(conn: sqlite3.Connection) -> Claim:
            """The claim rule on the row as this transaction reads it; any write in the same."""
            existing = self._read(conn, scope, key)
            claim = resolve_claim(existing, scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
            if claim.claimed:
                conn.execute(self._sql.save, _record_params(claim.record))
            return claim

        return await self._run(lambda conn: _optimistically(conn, decide))

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        params = completion_params(scope, key, fence, response)
        await self._fenced(self._sql.complete.named, params)
        self._events.notify(topic(scope, key))

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        await self._fenced(self._sql.release, {"scope": scope, "key": key, "fence": fence})
        self._events.notify(topic(scope, key))

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        params = {
            "scope": scope,
            "key": key,
            "fence": fence,
            "recovery_point": recovery_point,
            "keep_until": 0.0,
            "lease_expires_at": now + lease,
        }
        await self._fenced(self._sql.checkpoint.named, params)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self._run(lambda conn: self._read(conn, scope, key))

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        params = {"now": now, "limit": limit}
        return await self._run(lambda conn: conn.execute(self._sql.purge, params).rowcount)

    @asynccontextmanager
    async def watch(self, scope: str, key: str) -> AsyncIterator[Watch]:
        with self._events.subscribe(topic(scope, key)) as event:
            yield EventWatch(event, poll=POLL_INTERVAL)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._events.notify_all()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._disconnect)
        self._thread.shutdown(wait=False)

    # -- the worker thread -----------------------------------------------------------------------

    async def _run(self, job: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``job`` with the connection on the store's thread; driver errors become
        :class:`~oncepay.errors.StoreUnavailable`."""
        if self._closed:
            raise StoreUnavailable(f"the SQLite store {self.path} is closed")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._with_connection, job)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite store {self.path}: {exc}") from exc

    async def _fenced(self, sql: str, params: dict[str, Any]) -> None:
        """Run an update that applies only for the current token of an executing record."""
        if not await self._run(lambda conn: conn.execute(sql, params).fetchall()):
            raise lease_lost(params["key"], params["fence"])

    def _read(self, conn: sqlite3.Connection, scope: str, key: str) -> Record | None:
        rows = conn.execute(self._sql.select, {"scope": scope, "key": key}).fetchall()
        return record_from_row(rows[0]) if rows else None

    def _with_connection(self, job: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        return job(self._conn)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit transactions; the store begins its own.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            if self._on_connect is not None:
                self._on_connect(conn)
            _enable_wal(conn, deadline=time.monotonic() + self._busy_timeout)
            conn.executescript(self._sql.schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _optimistically(
    conn: sqlite3.Connection, decide: Callable[[sqlite3.Connection], Claim]
) -> Claim:
    """Run a claim decision first in a deferred transaction, then, if need be, under the lock.

    The deferred transaction reads without a lock, so a live record (a replay, a 409, a 422) is
    answered by that one read. Writing upgrades it to a write transaction, which SQLite refuses
    at once (SQLITE_BUSY or SQLITE_BUSY_SNAPSHOT) when another connection holds the write lock
    or has written since our read: the decision may be stale, so it is taken again inside
    ``BEGIN IMMEDIATE``, which waits for the lock (up to the busy timeout) and reads the latest
    state.
    """
    try:
        with _transaction(conn, "BEGIN"):
            return decide(conn)
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise
    with _transaction(conn, "BEGIN IMMEDIATE"):
        return decide(conn)


@contextmanager
def _transaction(conn: sqlite3.Connection, begin: str) -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _record_params(record: Record) -> dict[str, Any]:
    response = record.response
    return {
        "scope": record.scope,
        "idempotency_key": record.key,
        "fingerprint": record.fingerprint,
        "state": record.state.value,
        "fence": record.fence,
        "created_at": record.created_at,
        "lease_expires_at": record.lease_expires_at,
        "expires_at": record.expires_at,
        "recovery_point": record.recovery_point,
        "response_status": response.status if response else None,
        "response_headers": response.headers_json() if response else None,
        "response_body": response.body if response else None,
    }
