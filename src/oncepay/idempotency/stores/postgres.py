"""``postgresql://…``: the system of record, one round trip per primitive.

* ``claim`` is one call of a plpgsql function, created with the table. It first reads without a
  lock, which answers a replay, a 409 or a 422; only a claim that must write inserts or locks.
* ``complete`` and ``release`` are one fenced ``UPDATE`` each that also sends ``pg_notify`` on
  the store's channel when a waiter marked the record; ``checkpoint`` is one fenced
  ``UPDATE``; ``purge_expired`` one bounded ``DELETE``. Every statement is prepared once per
  connection and stays prepared.
* ``watch`` listens on one shared connection per store, then marks the record as waited for
  (``waited``, while it executes); a notification wakes the waiters of that one record, so wait
  mode is woken by the store, not by polling.

Why only a waited-for record notifies: a transaction that sent ``NOTIFY`` takes one lock for the
whole database at commit and holds it through its commit's WAL flush, so every notifying commit
waits for the one before it (no group commit of WAL) and the lock's queue costs CPU. On this
project's machine the store's completing update at 32 connections ran 6,000 a second without
``pg_notify`` and 3,150 with it, at 1.55x the server CPU (bench/drivers/notify.py). Waiting is
rare (a retry that arrives while its first attempt still runs, in wait mode), completing is
every request, so the waiter pays: one ``UPDATE`` of the record it waits for. The order of the
two writes on that one row decides, whatever the interleaving: a mark committed before the
completion locks the row is seen by the completion (READ COMMITTED re-reads the row it waited
for), so it notifies; a mark that comes after the completion finds the record no longer
executing and changes nothing, and the waiter's next read (after the mark) sees the completion.

The table, index and function are created on first use, under a transaction-level advisory lock
so that several processes starting at once do not trip over each other's DDL. ``table`` may be
schema-qualified (``myschema.idempotency``); every process using a table must spell it the same
way, since the notification channel is derived from that spelling.

The driver (asyncpg, with our small pool, ``oncepay._drivers.pgpool``) is confined to
:class:`_Asyncpg`; the store speaks SQL with ``:name`` parameters and could run on another
driver by replacing that class. asyncpg costs about half the client CPU of psycopg 3 per call
(bench/drivers/RESULTS.md).
``url`` is a ``postgresql://`` URL, as asyncpg reads it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from oncepay._drivers.pgpool import Connection, Pool
from oncepay.errors import ConfigurationError, StoreUnavailable
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, StoredResponse
from oncepay.idempotency.stores._sql import (
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
from oncepay.idempotency.stores.base import DEFAULT_PURGE_BATCH, Watch

__all__ = ["DEFAULT_TABLE", "PostgresStore"]

logger = logging.getLogger(__name__)

DEFAULT_TABLE = "oncepay_idempotency"
# Every primitive is one short statement, so a handful of connections serves thousands of
# requests a second; more would only add server processes.
DEFAULT_MIN_SIZE = 1
DEFAULT_MAX_SIZE = 10
# How long a request waits for a connection (or the first connect) before the store reports
# itself unavailable: enough to ride out a pool refill after a network blip, short enough that
# the client gets its 503 well before its own timeout (typically 10-30 s).
DEFAULT_TIMEOUT = 5.0
# PostgreSQL silently truncates longer identifiers (NAMEDATALEN - 1 bytes).
MAX_IDENTIFIER = 63
# Serialises schema creation across processes; any fixed number will do, this is "oncepay".
SCHEMA_LOCK = 0x6F6E6365706179

_DDL = """
SELECT pg_advisory_xact_lock({lock});
DO {create_table};
CREATE OR REPLACE FUNCTION {claim_fn}(
    p_scope text, p_key text, p_fingerprint text,
    p_now double precision, p_lease double precision, p_ttl double precision,
    OUT outcome text, OUT rec {table})
