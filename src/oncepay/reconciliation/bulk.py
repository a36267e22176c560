"""Bulk writes for settlement, in each database's own terms, inside the caller's transaction.

SQLAlchemy's per-row parameter processing costs more than the write itself when a run posts
a million lines (bench/reconciliation/RESULTS.md), so the rows go to the driver as tuples
(SQLite's ``executemany``, PostgreSQL's ``COPY``), and the settlement's rows are built by the
database itself from the batch's staged lines (:func:`settle_sqlite`, :func:`settle_postgres`).

Posting once: on PostgreSQL the guard insert is ``ON CONFLICT DO NOTHING``: a concurrent
transaction inserting the same reference makes this one wait for it, then skip the row. On
SQLite the write transaction (``BEGIN IMMEDIATE``) already excludes every other writer, so
dropping the staged lines whose guard is there and posting the others is race-free."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.storage.db import Database
from oncepay.storage.raw import raw

__all__ = [
    "GUARD",
    "SETTLING",
    "STAGED",
    "insert",
    "settle_postgres",
    "settle_sqlite",
    "settled_references",
    "settlements_of",
    "stage_sqlite",
]

Row = tuple[Any, ...]


async def insert(
    conn: AsyncConnection, db: Database, table: str, columns: Sequence[str], rows: list[Row]
) -> None:
    if not rows:
        return
    if db.is_sqlite:
        marks = ", ".join("?" * len(columns))
        await conn.exec_driver_sql(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows
        )
        return
    driver = await _asyncpg(conn)
    await driver.copy_records_to_table(
        table, records=rows, columns=list(columns), schema_name=db.schema
    )


async def settled_references(
    conn: AsyncConnection, db: Database, references: Sequence[str]
) -> set[str]:
    """Those of ``references`` whose guard is written (committed, or by this transaction), in
    the driver's terms: SQLAlchemy's expanding ``IN`` compiles a parameter per value."""
    return set(await _guards(conn, db, references, ()))


# What a guard keeps of the settlement it posted, as :func:`settlements_of` gives it: a line
# with the same (type, amount, payout_id, settled_at) is that settlement read again.
GUARD = ("type", "amount", "payout_id", "settled_at", "transaction_id")


async def settlements_of(
    conn: AsyncConnection, db: Database, references: Sequence[str]
) -> dict[str, Row]:
    """The guards of those of ``references`` that have one (written before, or by this
    transaction): reference -> its :data:`GUARD` columns."""
    return await _guards(conn, db, references, GUARD)


async def _guards(
    conn: AsyncConnection, db: Database, references: Sequence[str], columns: Sequence[str]
) -> dict[str, Row]:
    if not references:
        return {}
    selected = ", ".join(("reference", *columns))
    if db.is_sqlite:
        found: dict[str, Row] = {}
        for start in range(0, len(references), _REFERENCES):
            part = tuple(references[start : start + _REFERENCES])
            rows = await conn.exec_driver_sql(
                f"SELECT {selected} FROM reconciliation_settlements "
                f"WHERE reference IN ({', '.join('?' * len(part))})",
                part,
            )
            found.update((row[0], tuple(row[1:])) for row in rows)
        return found
    driver = await _asyncpg(conn)
    rows = await driver.fetch(
        f"SELECT {selected} FROM reconciliation_settlements WHERE reference = ANY($1::text[])",
        list(references),
    )
    return {row[0]: tuple(row)[1:] for row in rows}


_REFERENCES = 5000  # bound variables per SQLite query (SQLite allows 32,766)


async def _asyncpg(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, in the same transaction: begun on the server
    first when SQLAlchemy has sent nothing yet (its asyncpg adapter begins lazily, and a
    statement sent to the bare driver before that would commit on its own). Writes the raw
    layer deferred are sent first (storage/raw.py), so what goes to the driver comes after
    them, in the order it was written."""
    db = await raw(conn)
    await db.flush()
    return db.driver


# -- settling inside SQLite --------------------------------------------------------------------
#
# A batch's settled lines go to a TEMP table with one ``executemany``; every row the batch
# writes (guards, journals, entries, the payments' settlement columns, ``payment.settled``
# events) is then built by SQLite itself with ``INSERT … SELECT`` / ``UPDATE … FROM``: no
# Python tuple, no bound parameter and no statement per written row (a third of a line's cost
# before, bench/reconciliation/RESULTS.md). Temp tables are the connection's own (no other
# connection sees them) and transactional: a rolled-back batch leaves nothing there either.

