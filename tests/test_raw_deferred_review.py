"""Found in review of PostgreSQL's deferred inserts (storage/raw.py): a pending write was kept
with the SQLAlchemy transaction current when :func:`raw` was first called, and the engine
listeners dropped it, unsent, when the connection's transaction was another object by the
time SQLAlchemy sent a statement or committed. On a connection SQLAlchemy has not begun yet
(``engine.connect()``, SQLAlchemy 2's commit-as-you-go) :func:`raw` begins on the server;
SQLAlchemy's autobegin (or ``begin()``) then makes its own transaction object for the same
server transaction, and the insert was lost while the transaction committed. Pending writes
now belong to the server's transaction. Real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError, InvalidRequestError

from oncepay.storage.db import Database, read, write
from oncepay.storage.raw import Sql, raw
from tests.payments.stack import drop_schema
from tests.servers import POSTGRES_URL, require_postgres

pytestmark = pytest.mark.postgres

ITEM = Sql("INSERT INTO items (id, n) VALUES ($1, $2)")


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    require_postgres()
    url = f"{POSTGRES_URL}?schema=oncepay_rawrv_{uuid.uuid4().hex[:10]}"
    database = Database.from_url(url)
    async with write(database) as conn:
        await conn.execute(text(f"CREATE SCHEMA {database.schema}"))
        await conn.execute(text("CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER NOT NULL)"))
    try:
        yield database
    finally:
        await database.aclose()
        await drop_schema(url)


async def items(db: Database) -> list[tuple[str, int]]:
    async with read(db) as conn:
        rows = await conn.execute(text("SELECT id, n FROM items ORDER BY id"))
        return [(row[0], row[1]) for row in rows]


async def test_an_insert_before_autobegin_commits_with_the_connection(db: Database) -> None:
    async with db.engine.connect() as conn:  # commit-as-you-go: nothing begun yet
        found = await raw(conn)  # begins on the server (asyncpg), before SQLAlchemy does
        await found.run(ITEM, "a", 1)
        # SQLAlchemy autobegins (a new transaction object, the same server transaction): its
        # before_cursor_execute listener finds the pending insert kept under None and drops it.
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
        await conn.commit()
    assert await items(db) == [("a", 1)]


async def test_raw_begins_as_a_statement_of_sqlalchemy_s_would(db: Database) -> None:
    async with db.engine.connect() as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        with pytest.raises(InvalidRequestError):  # as after any statement: autobegun already
            await conn.begin()
        await conn.commit()
    assert await items(db) == [("a", 1)]


async def test_raw_statements_alone_commit_with_the_connection(db: Database) -> None:
    async with db.engine.connect() as conn:  # nothing begun, no SQLAlchemy statement after
        await (await raw(conn)).run(ITEM, "a", 1)
        await conn.commit()
    assert await items(db) == [("a", 1)]


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement sent on an asyncpg connection, one entry a round trip."""
    statements: list[str] = []
    for name in ("execute", "executemany", "fetch"):
        original = getattr(asyncpg.Connection, name)

        def counted(original: Any) -> Any:
            async def wrapper(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
                statements.append(" ".join(query.split()))
                return await original(self, query, *args, **kwargs)

            return wrapper

        monkeypatch.setattr(asyncpg.Connection, name, counted(original))
    return statements


@pytest.mark.parametrize(
    "opaque",
    [
        "INSERT INTO items (id, n) VALUES ($1, $2);",  # would close the WITH query early
        "INSERT INTO items (id, n) VALUES ($1, $2) -- a note",  # would swallow its parenthesis
        "INSERT INTO items (id, n) VALUES ($1, $2 + length(E'\\x29'))",  # an escape string
    ],
)
async def test_text_the_joining_cannot_read_is_sent_as_it_is(
    db: Database, sent: list[str], opaque: str
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        sent.clear()
        await found.run(Sql(opaque), "a", 1)
        assert sent == [" ".join(opaque.split())]  # at once, alone
    assert [name for name, _ in await items(db)] == ["a"]


async def test_rows_of_another_width_are_not_joined(db: Database, sent: list[str]) -> None:
    async with write(db) as conn:
        await conn.execute(text("CREATE TABLE pairs (a TEXT, b TEXT)"))
    pair = Sql("INSERT INTO pairs (a, b) VALUES ($1, $2)")

    async def uneven() -> None:
        async with write(db) as conn:
            # one row short, one long: as many values as two rows, which a joined statement
            # would take, each value in the wrong place ('p', 'q'), ('r', 's')
            await (await raw(conn)).many(pair, [("p",), ("q", "r", "s")])

    with pytest.raises(DatabaseError):
        await uneven()
    async with read(db) as conn:
        assert (await conn.execute(text("SELECT count(*) FROM pairs"))).scalar_one() == 0


async def test_a_statement_that_cannot_carry_goes_after_the_writes(
    db: Database, sent: list[str]
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        sent.clear()
        assert (await found.rows(Sql("SHOW TimeZone")))[0][0]
        assert len(sent) == 2  # the insert first, on its own; SHOW as it is
        assert sent[1] == "SHOW TimeZone"
    assert await items(db) == [("a", 1)]


async def test_the_reconciliation_s_driver_comes_after_pending_writes(db: Database) -> None:
    from oncepay.reconciliation.bulk import _asyncpg

    async with write(db) as conn:
        await (await raw(conn)).run(ITEM, "a", 1)
        driver = await _asyncpg(conn)  # the bare connection its bulk statements go to
        assert await driver.fetchval("SELECT count(*) FROM items") == 1