LANGUAGE plpgsql AS {claim_body};
"""

# Created only when missing: CREATE INDEX IF NOT EXISTS would still take a share lock on a live
# table at every start. fillfactor leaves room on each page so that completion, which rewrites
# the row with its response, can stay a heap-only update.
_CREATE_TABLE = """
BEGIN
    IF to_regclass({table_name}) IS NULL THEN
        CREATE TABLE {table} (
            scope            text             NOT NULL,
            idempotency_key  text             NOT NULL,
            fingerprint      text             NOT NULL,
            state            text             NOT NULL
                CHECK (state IN ('executing', 'completed', 'released')),
            fence            bigint           NOT NULL,
            created_at       double precision NOT NULL,
            lease_expires_at double precision NOT NULL,
            expires_at       double precision NOT NULL,
            recovery_point   text,
            response_status  integer,
            response_headers text,
            response_body    bytea,
            waited           boolean          NOT NULL DEFAULT false,
            PRIMARY KEY (scope, idempotency_key)
        ) WITH (fillfactor = 80);
        CREATE INDEX {index} ON {table} (expires_at);
    ELSIF NOT EXISTS (
        SELECT FROM pg_attribute
        WHERE attrelid = to_regclass({table_name}) AND attname = 'waited' AND NOT attisdropped
    ) THEN
        -- A table an earlier version made, without the column: a constant default, so
        -- PostgreSQL 11+ adds it without rewriting the table.
        ALTER TABLE {table} ADD COLUMN waited boolean NOT NULL DEFAULT false;
    END IF;
END
"""

_CLAIM_BODY = """
DECLARE
    verdict text;
    locked boolean := false;
BEGIN
    -- A first look without a lock: a live record (a replay, a 409, a 422) is answered by this
    -- read alone, so the commonest retry never writes or waits.
    SELECT * INTO rec FROM {table} AS t WHERE t.scope = p_scope AND t.idempotency_key = p_key;
    LOOP
        -- The claim rule of stores/base.py (resolve_claim), on the row as last read.
        verdict := CASE
            WHEN rec.scope IS NULL OR p_now >= rec.expires_at OR rec.state = 'released'
                THEN 'create'
            WHEN rec.fingerprint <> p_fingerprint OR rec.state = 'completed'
                 OR p_now < rec.lease_expires_at
                THEN 'existing'
            ELSE 'take_over'
        END;
        IF verdict = 'existing' THEN
            outcome := 'existing';
            RETURN;
        END IF;
        EXIT WHEN locked;
        -- Each statement here sees the rows committed when it starts (READ COMMITTED), so no
        -- single statement could both insert-if-absent and decide on a row a concurrent claim
        -- just committed. Hence: try the insert; if the key exists, lock its latest version
        -- (FOR UPDATE waits for a concurrent writer, then re-reads) and decide again on that.
        INSERT INTO {table} AS t (scope, idempotency_key, fingerprint, state, fence,
                                  created_at, lease_expires_at, expires_at)
        VALUES (p_scope, p_key, p_fingerprint, 'executing',
                greatest(1, floor(p_now * 1000)::bigint),
                p_now, p_now + p_lease, p_now + p_ttl)
        ON CONFLICT (scope, idempotency_key) DO NOTHING
        RETURNING * INTO rec;
        IF FOUND THEN
            outcome := 'created';
            RETURN;
        END IF;
        SELECT * INTO rec FROM {table} AS t
        WHERE t.scope = p_scope AND t.idempotency_key = p_key
        FOR UPDATE;
        locked := FOUND;  -- purged in between: go round and insert again
    END LOOP;
    IF verdict = 'create' THEN  -- expired or released: a new record under the same key
        -- 'expired': the key came back after its record expired (a late retry; Claim.late)
        outcome := CASE WHEN rec.state = 'released' THEN 'created' ELSE 'expired' END;
        UPDATE {table} AS t
        SET fingerprint = p_fingerprint, state = 'executing',
            fence = greatest(rec.fence + 1, floor(p_now * 1000)::bigint),
            created_at = p_now, lease_expires_at = p_now + p_lease, expires_at = p_now + p_ttl,
            recovery_point = NULL,
            response_status = NULL, response_headers = NULL, response_body = NULL
        WHERE t.scope = p_scope AND t.idempotency_key = p_key
        RETURNING * INTO rec;
    ELSE  -- the holder's lease ran out: same record, next token, fresh lease
        UPDATE {table} AS t
        SET fence = rec.fence + 1, lease_expires_at = p_now + p_lease
        WHERE t.scope = p_scope AND t.idempotency_key = p_key
        RETURNING * INTO rec;
        outcome := 'taken_over';
    END IF;
