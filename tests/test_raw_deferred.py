"""Deferred writes on PostgreSQL (storage/raw.py): a plain insert whose rows are not needed
travels with the transaction's next statement, and nothing about what commits changes: every
write reaches the database in its transaction, a statement sees the writes before it, an
error in a deferred write fails its transaction, and a rollback leaves nothing behind, not
even for the next transaction on the same connection. Real PostgreSQL throughout."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DatabaseError, InvalidRequestError

from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.stores.postgres import PostgresStore
from oncepay.storage.db import Database, read, write
from oncepay.storage.raw import Sql, raw
from tests.payments.stack import drop_schema
from tests.servers import POSTGRES_URL, require_postgres

pytestmark = pytest.mark.postgres

ITEM = Sql("INSERT INTO items (id, n) VALUES ($1, $2)")
NOTE = Sql("INSERT INTO notes (item, body) VALUES ($1, 'noted: ' || $2)")
OTHER_ONE = Sql("INSERT INTO other (n) VALUES (1)")  # no parameter at all
COUNT_ITEMS = Sql("SELECT count(*) FROM items")
SUM_OTHER = Sql("SELECT coalesce(sum(n), 0) FROM other")
BUMP = Sql("UPDATE items SET n = n + 1 WHERE id = $1")
ITEM_ONCE = Sql("INSERT INTO items (id, n) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING")


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    require_postgres()
    url = f"{POSTGRES_URL}?schema=oncepay_raw_{uuid.uuid4().hex[:10]}"
    database = Database.from_url(url)
    async with write(database) as conn:
        for statement in (
            f"CREATE SCHEMA {database.schema}",
            "CREATE TABLE items (id TEXT PRIMARY KEY, n INTEGER NOT NULL)",
            "CREATE TABLE notes (seq SERIAL PRIMARY KEY, item TEXT NOT NULL REFERENCES items(id),"
            " body TEXT NOT NULL)",
            "CREATE TABLE other (n INTEGER NOT NULL)",
        ):
            await conn.execute(text(statement))
    try:
        yield database
    finally:
        await database.aclose()
        await drop_schema(url)


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


async def items(db: Database) -> list[tuple[str, int]]:
    async with read(db) as conn:
        rows = await conn.execute(text("SELECT id, n FROM items ORDER BY id"))
        return [(row[0], row[1]) for row in rows]


async def test_writes_travel_with_the_next_statement(db: Database, sent: list[str]) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        sent.clear()
        await found.run(ITEM, "a", 1)
        await found.many(NOTE, [("a", "x"), ("a", "y")])
        await found.run(OTHER_ONE)
        assert sent == []  # nothing sent yet
        assert (await found.rows(Sql("SELECT $1::int + 1"), 41))[0][0] == 42
        assert len(sent) == 1  # the inserts went in front of the SELECT, one round trip
        assert sent[0].startswith("WITH _oncepay_w0 AS (INSERT INTO items")
        assert "VALUES ($2, $3)), _oncepay_w1 AS (INSERT INTO notes" in sent[0]
        assert "VALUES ($4, 'noted: ' || $5), ($6, 'noted: ' || $7)), _oncepay_w2" in sent[0]
        assert sent[0].endswith("VALUES (1)) SELECT $1::int + 1")
    assert await items(db) == [("a", 1)]
    async with read(db) as conn:
        notes = (await conn.execute(text("SELECT item, body FROM notes ORDER BY seq"))).all()
    assert [tuple(note) for note in notes] == [("a", "noted: x"), ("a", "noted: y")]
    async with read(db) as conn:
        assert (await conn.execute(text("SELECT count(*) FROM other"))).scalar_one() == 1


async def test_pending_writes_commit_with_the_transaction(db: Database, sent: list[str]) -> None:
    async with write(db) as conn:
        await (await raw(conn)).run(ITEM, "a", 1)  # nothing after it but COMMIT
    assert await items(db) == [("a", 1)]
    assert [s for s in sent if "INSERT" in s] == ["WITH _oncepay_w0 AS (INSERT INTO items (id, n) "
                                                  "VALUES ($1, $2)) SELECT 1"]  # fmt: skip


async def test_a_statement_sees_the_writes_before_it(db: Database, sent: list[str]) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(ITEM, "b", 2)
        sent.clear()
        # It names the table the pending inserts go to: they are sent first, on their own.
        assert (await found.rows(COUNT_ITEMS))[0][0] == 2
        assert len(sent) == 2
        await found.run(ITEM, "c", 3)
        # SQLAlchemy's own statements see them too.
        assert (await conn.execute(text("SELECT count(*) FROM items"))).scalar_one() == 3
        await found.run(ITEM, "d", 4)
        # So does a statement on the driver once flushed.
        await found.flush()
        assert await found.driver.fetchval("SELECT count(*) FROM items") == 4
    assert [name for name, _ in await items(db)] == ["a", "b", "c", "d"]


async def test_updates_and_upserts_are_never_deferred(db: Database) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(BUMP, "a")  # would miss the pending row if it travelled with it
        await found.run(ITEM_ONCE, "b", 1)
        await found.run(ITEM_ONCE, "b", 2)  # two upserts of one key in one statement would fail
    assert await items(db) == [("a", 2), ("b", 1)]


async def test_an_error_in_a_deferred_write_fails_its_transaction(db: Database) -> None:
    async def twice() -> None:
        async with write(db) as conn:
            found = await raw(conn)
            await found.run(ITEM, "a", 1)
            await found.run(ITEM, "a", 2)  # a duplicate key, deferred
            await found.rows(SUM_OTHER)

    async def twice_at_commit() -> None:
        async with write(db) as conn:
            found = await raw(conn)
            await found.run(ITEM, "a", 1)
            await found.run(ITEM, "a", 2)  # sent only before the COMMIT

    with pytest.raises(DatabaseError):
        await twice()
    with pytest.raises(DatabaseError):
        await twice_at_commit()
    assert await items(db) == []
    async with write(db) as conn:  # the pool's connections are whole
        await (await raw(conn)).run(ITEM, "b", 1)
    assert await items(db) == [("b", 1)]


async def test_a_rollback_drops_what_was_pending(db: Database) -> None:
    # One pooled connection, so the next transaction runs on the same one.
    assert db.schema is not None
    single = Database.from_url(f"{db.url}?schema={db.schema}")
    pids = set()

    async def failing() -> None:
        async with write(single) as conn:
            pids.add((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await (await raw(conn)).run(ITEM, "lost", 1)
            raise RuntimeError("the caller fails")

    try:
        with pytest.raises(RuntimeError):
            await failing()
        async with write(single) as conn:
            pids.add((await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one())
            await conn.execute(text("INSERT INTO other (n) VALUES (1)"))
        async with write(single) as conn:
            await (await raw(conn)).run(ITEM, "kept", 1)
            await (await raw(conn)).rows(SUM_OTHER)
    finally:
        await single.aclose()
    assert len(pids) == 1  # the same connection throughout
    assert await items(db) == [("kept", 1)]


async def test_the_store_s_statements_carry_pending_writes(db: Database, sent: list[str]) -> None:
    store = PostgresStore(POSTGRES_URL, table=f"{db.schema}.keys")
    await store.purge_expired(now=0.0)  # creates its table
    try:
        async with write(db) as conn:
            found = await raw(conn)
            await found.run(ITEM, "a", 1)
            sent.clear()
            claimed = await store.aclaim_in(
                found.store, "s", "k", "fp", fence=1, now=1.0, lease=30.0, ttl=60.0
            )
            assert claimed
            assert len(sent) == 1
            assert sent[0].startswith("WITH _oncepay_w0 AS (INSERT INTO items")
        assert await items(db) == [("a", 1)]
        async with write(db) as conn:
            found = await raw(conn)
            await found.run(ITEM, "b", 2)
            sent.clear()
            # The completion notifies through a channel named by an E'' literal: it carries
            # the insert all the same (only a deferred insert's own text is cut up).
            await store.acomplete_in(found.store, "s", "k", 1, StoredResponse(201), now=2.0)
            assert len(sent) == 1
            assert sent[0].startswith("WITH _oncepay_w0 AS (INSERT INTO items")
        assert [name for name, _ in await items(db)] == ["a", "b"]
        record = await store.get("s", "k")
        assert record is not None
        assert record.fence == 1
    finally:
        await store.aclose()


# Found in a review of the change: a pending write was kept with the SQLAlchemy transaction
# current when raw() was first called, and dropped unsent when SQLAlchemy began its own over
# the same server transaction (a connection used raw first, engine.connect()); text the
# joining cannot cut safely; rows of another width than the statement's.


async def test_an_insert_before_autobegin_commits_with_the_connection(db: Database) -> None:
    async with db.engine.connect() as conn:  # commit-as-you-go: nothing begun yet
        found = await raw(conn)  # begins on the server (asyncpg), before SQLAlchemy does
        await found.run(ITEM, "a", 1)
        # SQLAlchemy autobegins (a new transaction object, the same server transaction): the
        # pending insert belongs to the server's transaction, so it is sent, not dropped.
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


@pytest.mark.parametrize(
    "opaque",
    [
        "INSERT INTO items (id, n) VALUES ($1, $2);",  # would close the WITH query early
        "INSERT INTO items (id, n) VALUES ($1, $2) -- a note",  # would swallow its parenthesis
        "INSERT INTO items (id, n) VALUES ($1, $2 + length(E'\\x29'))",  # an escape string
        # a dollar-quoted string: its "$1" would be renumbered as a parameter
        "INSERT INTO items (id, n) VALUES ($1, $2 + length($q$ $1$q$) - 3)",
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


async def test_a_recursive_query_goes_after_the_writes(db: Database, sent: list[str]) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        sent.clear()
        recursive = Sql("WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r")
        assert (await found.rows(recursive))[0][0] == 1
        assert len(sent) == 2  # the insert alone first: RECURSIVE cannot follow other queries
        assert sent[1] == "WITH RECURSIVE r(n) AS (SELECT 1) SELECT n FROM r"
        await found.run(ITEM, "b", 2)  # and what is pending after it still goes
    assert [name for name, _ in await items(db)] == ["a", "b"]


SET_N = Sql("UPDATE items SET n = $2 WHERE id = $1")
SET_N_RETURNING = Sql("UPDATE items SET n = $2 WHERE id = $1 RETURNING n")


async def test_an_update_whose_outcome_is_known_travels_with_the_next_statement(
    db: Database, sent: list[str]
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(ITEM, "b", 1)
        await found.flush()
        sent.clear()
        await found.update(SET_N, "a", 5)
        await found.run(OTHER_ONE)
        assert sent == []  # nothing sent yet
        assert (await found.rows(Sql("SELECT $1::int"), 7))[0][0] == 7
        assert sent == [
            "WITH _oncepay_w0 AS (UPDATE items SET n = $3 WHERE id = $2), _oncepay_w1 AS "
            "(INSERT INTO other (n) VALUES (1)) SELECT $1::int"
        ]
        # A second update of the table waits for none: the first goes on its own, first (one
        # statement may not change a row twice).
        await found.update(SET_N, "a", 6)
        await found.update(SET_N, "b", 9)
        assert len(sent) == 2
        assert sent[1].startswith("WITH _oncepay_w0 AS (UPDATE items")
        # A statement that reads the table sees them.
        assert (await found.rows(Sql("SELECT sum(n) FROM items")))[0][0] == 15
    assert await items(db) == [("a", 6), ("b", 9)]


async def test_an_update_whose_answer_is_needed_is_sent_at_once(
    db: Database, sent: list[str]
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        sent.clear()
        await found.update(SET_N_RETURNING, "a", 3)  # RETURNING: its rows would be lost
        assert len(sent) == 2  # the pending insert, then the update, on its own
        await found.update(Sql("UPDATE items SET n = $2 WHERE id = $1 -- a note"), "a", 4)
        assert len(sent) == 3
    assert await items(db) == [("a", 4)]


async def test_more_rows_of_a_pending_insert_join_it_in_order(
    db: Database, sent: list[str]
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.flush()
        sent.clear()
        await found.run(NOTE, "a", "first")
        await found.run(OTHER_ONE)
        await found.many(NOTE, [("a", "second"), ("a", "third")])
        await found.run(NOTE, "a", "fourth")
        assert sent == []  # one insert of notes, its rows in the order they came
        await found.flush()
        assert len(sent) == 1
        assert sent[0].startswith(
            "WITH _oncepay_w0 AS (INSERT INTO notes (item, body) VALUES ($1, 'noted: ' || $2), "
            "($3, 'noted: ' || $4), ($5, 'noted: ' || $6), ($7, 'noted: ' || $8)), _oncepay_w1"
        )
        # Another statement into the same table does not join: the pending rows go first.
        await found.run(Sql("INSERT INTO notes (body, item) VALUES ($1, $2)"), "fifth", "a")
        await found.run(NOTE, "a", "sixth")
        assert len(sent) == 2
    async with read(db) as conn:
        notes = (await conn.execute(text("SELECT body FROM notes ORDER BY seq"))).scalars().all()
    assert notes == [
        "noted: first",
        "noted: second",
        "noted: third",
        "noted: fourth",
        "fifth",
        "noted: sixth",
    ]


# Found in a review of b6de9c8: a row with a subquery of its own table joined a pending insert
# and no longer saw the rows before it; a dollar-quoted string's "$1" was renumbered.


async def test_rows_that_read_their_own_table_do_not_join_it(db: Database) -> None:
    counted = Sql("INSERT INTO notes (item, body) VALUES ($1, (SELECT count(*) FROM notes)::text)")
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.flush()
        await found.run(counted, "a")
        await found.run(counted, "a")  # sees the first, as it would sent one after the other
        await found.many(counted, [("a",)])
    async with read(db) as conn:
        notes = (await conn.execute(text("SELECT body FROM notes ORDER BY seq"))).scalars().all()
    assert notes == ["0", "1", "2"]


async def test_an_update_with_a_dollar_quoted_string_is_sent_as_it_is(
    db: Database, sent: list[str]
) -> None:
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(NOTE, "a", "x")
        await found.flush()
        sent.clear()
        await found.update(Sql("UPDATE notes SET body = $q$cost: $1$q$ WHERE item = $1"), "a")
        assert sent == ["UPDATE notes SET body = $q$cost: $1$q$ WHERE item = $1"]
        assert (await found.rows(Sql("SELECT $1::int"), 7))[0][0] == 7
    async with read(db) as conn:
        notes = (await conn.execute(text("SELECT body FROM notes"))).scalars().all()
    assert notes == ["cost: $1"]


async def test_a_row_updated_twice_is_one_update_that_waits(db: Database, sent: list[str]) -> None:
    """``update_row``: a second update of a row whose first still waits merges into it (one
    statement may not change a row twice), the later value of a column winning; another row,
    or the same row after the first went, is an update of its own."""
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(ITEM, "b", 1)
        await found.flush()
        sent.clear()
        await found.update_row("items", "id", "a", {"n": 5})
        await found.run(NOTE, "a", "between")
        await found.update_row("items", "id", "a", {"n": 6})
        await found.run(OTHER_ONE)
        assert sent == []
        await found.flush()
        assert len(sent) == 1
        assert sent[0].startswith(
            "WITH _oncepay_w0 AS (UPDATE items SET n = $2 WHERE id = $1), _oncepay_w1 AS "
            "(INSERT INTO notes"
        )
        await found.update_row("items", "id", "a", {"n": 7})  # after the flush: its own
        await found.update_row("items", "id", "b", {"n": 8})  # another row: the first goes
        assert len(sent) == 2
        assert (await found.rows(Sql("SELECT sum(n) FROM items")))[0][0] == 15
    assert await items(db) == [("a", 7), ("b", 8)]
    with pytest.raises(ValueError, match="not a plain column"):
        async with write(db) as conn:
            await (await raw(conn)).update_row("items", "id", "a", {"n = 0, id": 1})


async def test_a_rolled_back_update_is_not_merged_into_the_next_transaction(
    db: Database,
) -> None:
    assert db.schema is not None
    single = Database.from_url(f"{db.url}?schema={db.schema}")
    try:
        async with write(single) as conn:
            await (await raw(conn)).run(ITEM, "a", 1)

        async def failing() -> None:
            async with write(single) as conn:
                await (await raw(conn)).update_row("items", "id", "a", {"n": 99})
                raise RuntimeError("the caller fails")

        with pytest.raises(RuntimeError):
            await failing()
        async with write(single) as conn:
            await (await raw(conn)).update_row("items", "id", "a", {"n": 2})
    finally:
        await single.aclose()
    assert await items(db) == [("a", 2)]


async def test_a_merge_never_reaches_past_what_sent_the_first_update(db: Database) -> None:
    """A guard (review of 8289179): whatever sends the pending writes between two updates of
    a row — the row limit, a plain update of it, SQLAlchemy's statement, another row's update
    — leaves the second an update of its own, after; the merged columns all land."""
    async with write(db) as conn:
        await conn.execute(text("ALTER TABLE items ADD COLUMN m INTEGER NOT NULL DEFAULT 0"))
    async with write(db) as conn:
        found = await raw(conn)
        await found.run(ITEM, "a", 1)
        await found.run(ITEM, "b", 1)
        await found.flush()
        await found.update_row("items", "id", "a", {"n": 2, "m": 1})
        await found.many(NOTE, [("a", str(i)) for i in range(64)])  # past the row limit
        await found.update_row("items", "id", "a", {"n": 3})
        await found.update_row("items", "id", "b", {"m": 5})
        await found.update(SET_N, "b", 7)
        await found.update_row("items", "id", "b", {"n": 8})
        await found.update_row("items", "id", "a", {"m": 9})
        await conn.execute(text("SELECT 1"))
        await found.update_row("items", "id", "a", {"n": 10})
        await found.update_row("items", "id", "a", {"m": 11})
        await found.update_row("items", "id", "b", {"m": 12})
        await found.update_row("items", "id", "b", {"n": 13})
        rows = await found.rows(Sql("SELECT id, n, m FROM items ORDER BY id"))
        assert [tuple(row) for row in rows] == [("a", 10, 11), ("b", 13, 12)]
        assert (await found.rows(Sql("SELECT count(*) FROM notes")))[0][0] == 64