STAGED = (
    "reference",
    "payment_id",
    "merchant_id",
    "refund_id",
    "type",
    "currency",
    "payout_id",
    "amount",
    "fee",
    "net",
    "settled_at",
    "at",  # settled_at as a POSIX time (the transaction's time when it cannot be read)
)
# The rows settle_sqlite and settle_postgres take: STAGED, then the line's journal id (its
# batch's head and the line's place in the rows, 8 hex digits), made with the row in Python:
# SQLite's printf() made it for the guard, the journal and each entry, ~0.3 µs a call on the
# connection's thread (5 a line) against ~0.1 µs once on the loop.
SETTLING = (*STAGED, "transaction_id")
_STAGE = "temp.oncepay_settling"
_CREATE_STAGE = (
    f"CREATE TABLE IF NOT EXISTS {_STAGE} (n INTEGER PRIMARY KEY, "
    "reference TEXT NOT NULL, payment_id TEXT NOT NULL, merchant_id TEXT NOT NULL, "
    "refund_id TEXT, type TEXT NOT NULL, currency TEXT NOT NULL, payout_id TEXT NOT NULL, "
    "amount INTEGER NOT NULL, fee INTEGER NOT NULL, net INTEGER NOT NULL, "
    "settled_at TEXT NOT NULL, at REAL NOT NULL, transaction_id TEXT NOT NULL)"
)
# A line's journal: entry k of 0, 1, 2 (zero amounts are left out), as in settlement.entries.
_ENTRY_AMOUNT = (
    "CASE k WHEN 0 THEN CASE WHEN type = 'capture' THEN amount - fee ELSE amount END "
    "WHEN 1 THEN fee "
    "ELSE CASE WHEN type = 'capture' THEN -amount ELSE -(amount + fee) END END"
)
_ENTRY_ACCOUNT = (
    "CASE k WHEN 0 THEN CASE WHEN type = 'capture' THEN :settled ELSE :receivable END "
    "WHEN 1 THEN :fees "
    "ELSE CASE WHEN type = 'capture' THEN :receivable ELSE :settled END END"
)
# ``payment_public`` of a payment row, written by SQLite. Identical bytes to Python's
# ``json.dumps(payment_public(row), separators=(",", ":"))`` for text in printable ASCII (the
# metadata is stored by ``json.dumps``, ASCII-only); the rows with any other character in
# their free text are rewritten from Python after (:func:`settle_sqlite`), so every event is.
_SNAPSHOT_JSON = (
    "json_object('id', p.id, 'object', 'payment', 'amount', p.amount, "
    "'currency', p.currency, 'status', p.status, 'capture_method', p.capture_method, "
    "'payment_method', p.payment_method, 'description', p.description, "
    "'metadata', json(p.metadata), "
    "'amount_capturable', CASE WHEN p.status = 'authorized' THEN p.amount ELSE 0 END, "
    "'amount_captured', p.amount_captured, 'amount_refunded', p.amount_refunded, "
    "'failure_code', p.failure_code, 'failure_message', p.failure_message, "
    "'outcome_unknown', json(CASE WHEN p.outcome_unknown THEN 'true' ELSE 'false' END), "
    "'acquirer', p.acquirer, 'created', CAST(p.created_at AS INTEGER), "
    "'amount_settled', p.amount_settled, 'amount_refund_settled', p.amount_refund_settled, "
    "'settlement_fee', p.settlement_fee, 'settled', CAST(p.settled_at AS INTEGER))"
)
# Free text outside printable ASCII (non-ASCII, control characters): JSON-escaped differently
# by SQLite and by Python's json.dumps (which escapes to \\uXXXX).
_NOT_PLAIN = " GLOB '*[^ -~]*'"