END
"""

_KEY = "scope = :scope AND idempotency_key = :key"
_FENCED = f"{_KEY} AND fence = :fence AND state = 'executing'"
# The payload is stores._sql.topic(scope, key), computed by the server; only a record a waiter
# marked notifies (the module's docstring says why). ``done`` returns (scope, idempotency_key,
# waited) of the rows a statement changed; a row that does not notify still returns NULL.
NOTIFY_WAITERS = (
    "SELECT CASE WHEN waited THEN pg_notify({channel}, md5(convert_to(scope, 'UTF8') "
    "|| decode('00', 'hex') || convert_to(idempotency_key, 'UTF8'))) END FROM done"
)


@dataclass(frozen=True, slots=True)
class _Names:
    """The database objects of one store, all derived from its ``table`` option, quoted."""

    table: str
    table_literal: str  # the quoted name as a string literal, for to_regclass()
    claim_fn: str
    index: str
    channel: str  # a plain identifier: "oncepay_" and hex digits

    @classmethod
    def derive(cls, table: str) -> _Names:
        schema, _, name = table.rpartition(".")
        for part in (schema, name) if schema else (name,):
            if not part or "." in part or "\0" in part or len(part.encode()) > MAX_IDENTIFIER:
                raise ConfigurationError(
                    f"PostgreSQL table {table!r} must be [schema.]name, each part 1-"
                    f"{MAX_IDENTIFIER} bytes without dots"
                )
        path = (schema, name) if schema else (name,)
        quoted = _quote(*path)
        digest = hashlib.sha256(table.encode()).hexdigest()
        return cls(
            table=quoted,
            table_literal=_literal(quoted),
            # "_claim2": its outcome may be 'expired', which the first version's callers (a
            # process not yet upgraded, on the same table) would not know; they keep "_claim".
            claim_fn=_quote(*path[:-1], _derived(name, "_claim2", digest)),
            index=_quote(_derived(name, "_expires_at", digest)),
            channel=f"oncepay_{digest[:24]}",
        )


def _quote(*parts: str) -> str:
    """A (schema-qualified) identifier, quoted: any character but NUL may appear in it."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in parts)


def _derived(name: str, suffix: str, digest: str) -> str:
    """``name + suffix``, shortened with a digest when too long: a name PostgreSQL truncated
    could make two tables share one function."""
    if len((name + suffix).encode()) <= MAX_IDENTIFIER:
        return name + suffix
    room = MAX_IDENTIFIER - len(suffix) - 9
    head = name.encode()[:room].decode(errors="ignore")
    return f"{head}_{digest[:8]}{suffix}"


