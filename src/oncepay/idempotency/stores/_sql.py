"""What the SQL stores share: the record layout, statements with named parameters, per-record
wake-ups for wait mode, and transactional completion inside a caller's own transaction.

Both SQL stores keep one row per (scope, key), with the same columns in the same order:

    scope text, idempotency_key text            primary key
    fingerprint text, state text, fence bigint
    created_at, lease_expires_at, expires_at    POSIX seconds as double precision (the engine's
                                                clock, stored exactly as the memory store keeps it)
    recovery_point text                         null until the first checkpoint
    response_status int, response_headers text (JSON list of pairs), response_body blob/bytea
                                                null until completed

plus an index on ``expires_at`` for the purge job.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from oncepay.errors import LeaseLost
from oncepay.idempotency.records import Record, RecordState, StoredResponse
from oncepay.idempotency.stores.base import MAX_POLL_INTERVAL

__all__ = [
    "RECORD_COLUMNS",
    "SELECT_LIST",
    "EventWatch",
    "KeyEvents",
    "Statement",
    "TransactionalCompletion",
    "completion_params",
    "lease_lost",
    "record_from_row",
    "topic",
]

RECORD_COLUMNS = (
    "scope",
    "idempotency_key",
    "fingerprint",
    "state",
    "fence",
    "created_at",
    "lease_expires_at",
    "expires_at",
    "recovery_point",
    "response_status",
    "response_headers",
    "response_body",
)
SELECT_LIST = ", ".join(RECORD_COLUMNS)


def record_from_row(row: Sequence[Any]) -> Record:
    """A :class:`Record` from a row whose columns are :data:`RECORD_COLUMNS`, in order."""
    scope, key, fingerprint, state, fence, created, lease_end, expires, point = row[:9]
    status, headers, body = row[9:12]
    response = None
    if status is not None:
        response = StoredResponse(
            int(status), StoredResponse.parse_headers(headers), bytes(body or b"")
        )
    return Record(
        scope=scope,
        key=key,
        fingerprint=fingerprint,
        state=RecordState(state),
        fence=int(fence),
        created_at=float(created),
        lease_expires_at=float(lease_end),
        expires_at=float(expires),
        recovery_point=point,
        response=response,
    )


# -- statements ----------------------------------------------------------------------------------

# A ``:name`` parameter, but not the second colon of a ``::type`` cast.
_PARAMETER = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Statement:
    """One SQL statement written with ``:name`` parameters, rendered in each driver's style:
    ``named`` for sqlite3 and SQLAlchemy's ``text()``, ``pyformat`` for psycopg, ``numeric``
    (``$1``, with :meth:`values` giving the order) for asyncpg."""

    def __init__(self, text: str) -> None:
        self.named = text
        self.names = tuple(dict.fromkeys(_PARAMETER.findall(text)))
        self.pyformat = _PARAMETER.sub(r"%(\1)s", text.replace("%", "%%"))
        position = {name: i for i, name in enumerate(self.names, start=1)}
        self.numeric = _PARAMETER.sub(lambda m: f"${position[m.group(1)]}", text)

    def values(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(params[name] for name in self.names)


def completion_params(scope: str, key: str, fence: int, response: StoredResponse) -> dict[str, Any]:
    """The parameters of both stores' ``complete`` statement."""
    return {
        "scope": scope,
        "key": key,
        "fence": fence,
        "status": response.status,
        "headers": response.headers_json(),
        "body": response.body,
    }


# -- wake-ups for wait mode ----------------------------------------------------------------------


def topic(scope: str, key: str) -> str:
    """A short, fixed-size name for one record's changes.

    PostgreSQL computes the same digest inside its completion statement (a NUL separates scope
    from key: neither can contain one), so a notification payload never nears NOTIFY's 8000-byte
    limit however long a scope is. A collision would only wake a waiter for nothing.
    """
    raw = scope.encode() + b"\0" + key.encode()
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


