"""A transaction on a caller's connection, per driver, for ``@idempotent(transaction=...)``.

The decorated function's writes and its stored result must commit together, so the decorator
runs the function inside a transaction and completes the record in it before the commit:

* nothing open on the connection: the decorator begins a transaction and commits it once the
  record is completed (or rolls it back if the function raises);
* a transaction already open (the caller's unit of work): a savepoint inside it, and the
  commit stays the caller's, which then commits the writes and the record together.

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

_SCOPED = (("sqlalchemy.orm.scoping", "scoped_session"),
           ("sqlalchemy.ext.asyncio.scoping", "async_scoped_session"))  # fmt: skip
_SQLALCHEMY = (("sqlalchemy.orm", "Session"), ("sqlalchemy.engine", "Connection"))
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
def holding(conn: Any) -> Iterator[None]:
    """A transaction (or a savepoint inside the caller's) on a sync connection."""
    conn = unwrapped(conn)
    if isinstance(conn, sqlite3.Connection):
        with _sqlite_transaction(conn):
            yield
    elif is_a(conn, *_SQLALCHEMY):
        with conn.begin_nested() if conn.in_transaction() else conn.begin():
            yield
    elif is_a(conn, ("psycopg", "Connection")):
        with conn.transaction():  # psycopg makes it a savepoint inside an open transaction
            yield
    else:
        raise TypeError(f"cannot hold a transaction on a {type(conn).__qualname__}")


@asynccontextmanager
async def aholding(conn: Any) -> AsyncIterator[None]:
    """:func:`holding` for async connections."""
    conn = unwrapped(conn)
    if is_a(conn, *_SQLALCHEMY_ASYNC):
        async with conn.begin_nested() if conn.in_transaction() else conn.begin():
            yield
    elif is_a(conn, ("psycopg", "AsyncConnection"), ("asyncpg", "Connection"),
              ("asyncpg.pool", "PoolConnectionProxy")):  # fmt: skip
        async with conn.transaction():  # both nest as a savepoint inside an open transaction
            yield
    else:
        raise TypeError(f"cannot hold a transaction on a {type(conn).__qualname__}")


@contextmanager
def _sqlite_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """sqlite3 has no transaction object: BEGIN IMMEDIATE (the write lock at once, so the
    transaction never fails to upgrade a read lock halfway) unless the caller holds one."""
    if conn.in_transaction:  # the caller's: its commit, not ours
        yield
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.rollback()
        raise
    conn.commit()