class _Sql:
    """The store's statements, for one table: built from constant text and quoted names
    only; values always travel as parameters."""

    def __init__(self, names: _Names) -> None:
        table = names.table
        self.setup = _DDL.format(
            lock=SCHEMA_LOCK,
            create_table=_literal(
                _CREATE_TABLE.format(table=table, table_name=names.table_literal, index=names.index)
            ),
            claim_fn=names.claim_fn,
            table=table,
            claim_body=_literal(_CLAIM_BODY.format(table=table)),
        )
        self.claim = Statement(
            f"SELECT c.outcome, (c.rec).* FROM {names.claim_fn}"
            "(:scope, :key, :fingerprint, :now, :lease, :ttl) AS c"
        )
        notify = NOTIFY_WAITERS.format(channel=_literal(names.channel))
        self.complete = Statement(
            f"WITH done AS (UPDATE {table} SET state = 'completed', response_status = :status, "
            "response_headers = :headers, response_body = :body "
            f"WHERE {_FENCED} RETURNING scope, idempotency_key, waited) {notify}"
        )
        self.release = Statement(
            f"WITH done AS (UPDATE {table} SET state = 'released' "
            f"WHERE {_FENCED} RETURNING scope, idempotency_key, waited) {notify}"
        )
        # A waiter's mark: a record already marked, or no longer executing, is left alone.
        self.mark_waited = Statement(
            f"UPDATE {table} SET waited = true WHERE {_KEY} AND state = 'executing' AND NOT waited"
        )
        # keep_until: a record whose request is still being driven (an unknown acquirer
        # outcome) must outlive its TTL, or a retry would be taken for a new request.
        self.checkpoint = Statement(
            f"UPDATE {table} SET recovery_point = :recovery_point, "
            "lease_expires_at = :lease_expires_at, expires_at = CASE WHEN expires_at < "
            f":keep_until THEN :keep_until ELSE expires_at END WHERE {_FENCED} RETURNING fence"
        )
        self.claim_new = claim_new_sql(table)
        self.get = Statement(f"SELECT {SELECT_LIST} FROM {table} WHERE {_KEY}")
        # SKIP LOCKED: a purge never waits for (or deletes under) a claim holding a row.
        self.purge = Statement(
            f"WITH doomed AS (SELECT scope, idempotency_key FROM {table} "
            "WHERE expires_at <= :now LIMIT :limit FOR UPDATE SKIP LOCKED), "
            f"gone AS (DELETE FROM {table} AS t USING doomed "
            "WHERE t.scope = doomed.scope AND t.idempotency_key = doomed.idempotency_key "
            "RETURNING 1) SELECT count(*) FROM gone"
        )