class KeyEvents:
    """The waiters of each record, by topic: a store sets their events when the record may
    have changed."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = {}

    @contextmanager
    def subscribe(self, name: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        waiters = self._events.setdefault(name, set())
        waiters.add(event)
        try:
            yield event
        finally:
            waiters.discard(event)
            if not waiters:
                self._events.pop(name, None)

    def notify(self, name: str) -> None:
        for event in self._events.get(name, ()):
            event.set()

    def notify_all(self) -> None:
        """Wake everyone, e.g. when notifications may have been missed: each re-reads."""
        for waiters in self._events.values():
            for event in waiters:
                event.set()


class EventWatch:
    """Waits for its record's event; with ``poll`` set, also returns after a short, growing
    interval, for changes made where no event can reach us (another process)."""

    def __init__(self, event: asyncio.Event, *, poll: float | None = None) -> None:
        self._event = event
        self._poll = poll

    async def wait(self, timeout: float) -> None:
        if not self._event.is_set():
            bound = timeout if self._poll is None else min(timeout, self._poll)
            try:
                await asyncio.wait_for(self._event.wait(), max(bound, 0.0))
            except TimeoutError:
                if self._poll is not None:
                    self._poll = min(self._poll * 2, MAX_POLL_INTERVAL)
                return
        # Cleared before the engine re-reads the record, so a later change still wakes us.
        self._event.clear()


# -- transactional completion --------------------------------------------------------------------


class _Rows:
    """How many rows a caller's connection returned for a statement, per driver."""

    @staticmethod
    def sync(conn: Any, statement: Statement, params: dict[str, Any]) -> int:
        import sqlite3

        if isinstance(conn, sqlite3.Connection):
            return len(conn.execute(statement.named, params).fetchall())
        if _is_a(conn, ("psycopg", "Connection")):
            return len(conn.execute(statement.pyformat, params).fetchall())
        if _is_a(conn, ("sqlalchemy.orm", "Session"), ("sqlalchemy.engine", "Connection")):
            return len(conn.execute(_text(statement.named), params).fetchall())
        raise TypeError(f"complete_in() cannot use a {type(conn).__qualname__}; see its docstring")

    @staticmethod
    async def async_(conn: Any, statement: Statement, params: dict[str, Any]) -> int:
        if _is_a(conn, ("sqlite3", "Connection")):
            # From an async caller that holds SQLite's write lock already (the payments
            # service's phases): the statement cannot wait, so it runs on the loop.
            return len(conn.execute(statement.named, params).fetchall())
        if _is_a(conn, ("psycopg", "AsyncConnection")):
            cursor = await conn.execute(statement.pyformat, params)
            return len(await cursor.fetchall())
        if _is_a(
            conn,
            ("asyncpg", "Connection"),
            ("asyncpg.pool", "PoolConnectionProxy"),
            # The payments service's raw connection: writes it deferred travel with this one.
            ("oncepay.storage.raw", "AsyncpgRaw"),
        ):
            return len(await conn.fetch(statement.numeric, *statement.values(params)))
        if _is_a(
            conn,
            ("sqlalchemy.ext.asyncio", "AsyncSession"),
            ("sqlalchemy.ext.asyncio", "AsyncConnection"),
        ):
            result = await conn.execute(_text(statement.named), params)
            return len(result.fetchall())
        raise TypeError(f"acomplete_in() cannot use a {type(conn).__qualname__}; see its docstring")


@functools.cache
def _text(sql: str) -> Any:
    """The statement as a SQLAlchemy ``text()``, made once: parsing its binds costs more than
    running it (a handful of statements, so the cache stays small)."""
    from sqlalchemy import text

    return text(sql)


def _is_a(obj: object, *classes: tuple[str, str]) -> bool:
    """``isinstance`` against classes of optional drivers, without importing them: an object
    of a driver that was never imported cannot be one of its classes."""
    for module_name, class_name in classes:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(obj, cls):
            return True
    return False