# The batch's statements, run by one statement: a TEMP trigger on a one-row command table
# (TEMP triggers may write the main database's tables). Inserting the command row runs them
# all inside one ``sqlite3_step``, during which the connection's thread does not hold the GIL:
# the thread needs the GIL only to start and to end the batch, so the loop's parsing and
# matching, which hold it nearly all the time, cannot keep it waiting between statements (a
# statement per call let the loop's frequent turns starve the thread of the GIL until the
# loop ran out of work: no overlap at all, bench/reconciliation/RESULTS.md).
_COMMAND = "temp.oncepay_settle_now"
_CREATE_COMMAND = (
    f"CREATE TABLE IF NOT EXISTS {_COMMAND} (acquirer TEXT NOT NULL, now REAL NOT NULL, "
    "evt TEXT NOT NULL, settled TEXT NOT NULL, fees TEXT NOT NULL, "
    "receivable TEXT NOT NULL)"
)
# A journal's entries k = 0, 1, 2: a table whose rowid is k, joined after the staged lines
# (CROSS JOIN keeps that order), so the entries come out in (n, k) order with no sort (a
# three-row subquery joined first made SQLite sort the batch's 15,000 entries: ~15 % of the
# statement).
_ENTRY_K = "temp.oncepay_entry_k"
_CREATE_ENTRY_K = f"CREATE TABLE IF NOT EXISTS {_ENTRY_K} (k INTEGER PRIMARY KEY)"
# The batch's payments (those of its lines not settled before), k their place by id counted from
# 1: the rowid SQLite gives in the emptied table, inserted in id order (GROUP BY's own order: a
# row_number() window over the groups cost a second sort, 1.7 against 0.9 µs a line). Every
# line names a payment that exists (the journals' foreign keys refuse the batch otherwise).
_PAYING = "temp.oncepay_paying"
_CREATE_PAYING = (
    f"CREATE TABLE IF NOT EXISTS {_PAYING} (k INTEGER PRIMARY KEY, payment_id TEXT NOT NULL, "
    "c INTEGER NOT NULL, r INTEGER NOT NULL, f INTEGER NOT NULL, at REAL NOT NULL)"
)
# A payment's event id: the batch's event head and its place k among the batch's payments.
_EVENT_ID = "printf('%s%08x', ?, t.k - 1)"
_SETTLE_STATEMENTS = (
    # lines whose guard is there already (settled before): not posted again
    "DELETE FROM oncepay_settling WHERE EXISTS (SELECT 1 FROM reconciliation_settlements s "
    "WHERE s.reference = oncepay_settling.reference)",
    "INSERT INTO reconciliation_settlements (reference, acquirer, payment_id, type, "
    "currency, payout_id, amount, fee, net, settled_at, transaction_id, created_at) "
    "SELECT reference, NEW.acquirer, payment_id, type, currency, payout_id, amount, fee, net, "
    "settled_at, transaction_id, NEW.now FROM oncepay_settling ORDER BY n",
    "INSERT INTO ledger_transactions (id, merchant_id, payment_id, refund_id, kind, "
    "created_at) SELECT transaction_id, merchant_id, payment_id, refund_id, 'settlement', NEW.now "
    "FROM oncepay_settling ORDER BY n",
    "INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, "
    "currency, amount) SELECT transaction_id, merchant_id, payment_id, "
    f"{_ENTRY_ACCOUNT}, currency, {_ENTRY_AMOUNT} FROM oncepay_settling CROSS JOIN oncepay_entry_k "
    f"WHERE {_ENTRY_AMOUNT} != 0 ORDER BY n, k",
    # the batch's payments, numbered by id (their events' ids), with what settles on each
    "DELETE FROM oncepay_paying",
    "INSERT INTO oncepay_paying (payment_id, c, r, f, at) "
    "SELECT payment_id, sum(CASE WHEN type = 'capture' THEN amount ELSE 0 END), "
    "sum(CASE WHEN type = 'capture' THEN 0 ELSE amount END), sum(fee), max(at) "
    "FROM oncepay_settling GROUP BY payment_id ORDER BY payment_id",
    "UPDATE payments SET amount_settled = amount_settled + s.c, "
    "amount_refund_settled = amount_refund_settled + s.r, "
    "settlement_fee = settlement_fee + s.f, "
    "settled_at = max(coalesce(payments.settled_at, 0), s.at), updated_at = NEW.now "
    "FROM oncepay_paying AS s WHERE payments.id = s.payment_id",
    # in k order, no window nor sort over the snapshots (a row_number() over the payments
    # themselves sorted the batch's rows, JSON included: ~1.5 µs a line of SQLite's time)
    "INSERT INTO events (id, merchant_id, type, object_id, data, created_at) "
    f"SELECT {_EVENT_ID.replace('?', 'NEW.evt')}, p.merchant_id, "  # from 00000000
    f"'payment.settled', p.id, {_SNAPSHOT_JSON}, NEW.now "
    "FROM oncepay_paying AS t CROSS JOIN payments AS p ON p.id = t.payment_id ORDER BY t.k",
)
_CREATE_TRIGGER = (
    (
        "CREATE TRIGGER IF NOT EXISTS temp.oncepay_settle AFTER INSERT ON oncepay_settle_now "
        "BEGIN " + "; ".join(_SETTLE_STATEMENTS) + "; END"
    )
    .replace(":settled", "NEW.settled")
    .replace(":fees", "NEW.fees")
    .replace(":receivable", "NEW.receivable")
)
# The longest the loop blocks for the connection's thread to take the batch: the thread is the
# connection's own and idle (the loop holds the connection), so it starts at once.
_HANDOFF = 5.0