def _literal(text: str) -> str:
    """A string constant that means the same whatever ``standard_conforming_strings`` says: in an
    ``E''`` string a backslash is always an escape, so it is doubled, as is a quote."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


class PostgresStore(TransactionalCompletion):
    """An idempotency store in one PostgreSQL table (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        table: str = DEFAULT_TABLE,
        min_size: int = DEFAULT_MIN_SIZE,
        max_size: int = DEFAULT_MAX_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not 1 <= min_size <= max_size:
            raise ConfigurationError(f"need 1 <= min_size <= max_size, not {min_size}, {max_size}")
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be > 0 seconds, not {timeout}")
        names = _Names.derive(table)
        self.table = table
        self.channel = names.channel
        self._sql = _Sql(names)
        self._complete = self._sql.complete
        self._checkpoint = self._sql.checkpoint
        self._claim_new = self._sql.claim_new
        self._driver = _Asyncpg(url, min_size=min_size, max_size=max_size, timeout=timeout)
        self._events = KeyEvents()
        self._ready = False
        self._closed = False
        self._setup_lock = asyncio.Lock()
        self._listen_lock = asyncio.Lock()
        self._listener: _Listener | None = None

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresStore:
        return cls(url, **options)

    # -- primitives ------------------------------------------------------------------------------

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        params = {
            "scope": scope,
            "key": key,
            "fingerprint": fingerprint,
            "now": float(now),
            "lease": float(lease),
            "ttl": float(ttl),
        }
        (row,) = await self._fetch(self._sql.claim, params)
        if row[0] == "expired":
            return Claim(ClaimOutcome.CREATED, record_from_row(row[1:]), True)
        return Claim(ClaimOutcome(row[0]), record_from_row(row[1:]))

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        params = completion_params(scope, key, fence, response)
        await self._fenced(self._sql.complete, params)

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        await self._fenced(self._sql.release, {"scope": scope, "key": key, "fence": fence})

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        params = {
            "scope": scope,
            "key": key,
            "fence": fence,
            "recovery_point": recovery_point,
            "keep_until": 0.0,
            "lease_expires_at": float(now + lease),
        }
        await self._fenced(self._sql.checkpoint, params)

    async def get(self, scope: str, key: str) -> Record | None:
        rows = await self._fetch(self._sql.get, {"scope": scope, "key": key})
        return record_from_row(rows[0]) if rows else None

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        ((count,),) = await self._fetch(self._sql.purge, {"now": float(now), "limit": limit})
        return int(count)

    @asynccontextmanager
    async def watch(self, scope: str, key: str) -> AsyncIterator[Watch]:
        # Subscribed before listening is confirmed, so nothing delivered after LISTEN is lost.
        # Marked after listening, so a completion that sees the mark finds us listening; the
        # engine reads the record again after this, so one that did not see it is read.
        with self._events.subscribe(topic(scope, key)) as event:
            await self._listening()
            await self._fetch(self._sql.mark_waited, {"scope": scope, "key": key})
            yield _ListeningWatch(self, event)

    async def aclose(self) -> None:
        self._closed = True
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        await self._driver.close()
        self._ready = False

    # -- plumbing --------------------------------------------------------------------------------

    async def _fenced(self, statement: Statement, params: dict[str, Any]) -> None:
        """Run an update that applies only for the current token of an executing record."""
        if not await self._fetch(statement, params):
            raise lease_lost(params["key"], params["fence"])

    async def _fetch(self, statement: Statement, params: dict[str, Any]) -> list[Any]:
        await self._set_up()
        try:
            return await self._driver.fetch(statement, params)
        except _Asyncpg.errors as exc:
            raise StoreUnavailable(f"PostgreSQL store {self.table}: {exc}") from exc

    async def _set_up(self) -> None:
        """Connect and create the schema, once; after a failure the next call tries again."""
        self._check_open()
        if not self._ready:
            async with self._setup_lock:
                await self._set_up_unless_done()

    async def _set_up_unless_done(self) -> None:
        if self._ready:  # set up by the caller that held the lock before us
            return
        try:
            await self._driver.open()
            await self._driver.script(self._sql.setup)
        except _Asyncpg.errors as exc:
            await self._driver.close()
            raise StoreUnavailable(f"PostgreSQL store {self.table}: {exc}") from exc
        self._ready = True

    async def _listening(self) -> None:
        """Make sure the shared LISTEN connection is up (again, if it was lost)."""
        self._check_open()
        if self._listener is not None and self._listener.alive:
            return
        async with self._listen_lock:
            if self._listener is not None and self._listener.alive:
                return
            try:
                self._listener = await self._driver.listen(
                    self.channel, self._events.notify, self._events.notify_all
                )
            except _Asyncpg.errors as exc:
                raise StoreUnavailable(f"PostgreSQL store {self.table}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the PostgreSQL store {self.table} is closed")


class _ListeningWatch(EventWatch):
    """Woken by a notification; re-establishes the store's listener first if it was lost (the
    loss itself woke every waiter, so each re-read the record meanwhile)."""

    def __init__(self, store: PostgresStore, event: asyncio.Event) -> None:
        super().__init__(event)
        self._store = store

    async def wait(self, timeout: float) -> None:
        await self._store._listening()
        await super().wait(timeout)


# -- the driver ----------------------------------------------------------------------------------


class _Asyncpg:
    """Everything the store asks of its driver: one-round-trip prepared statements from a pool,
    a setup script in one transaction, and a listening connection."""

    errors: tuple[type[Exception], ...] = (
        asyncpg.PostgresError,  # reported by the server
        asyncpg.InterfaceError,  # the connection is closed, the pool is closed
        asyncpg.InternalClientError,  # the server said something asyncpg did not expect
        OSError,
        TimeoutError,
    )

    def __init__(self, url: str, *, min_size: int, max_size: int, timeout: float) -> None:
        self._dsn = _asyncpg_dsn(url)
        self._min_size = min_size
        self._max_size = max_size
        self._timeout = timeout
        self._pool: Pool | None = None

    async def open(self) -> None:
        self._pool = Pool(
            partial(self._connect, "oncepay"), max_size=self._max_size, timeout=self._timeout
        )
        await self._pool.open(self._min_size)

    async def fetch(self, statement: Statement, params: dict[str, Any]) -> list[Any]:
        return await self._live_pool().fetch(statement.numeric, *statement.values(params))

    async def script(self, text: str) -> None:
        async with self._live_pool().connection() as conn, conn.transaction():
            await conn.execute(text)

    async def listen(
        self, channel: str, deliver: Callable[[str], None], lost: Callable[[], None]
    ) -> _Listener:
        conn = await self._connect("oncepay-listen")
        return await _Listener.start(conn, channel, deliver, lost, timeout=self._timeout)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    def _live_pool(self) -> Pool:
        if self._pool is None:
            raise asyncpg.InterfaceError("the store is closed")
        return self._pool

    async def _connect(self, application_name: str) -> Connection:
        # Autocommit, as asyncpg is outside a transaction: each statement is its own transaction,
        # with no BEGIN/COMMIT round trips. A lifetime of 0 keeps each statement prepared for the
        # connection's life; by default asyncpg forgets one after 300 s and parses it again.
        try:
            return await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                server_settings={"application_name": application_name},
                max_cached_statement_lifetime=0,
            )
        except TimeoutError as exc:  # asyncpg's says nothing
            raise TimeoutError(f"could not connect within {self._timeout:g} s") from exc