class TransactionalCompletion:
    """Completing a record inside a transaction the caller already holds (SPEC §3).

    The caller's writes and the stored response then commit together or not at all: a crash
    after the commit leaves a completed record (a retry replays), a crash or rollback before it
    leaves the record executing (a retry takes it over once the lease runs out).

    The connection must reach the store's own database. Errors of the caller's connection
    reach the caller unchanged: the caller owns that transaction, and its retry logic (a
    serialization failure, say) must see them. A stale fence raises
    :class:`~oncepay.errors.LeaseLost`, after which the caller must roll back.
    """

    _complete: Statement  # the store's completion statement, returning a row when it applied
    _checkpoint: Statement  # the store's checkpoint statement, likewise
    _claim_new: Statement  # insert an executing record unless the key has one, returning it

    def complete_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fence: int,
        response: StoredResponse,
        *,
        now: float,
    ) -> None:
        """Complete on a sync connection: ``sqlite3.Connection``, ``psycopg.Connection``, or a
        SQLAlchemy ``Session`` / ``Connection``."""
        params = completion_params(scope, key, fence, response)
        if _Rows.sync(conn, self._complete, params) == 0:
            raise lease_lost(key, fence)

    async def acomplete_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fence: int,
        response: StoredResponse,
        *,
        now: float,
    ) -> None:
        """Complete on an async connection: ``psycopg.AsyncConnection``, an ``asyncpg``
        connection (pooled or not), a SQLAlchemy ``AsyncSession`` / ``AsyncConnection``, or
        from async code a ``sqlite3.Connection`` already holding the write lock."""
        params = completion_params(scope, key, fence, response)
        if await _Rows.async_(conn, self._complete, params) == 0:
            raise lease_lost(key, fence)

    async def acheckpoint_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fence: int,
        recovery_point: str,
        *,
        now: float,
        lease: float,
        keep_until: float = 0.0,
    ) -> None:
        """Advance the recovery point (and renew the lease) inside the caller's transaction on
        an async connection, so that a phase's writes and its recovery point commit together:
        the atomic phases of SPEC §5. ``keep_until`` pushes the record's expiry out to at
        least that time."""
        params = {
            "scope": scope,
            "key": key,
            "fence": fence,
            "recovery_point": recovery_point,
            "lease_expires_at": float(now + lease),
            "keep_until": float(keep_until),
        }
        if await _Rows.async_(conn, self._checkpoint, params) == 0:
            raise lease_lost(key, fence)

    async def aclaim_in(
        self,
        conn: Any,
        scope: str,
        key: str,
        fingerprint: str,
        *,
        fence: int,
        now: float,
        lease: float,
        ttl: float,
    ) -> bool:
        """Claim a key that has no record inside the caller's transaction on an async
        connection (as :meth:`acheckpoint_in`): True when the executing record was inserted
        (it commits with the caller's writes), False when the key has a record of any kind,
        which is left as it is."""
        params = {
            "scope": scope,
            "key": key,
            "fingerprint": fingerprint,
            "fence": fence,
            "created_at": float(now),
            "lease_expires_at": float(now + lease),
            "expires_at": float(now + ttl),
        }
        return await _Rows.async_(conn, self._claim_new, params) > 0


def claim_new_sql(table: str) -> Statement:
    """Both stores' insert of a new executing record, unless the key has one (RETURNING a row
    only when it inserted)."""
    return Statement(
        f"INSERT INTO {table} (scope, idempotency_key, fingerprint, state, fence, created_at, "
        "lease_expires_at, expires_at) VALUES (:scope, :key, :fingerprint, 'executing', :fence, "
        ":created_at, :lease_expires_at, :expires_at) "
        "ON CONFLICT (scope, idempotency_key) DO NOTHING RETURNING fence"
    )


def lease_lost(key: str, fence: int) -> LeaseLost:
    return LeaseLost(f"token {fence} no longer holds key {key!r}")