async def settle_sqlite(
    conn: AsyncConnection,
    rows: list[Row] | None,
    *,
    acquirer: str,
    now: float,
    event_head: str,
    accounts: tuple[str, str, str],
    snapshot: Sequence[str],
    rewrite: Callable[[Row], str],
) -> tuple[int, int, list[tuple[str, str, str]]]:
    """Post ``rows`` (:data:`SETTLING` columns, one reference once) whose guard is not there
    yet, in the caller's write transaction; ``None``: the rows :func:`stage_sqlite` staged on
    this connection before the transaction began. Transaction ids are the rows' own; event ids
    ``event_head`` and the payment's place among the batch's payments by id. ``accounts``:
    settled funds, fees, receivable. ``rewrite(row)`` gives an event's JSON from the
    ``snapshot`` columns of its payment (for the payments whose text SQLite would escape
    differently). Returns the lines posted, the payments settled and, for the events of
    merchants with an enabled webhook endpoint, (event id, merchant id, payment id) in event
    order.

    The batch's writes run on the connection's own thread (:mod:`oncepay._drivers.sqlite`) as
    one statement (:data:`_CREATE_TRIGGER`), where SQLite works without the GIL: the pipeline
    parses and matches the next batch on the loop meanwhile, so the two cores of a machine
    share a run. The loop hands the statement over and waits until the thread has it (a
    thread asking for the GIL while the loop keeps turning would wait for the loop to run out
    of work), and does not touch the connection until it is done, even when the caller is
    cancelled (the transaction is rolled back after the batch's writes, never between two of
    them)."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    db: sqlite3.Connection = driver._conn
    if not db.in_transaction:
        raise RuntimeError("settling needs the caller's write transaction")
    if rows is not None:
        if not rows:
            return 0, 0, []
        _stage(db, rows)
    command = (acquirer, now, event_head, *accounts)
    taken = threading.Event()
    work = driver._thread.submit(_settle_in_sqlite, db, command, taken)
    # The GIL is free while this waits: the thread takes it at once. Only a hand-over, not a
    # condition: whatever happens, the thread's work is awaited below before anything else
    # touches the connection.
    taken.wait(_HANDOFF)
    done = asyncio.wrap_future(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            if done.done():
                raise
            cancelled = True  # wait for the thread to finish with the connection
            continue
        if cancelled:
            raise asyncio.CancelledError
        break
    return _settled(db, event_head, snapshot, rewrite)


async def stage_sqlite(conn: AsyncConnection, rows: list[Row]) -> None:
    """Stage ``rows`` for :func:`settle_sqlite` on ``conn`` before its write transaction
    begins: TEMP tables are the connection's own, so a batch is staged while another
    connection holds the write lock (the pipeline stages the next batch while SQLite writes
    the one before). A transaction of the TEMP database alone: it takes no lock on the
    database file."""
    driver: Any = (await conn.get_raw_connection()).driver_connection
    db: sqlite3.Connection = driver._conn
    if db.in_transaction:
        raise RuntimeError("staging ahead must come before the write transaction")
    db.execute("BEGIN")
    try:
        _stage(db, rows)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _stage(db: sqlite3.Connection, rows: list[Row]) -> None:
    """The batch's lines into the TEMP table, on the loop's thread: binding 5,000 rows of
    parameters needs the GIL for each row (``executemany`` lets it go around each row's step),
    so on the connection's thread it queued behind the loop's parsing and matching for every
    row: measured at 100k lines, a third of that thread's time waiting for the GIL. Here it
    is a few milliseconds of the loop's, and the thread's statement holds the GIL once."""
    db.execute(_CREATE_STAGE)
    db.execute(_CREATE_ENTRY_K)
    db.execute(_CREATE_PAYING)
    db.execute(f"INSERT OR IGNORE INTO {_ENTRY_K} VALUES (0), (1), (2)")
    db.execute(_CREATE_COMMAND)
    db.execute(_CREATE_TRIGGER)
    db.execute(f"DELETE FROM {_STAGE}")
    db.execute(f"DELETE FROM {_COMMAND}")
    # n is the rowid SQLite gives: 1, 2, … into the emptied table (its documented rule), in the
    # order the rows are given, so the rows go in as they are, with no (n, *row) tuple built
    # per row: _STAGE_AT_ONCE rows a statement (a multi-row VALUES), the rest one a step.
    whole = len(rows) - len(rows) % _STAGE_AT_ONCE
    flat = itertools.chain.from_iterable
    for start in range(0, whole, _STAGE_AT_ONCE):
        db.execute(_STAGE_ROWS, tuple(flat(rows[start : start + _STAGE_AT_ONCE])))
    db.executemany(_STAGE_ROW, rows[whole:])


# Staged rows per INSERT: one statement's step and the module's per-row work shared by 76 rows
# (``executemany`` binds and steps a row at a time: 2.9 against 2.2 µs a row measured, 5,000
# rows); 76 x 13 = 988 parameters, under the 999 of SQLite's older builds.
_STAGE_AT_ONCE = 76
_STAGED_VALUES = f"({', '.join('?' * len(SETTLING))})"
_STAGE_ROW = f"INSERT INTO {_STAGE} ({', '.join(SETTLING)}) VALUES {_STAGED_VALUES}"
_STAGE_ROWS = _STAGE_ROW.replace(_STAGED_VALUES, ", ".join([_STAGED_VALUES] * _STAGE_AT_ONCE))


def _settle_in_sqlite(
    db: sqlite3.Connection, command: tuple[Any, ...], taken: threading.Event
) -> None:
    """On the connection's thread: the batch's writes, in one statement."""
    taken.set()
    if not db.in_transaction:
        raise RuntimeError("settling needs the caller's write transaction")
    db.execute(f"INSERT INTO {_COMMAND} VALUES (?, ?, ?, ?, ?, ?)", command)


def _settled(
    db: sqlite3.Connection, event_head: str, snapshot: Sequence[str], rewrite: Callable[[Row], str]
) -> tuple[int, int, list[tuple[str, str, str]]]:
    """After the batch's writes, on the loop: what they posted; the events SQLite's JSON would
    show differently rewritten; the events whose merchant has an enabled endpoint."""
    fresh = int(db.execute(f"SELECT count(*) FROM {_STAGE}").fetchone()[0])
    db.execute(f"DELETE FROM {_STAGE}")
    if not fresh:
        return 0, 0, []
    between = (event_head, f"{event_head}~")
    # The batch's payments are still in _PAYING (emptied by the next batch's statement): one
    # event each, its id the event head and k - 1, so the events' count and the odd payments
    # are read from it, with no scan of the events' id index nor a look-up of each event.
    events = int(db.execute(f"SELECT count(*) FROM {_PAYING}").fetchone()[0])
    odd = db.execute(
        f"SELECT {_EVENT_ID}, "
        + ", ".join(f"p.{column}" for column in snapshot)
        + f" FROM {_PAYING} AS t JOIN payments AS p ON p.id = t.payment_id "
        "WHERE p.description"
        + _NOT_PLAIN
        + " OR p.failure_message"
        + _NOT_PLAIN
        + " OR p.metadata"
        + _NOT_PLAIN,
        (event_head,),
    ).fetchall()
    if odd:
        db.executemany(
            "UPDATE events SET data = ? WHERE id = ?", [(rewrite(row[1:]), row[0]) for row in odd]
        )
    told = db.execute(
        "SELECT id, merchant_id, object_id FROM events WHERE id > ? AND id < ? "
        "AND merchant_id IN (SELECT merchant_id FROM webhook_endpoints "
        "WHERE NOT disabled AND NOT deleted) ORDER BY id",
        between,
    ).fetchall()
    return fresh, events, [(str(a), str(b), str(c)) for a, b, c in told]


# The same on PostgreSQL, in one statement: the staged lines travel as arrays (``unnest``),
# the guard insert keeps only the references no transaction has settled (``ON CONFLICT DO
# NOTHING``: a concurrent run's rows are waited for, then skipped), and the journals, entries
# and the payments' settlement columns are written from its ``RETURNING``; the statement
# returns the payments as they now are (their events are written by the caller).
_PG_SETTLE = """
WITH s AS (
  SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                       $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[],
                       $12::float8[])
    WITH ORDINALITY AS s(reference, payment_id, merchant_id, refund_id, type, currency,
                         payout_id, amount, fee, net, settled_at, at, n)
), g AS (
  INSERT INTO reconciliation_settlements (reference, acquirer, payment_id, type, currency,
      payout_id, amount, fee, net, settled_at, transaction_id, created_at)
  SELECT reference, $14, payment_id, type, currency, payout_id, amount, fee, net, settled_at,
         $13 || lpad(to_hex(n - 1), 8, '0'), $15
  FROM s ORDER BY n
  ON CONFLICT (reference) DO NOTHING
  RETURNING reference, transaction_id
), f AS (
  SELECT s.*, g.transaction_id AS txn FROM s JOIN g USING (reference)
), t AS (
  INSERT INTO ledger_transactions (id, merchant_id, payment_id, refund_id, kind, created_at)
  SELECT txn, merchant_id, payment_id, refund_id, 'settlement', $15 FROM f ORDER BY n
), e AS (
  INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, currency, amount)
  SELECT txn, merchant_id, payment_id, account, currency, amount FROM (
    SELECT n, k, txn, merchant_id, payment_id, currency,
      CASE k WHEN 0 THEN CASE WHEN type = 'capture' THEN $16 ELSE $18 END
             WHEN 1 THEN $17
             ELSE CASE WHEN type = 'capture' THEN $18 ELSE $16 END END AS account,
      CASE k WHEN 0 THEN CASE WHEN type = 'capture' THEN amount - fee ELSE amount END
             WHEN 1 THEN fee
             ELSE CASE WHEN type = 'capture' THEN -amount ELSE -(amount + fee) END END AS amount
    FROM f CROSS JOIN (VALUES (0), (1), (2)) AS k(k)
  ) AS x WHERE amount <> 0 ORDER BY n, k
), u AS (
  UPDATE payments AS p SET amount_settled = p.amount_settled + x.c,
    amount_refund_settled = p.amount_refund_settled + x.r,
    settlement_fee = p.settlement_fee + x.f,
    settled_at = GREATEST(p.settled_at, x.at), updated_at = $15
  FROM (SELECT payment_id, sum(CASE WHEN type = 'capture' THEN amount ELSE 0 END) AS c,
               sum(CASE WHEN type = 'capture' THEN 0 ELSE amount END) AS r,
               sum(fee) AS f, max(at) AS at
        FROM f GROUP BY payment_id) AS x
  WHERE p.id = x.payment_id
  RETURNING {returning}
)
SELECT (SELECT count(*) FROM f) AS lines, u.* FROM (SELECT 1) AS one LEFT JOIN u ON true
"""


async def settle_postgres(
    conn: AsyncConnection,
    rows: list[Row],
    *,
    acquirer: str,
    now: float,
    txn_head: str,
    accounts: tuple[str, str, str],
    returning: Sequence[str],
) -> tuple[int, list[Row]]:
    """Post ``rows`` (:data:`SETTLING` columns, one reference once) whose guard no transaction
    wrote, in the caller's transaction, in one statement; transaction ids ``txn_head`` and the
    line's place in ``rows``, as the rows' own. Returns
    the lines posted and the ``returning`` columns of the payments settled, by id."""
    if not rows:
        return 0, []
    statement = _PG_SETTLE.format(returning=", ".join(f"p.{column}" for column in returning))
    driver = await _asyncpg(conn)
    # The planner, guessing the CTEs' joins at 25 times their rows, JIT-compiles the
    # statement at every batch: ~40 ms of the server's ~400 for 5,000 lines (EXPLAIN ANALYZE,
    # bench/reconciliation/RESULTS.md) for a plan that runs once. Off for this transaction.
    await driver.execute("SET LOCAL jit = off")
    columns = list(zip(*rows, strict=True))[: len(STAGED)]  # the ids: made again from txn_head
    found = await driver.fetch(
        statement,
        *(list(column) for column in columns),
        txn_head,
        acquirer,
        now,
        *accounts,
    )
    lines = int(found[0][0])
    settled = sorted(tuple(record)[1:] for record in found if record[1] is not None)
    return lines, settled