def _asyncpg_dsn(url: str) -> str:
    """``url`` without libpq's ``gssencmode``, which asyncpg would send to the server as a
    setting (and the server refuse). asyncpg never asks for GSS encryption: that is what
    ``disable`` and ``prefer`` allow, and ``require`` it cannot honour."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    modes = {value for name, value in pairs if name == "gssencmode"}
    if not modes:
        return url
    if not modes <= {"disable", "prefer"}:
        raise ConfigurationError("the PostgreSQL store cannot use GSS encryption (gssencmode)")
    query = urlencode([(name, value) for name, value in pairs if name != "gssencmode"])
    return urlunsplit(parts._replace(query=query))


class _Listener:
    """One LISTEN connection: passes each payload to ``deliver``, and calls ``lost`` when the
    connection closes for any reason, so that waiters re-read rather than miss a change."""

    def __init__(self, conn: Connection, lost: Callable[[], None], *, timeout: float) -> None:
        self._conn = conn
        self._lost = lost
        self._timeout = timeout
        self._closing = False

    @classmethod
    async def start(
        cls,
        conn: Connection,
        channel: str,
        deliver: Callable[[str], None],
        lost: Callable[[], None],
        *,
        timeout: float,
    ) -> _Listener:
        listener = cls(conn, lost, timeout=timeout)
        conn.add_termination_listener(listener._terminated)
        try:
            await conn.add_listener(
                channel, lambda _conn, _pid, _channel, payload: deliver(payload)
            )
        except BaseException:
            listener._closing = True  # LISTEN never took effect: no warning of a loss
            conn.terminate()
            raise
        return listener

    @property
    def alive(self) -> bool:
        return not self._conn.is_closed()

    async def close(self) -> None:
        self._closing = True
        # A connection that cannot close gracefully (its server is gone) is aborted by asyncpg.
        with suppress(*_Asyncpg.errors):
            await self._conn.close(timeout=self._timeout)

    def _terminated(self, _conn: Connection) -> None:
        if not self._closing:
            logger.warning("oncepay: lost the PostgreSQL notification connection")
        self._lost()
