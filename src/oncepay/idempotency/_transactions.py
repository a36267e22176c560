"""A transaction on a caller's connection, per driver, for ``@idempotent(transaction=...)``.

The decorated function's writes and its stored result must commit together, so the decorator
runs the function inside a transaction and completes the record in it before the commit:

* nothing open on the connection: the decorator begins a transaction and commits it once the
  record is completed (or rolls it back if the function raises);
* a transaction already open (the caller's unit of work): the decorator joins it, and the
  commit (or rollback) stays the caller's, for the writes and the record together. No
  savepoint: SQLAlchemy's pysqlite driver would commit on releasing one outside a BEGIN.

Drivers are recognised by class without being imported (an object of a driver that was never
imported cannot be one of its classes): sqlite3, psycopg 3 (sync and async), asyncpg (plain or
pooled) and SQLAlchemy sessions and connections (sync and async, scoped sessions too).
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

__all__ = ["aholding", "holding", "is_a", "is_async", "unwrapped"]

_SCOPED = (
    ("sqlalchemy.orm.scoping", "scoped_session"),
    ("sqlalchemy.ext.asyncio.scoping", "async_scoped_session"),
)
_SQLALCHEMY = (("sqlalchemy.orm", "Session"), ("sqlalchemy.engine", "Connection"))
_SYNC = (*_SQLALCHEMY, ("psycopg", "Connection"))
_SQLALCHEMY_ASYNC = (
    ("sqlalchemy.ext.asyncio", "AsyncSession"),
    ("sqlalchemy.ext.asyncio", "AsyncConnection"),
)
_ASYNC = (
    *_SQLALCHEMY_ASYNC,
    ("psycopg", "AsyncConnection"),
    ("asyncpg", "Connection"),
    ("asyncpg.pool", "PoolConnectionProxy"),
)


def is_a(obj: object, *classes: tuple[str, str]) -> bool:
    """``isinstance`` against classes of optional packages, without importing them."""
    for module_name, class_name in classes:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(obj, cls):
            return True
    return False


def unwrapped(conn: Any) -> Any:
    """The session a scoped session stands for in this thread (Flask-SQLAlchemy's
    ``db.session``); any other connection as it is."""
    return conn() if is_a(conn, *_SCOPED) else conn


def is_async(conn: Any) -> bool:
    """Whether ``conn`` must be awaited: an async driver's connection or session."""
    return is_a(unwrapped(conn), *_ASYNC)


@contextmanager
def holding(conn: Any) -> Iterator[bool]:
    """A transaction of our own on a sync connection, or the caller's open one, joined: the
    value says which (True: joined, the commit is the caller's)."""
    conn = unwrapped(conn)
    if not isinstance(conn, sqlite3.Connection) and not is_a(conn, *_SYNC):
        raise TypeError(f"cannot hold a transaction on a {type(conn).__qualname__}")
    if _in_transaction(conn):
        yield True
        return
    if isinstance(conn, sqlite3.Connection):
        begun: Any = _sqlite_transaction(conn)
    else:
        begun = conn.begin() if is_a(conn, *_SQLALCHEMY) else conn.transaction()
    with begun:
        yield False


@asynccontextmanager
async def aholding(conn: Any) -> AsyncIterator[bool]:
    """:func:`holding` for async connections."""
    conn = unwrapped(conn)
    if not is_a(conn, *_ASYNC):
        raise TypeError(f"cannot hold a transaction on a {type(conn).__qualname__}")
    if _in_transaction(conn):
        yield True
        return
    async with conn.begin() if is_a(conn, *_SQLALCHEMY_ASYNC) else conn.transaction():
        yield False


def _in_transaction(conn: Any) -> bool:
    """Whether the caller holds a transaction open on ``conn`` (then it is joined)."""
    if isinstance(conn, sqlite3.Connection):
        return conn.in_transaction
    if is_a(conn, ("psycopg", "Connection"), ("psycopg", "AsyncConnection")):
        from psycopg.pq import TransactionStatus

        return bool(conn.info.transaction_status != TransactionStatus.IDLE)
    if is_a(conn, ("asyncpg", "Connection"), ("asyncpg.pool", "PoolConnectionProxy")):
        return bool(conn.is_in_transaction())
    return bool(conn.in_transaction())  # SQLAlchemy, sync or async


@contextmanager
def _sqlite_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """sqlite3 has no transaction object: BEGIN IMMEDIATE takes the write lock at once, so the
    transaction never fails to upgrade a read lock halfway."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
