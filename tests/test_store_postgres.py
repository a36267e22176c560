"""What only the PostgreSQL store does: one round trip per primitive (counted on the wire),
prepared statements, notifications for wait mode, quoted and derived names, bounded purges
that skip locked rows, an unreachable server, and several processes creating one schema.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psycopg
import pytest
from psycopg import sql

from oncepay.errors import ConfigurationError, LeaseLost, StoreUnavailable
from oncepay.idempotency import (
    Engine,
    Execute,
    InProgress,
    Replay,
    Reused,
    StoredResponse,
    fingerprint,
    store_from_url,
)
from oncepay.idempotency.stores._sql import topic
from oncepay.idempotency.stores.postgres import PostgresStore
from tests.clock import FakeClock
from tests.servers import POSTGRES_URL

SCOPE = "merchant-a"
FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
OTHER_FP = fingerprint("POST", "/v1/payments", b'{"amount":999}')
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')
# Bounds on waits that end as soon as the awaited thing happens; reaching one is a failure.
WAKE_BOUND = 10.0
NEVER = 600.0  # a watch timeout no test reaches: a wait that returns was woken

pytestmark = pytest.mark.postgres


def table_in(schema: str) -> str:
    return f"{schema}.rec_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def store(postgres_schema: str) -> AsyncIterator[PostgresStore]:
    built = PostgresStore(POSTGRES_URL, table=table_in(postgres_schema))
    try:
        yield built
    finally:
        await built.aclose()


def engine_for(store: PostgresStore, clock: FakeClock, **options: float) -> Engine:
    return Engine(store, clock=clock, **{"ttl": 3600.0, "lease": 30.0, **options})


async def executed(engine: Engine, key: str = "k1") -> Execute:
    decision = await engine.begin(SCOPE, key, FP)
    assert isinstance(decision, Execute), decision
    return decision


# -- counting round trips on the wire ------------------------------------------------------------


class _Messages:
    """Splits one direction of a PostgreSQL connection into protocol messages (a type byte and
    a length); only the client's first message, the startup packet, has no type byte."""

    def __init__(self, on_message: Callable[[str], None], *, untyped_first: bool) -> None:
        self._on_message = on_message
        self._untyped = untyped_first
        self._buffer = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            header = 4 if self._untyped else 5
            if len(self._buffer) < header:
                return
            length = int.from_bytes(self._buffer[header - 4 : header], "big")
            size = length + header - 4
            if len(self._buffer) < size:
                return
            if not self._untyped:
                self._on_message(chr(self._buffer[0]))
            self._untyped = False
            self._buffer = self._buffer[size:]


class WireCounter:
    """A TCP relay in front of PostgreSQL that reads the messages going through. The server
    ends every round trip with exactly one ReadyForQuery ('Z'), whatever the driver; a client
    that has to (re)parse a statement sends Parse ('P')."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.parses = 0
        self._server: asyncio.Server | None = None
        self._upstream = urlsplit(POSTGRES_URL)

    async def __aenter__(self) -> WireCounter:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        """The server's URL through the relay; TLS and GSS are off so messages stay readable."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._upstream.netloc.rpartition("@")[0] + f"@127.0.0.1:{port}"
        query = "sslmode=disable&gssencmode=disable"
        return urlunsplit((self._upstream.scheme, netloc, self._upstream.path, query, ""))

    def take(self) -> int:
        counted, self.round_trips = self.round_trips, 0
        return counted

    def _from_server(self, kind: str) -> None:
        self.round_trips += kind == "Z"

    def _from_client(self, kind: str) -> None:
        self.parses += kind == "P"

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port or 5432
        server_r, server_w = await asyncio.open_connection(host, port)
        await asyncio.gather(
            _pump(client_r, server_w, _Messages(self._from_client, untyped_first=True)),
            _pump(server_r, client_w, _Messages(self._from_server, untyped_first=False)),
        )


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, messages: _Messages
) -> None:
    try:
        while data := await reader.read(65536):
            messages.feed(data)  # counted before the peer can see it
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_each_primitive_is_one_round_trip_of_a_prepared_statement(
    postgres_schema: str, clock: FakeClock
) -> None:
    async with WireCounter() as wire:
        store = PostgresStore(wire.url, table=table_in(postgres_schema), min_size=1, max_size=1)
        engine = engine_for(store, clock)
        try:
            # Warm-up: the pool's one connection prepares every statement once.
            warm = await executed(engine, "warm-up")
            await engine.checkpoint(warm.ticket, "started")
            await engine.release(warm.ticket)
            warm = await executed(engine, "warm-up")
            async with store.watch(SCOPE, "warm-up"):  # the listener's connection, and a mark
                await engine.complete(warm.ticket, RESPONSE)
            await store.get(SCOPE, "warm-up")
            await store.purge_expired(now=clock.now)
            wire.take()
            parses_before = wire.parses
            costs = await _costs(store, engine, clock, wire)
        finally:
            await store.aclose()
    assert costs == {
        "new request: claim": 1,
        "new request: complete": 1,
        "replay": 1,
        "in progress (409)": 1,
        "wait mode: a watch opened (its mark)": 1,
        "reused (422)": 1,
        "checkpoint": 1,
        "takeover": 1,
        "stale complete refused": 1,
        "release": 1,
        "get": 1,
        "purge": 1,
    }
    assert parses_before > 0  # the relay does see statements being prepared...
    assert wire.parses == parses_before  # ...and none was parsed again: all were prepared


async def _costs(
    store: PostgresStore, engine: Engine, clock: FakeClock, wire: WireCounter
) -> dict[str, int]:
    costs = {}
    first = await executed(engine, "k1")
    costs["new request: claim"] = wire.take()
    await engine.complete(first.ticket, RESPONSE)
    costs["new request: complete"] = wire.take()
    assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
    costs["replay"] = wire.take()
    second = await executed(engine, "k2")
    wire.take()
    assert isinstance(await engine.begin(SCOPE, "k2", FP), InProgress)
    costs["in progress (409)"] = wire.take()
    async with store.watch(SCOPE, "k2"):
        costs["wait mode: a watch opened (its mark)"] = wire.take()
    assert isinstance(await engine.begin(SCOPE, "k2", OTHER_FP), Reused)
    costs["reused (422)"] = wire.take()
    await engine.checkpoint(second.ticket, "payment_created")
    costs["checkpoint"] = wire.take()
    clock.advance(31)
    third = await executed(engine, "k2")
    costs["takeover"] = wire.take()
    with pytest.raises(LeaseLost):
        await engine.complete(second.ticket, RESPONSE)
    costs["stale complete refused"] = wire.take()
    await engine.release(third.ticket)
    costs["release"] = wire.take()
    await store.get(SCOPE, "k2")
    costs["get"] = wire.take()
    await store.purge_expired(now=clock.now)
    costs["purge"] = wire.take()
    return costs


# -- notifications -------------------------------------------------------------------------------


async def test_a_completion_through_another_store_wakes_a_waiter_by_notification(
    store: PostgresStore, clock: FakeClock
) -> None:
    """Another store on the same table stands in for another process. The watch does not
    poll, so a wait that returns long before its timeout was woken by NOTIFY."""
    other = PostgresStore(POSTGRES_URL, table=store.table)
    try:
        first = await executed(engine_for(other, clock))
        async with store.watch(SCOPE, "k1") as watch:
            await other.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
            await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)
        second = await executed(engine_for(other, clock), "k2")
        async with store.watch(SCOPE, "k2") as watch:
            await other.release(SCOPE, "k2", second.ticket.fence, now=clock.now)
            await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)
    finally:
        await other.aclose()


async def test_a_notification_wakes_only_the_waiters_of_its_record(
    store: PostgresStore, clock: FakeClock
) -> None:
    first = await executed(engine_for(store, clock))
    async with store.watch(SCOPE, "k1") as ours, store.watch(SCOPE, "other") as theirs:
        await store.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
        await asyncio.wait_for(ours.wait(NEVER), WAKE_BOUND)
        await theirs.wait(0)  # not woken: returns only because its timeout is zero


async def test_losing_the_listener_wakes_waiters_and_listening_resumes(
    store: PostgresStore, clock: FakeClock
) -> None:
    first = await executed(engine_for(store, clock))
    async with store.watch(SCOPE, "k1") as watch:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'oncepay-listen' AND query = %s",
                (f'LISTEN "{store.channel}"',),
            ).fetchall()
        assert killed == [(True,)]
        await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)  # woken to re-read
    async with store.watch(SCOPE, "k1") as watch:  # listens again before it is returned
        await store.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
        await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)


@asynccontextmanager
async def listening(store: PostgresStore) -> AsyncIterator[asyncio.Queue[str]]:
    """A LISTEN of our own on the store's channel: its payloads, in the order they came (the
    order their transactions committed)."""
    conn = await asyncpg.connect(POSTGRES_URL)
    payloads: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(store.channel, lambda *args: payloads.put_nowait(args[-1]))
    try:
        yield payloads
    finally:
        await conn.close()


def waited(store: PostgresStore, key: str) -> bool:
    with psycopg.connect(POSTGRES_URL) as conn:
        row = conn.execute(
            sql.SQL("SELECT waited FROM {} WHERE idempotency_key = %s").format(
                sql.Identifier(*store.table.split("."))
            ),
            (key,),
        ).fetchone()
    assert row is not None
    return bool(row[0])


async def until_a_lock_wait(statement: str) -> None:
    """Return once a backend running ``statement`` (a fragment of it) waits for a lock."""
    query = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND position($1 in query) > 0"
    )
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        deadline = time.monotonic() + WAKE_BOUND
        while time.monotonic() < deadline:
            if await conn.fetchval(query, statement):
                return
            await asyncio.sleep(0.005)  # polling a state we observe, with a deadline
    finally:
        await conn.close()
    raise AssertionError(f"no backend running {statement!r} waited for a lock")


async def test_only_a_record_a_waiter_marked_notifies(
    store: PostgresStore, clock: FakeClock
) -> None:
    """A completion and a release nobody waits for send nothing; marked by a watch, each
    does. Notifications arrive in commit order, so the first payload is the marked one's."""
    engine = engine_for(store, clock)
    tickets = {key: (await executed(engine, key)).ticket for key in ("c", "r", "mc", "mr")}
    async with listening(store) as payloads:
        await store.complete(SCOPE, "c", tickets["c"].fence, RESPONSE, now=clock.now)
        await store.release(SCOPE, "r", tickets["r"].fence, now=clock.now)
        async with store.watch(SCOPE, "mc") as watch:
            assert waited(store, "mc")
            await store.complete(SCOPE, "mc", tickets["mc"].fence, RESPONSE, now=clock.now)
            await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)
        assert await asyncio.wait_for(payloads.get(), WAKE_BOUND) == topic(SCOPE, "mc")
        async with store.watch(SCOPE, "mr") as watch:
            await store.release(SCOPE, "mr", tickets["mr"].fence, now=clock.now)
            await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)
        assert await asyncio.wait_for(payloads.get(), WAKE_BOUND) == topic(SCOPE, "mr")
        assert payloads.empty()
    assert not waited(store, "c")
    async with store.watch(SCOPE, "c"):  # completed: a watch leaves it unmarked
        assert not waited(store, "c")


async def test_a_mark_committed_while_the_completion_waits_for_the_row_is_seen(
    store: PostgresStore, clock: FakeClock
) -> None:
    """The completion's statement starts (its snapshot taken) while the waiter's mark holds
    the row uncommitted; the mark commits; the completion, re-reading the row it waited
    for, sees the mark and notifies."""
    first = await executed(engine_for(store, clock))
    table = sql.Identifier(*store.table.split("."))
    async with listening(store) as payloads:
        with psycopg.connect(POSTGRES_URL) as marker:  # a transaction, holding the row
            marker.execute(
                sql.SQL("UPDATE {} SET waited = true WHERE idempotency_key = 'k1'").format(table)
            )
            completing = asyncio.create_task(
                store.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
            )
            await until_a_lock_wait("SET state = 'completed'")
            marker.commit()
            await asyncio.wait_for(completing, WAKE_BOUND)
        assert await asyncio.wait_for(payloads.get(), WAKE_BOUND) == topic(SCOPE, "k1")


async def test_a_mark_after_the_completion_changes_nothing_and_the_read_sees_it(
    store: PostgresStore, clock: FakeClock
) -> None:
    """The other order: the completion holds the row, the watch's mark waits for it, then
    finds the record completed and leaves it be; the engine's read after the mark sees the
    completion, so no notification is needed."""
    first = await executed(engine_for(store, clock))
    table = sql.Identifier(*store.table.split("."))

    async def watch_then_read() -> Any:
        async with store.watch(SCOPE, "k1"):
            return await store.get(SCOPE, "k1")

    with psycopg.connect(POSTGRES_URL) as completer:
        completer.execute(
            sql.SQL(
                "UPDATE {} SET state = 'completed', response_status = 201 "
                "WHERE idempotency_key = 'k1' AND fence = %s"
            ).format(table),
            (first.ticket.fence,),
        )
        reading = asyncio.create_task(watch_then_read())
        await until_a_lock_wait("SET waited = true")
        completer.commit()
        record = await asyncio.wait_for(reading, WAKE_BOUND)
    assert record.state == "completed"
    assert not waited(store, "k1")


async def test_a_table_from_before_the_mark_gets_it_and_running_processes_keep_going(
    postgres_schema: str, clock: FakeClock
) -> None:
    """A table an earlier version made has no ``waited``: the next store to start adds it.
    A store already running (its claim prepared on the old row type) keeps claiming."""
    table = table_in(postgres_schema)
    running = PostgresStore(POSTGRES_URL, table=table)
    later = PostgresStore(POSTGRES_URL, table=table)
    try:
        engine = engine_for(running, clock)
        await executed(engine, "before")
        with psycopg.connect(POSTGRES_URL) as admin:  # the table as an earlier version left it
            admin.execute(
                sql.SQL("ALTER TABLE {} DROP COLUMN waited").format(
                    sql.Identifier(*table.split("."))
                )
            )
        assert isinstance(await engine.begin(SCOPE, "before", FP), InProgress)
        first = await executed(engine_for(later, clock), "k1")  # set up: the column is back
        assert not waited(later, "k1")
        second = await executed(engine, "k2")  # the running store's prepared claim
        async with later.watch(SCOPE, "k2") as watch:
            await running.complete(SCOPE, "k2", second.ticket.fence, RESPONSE, now=clock.now)
            await asyncio.wait_for(watch.wait(NEVER), WAKE_BOUND)
        await running.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
        assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
    finally:
        await running.aclose()
        await later.aclose()


# -- names ---------------------------------------------------------------------------------------


async def test_table_names_are_quoted_identifiers(postgres_schema: str, clock: FakeClock) -> None:
    table = f"{postgres_schema}.Odd \"name\" 'x'; DROP TABLE y --"
    store = PostgresStore(POSTGRES_URL, table=table)
    try:
        engine = engine_for(store, clock)
        first = await executed(engine)
        await engine.complete(first.ticket, RESPONSE)
        assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
    finally:
        await store.aclose()


async def test_long_table_names_that_differ_only_at_the_end_stay_apart(
    postgres_schema: str, clock: FakeClock
) -> None:
    """Both names exceed what ``<name>_claim`` can be; the derived function names must still
    differ, or one table's claims would land in the other."""
    stem = "r" * 60
    stores = [PostgresStore(POSTGRES_URL, table=f"{postgres_schema}.{stem}{n}") for n in "ab"]
    try:
        first = await executed(engine_for(stores[0], clock))
        await stores[0].complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
        assert isinstance(await engine_for(stores[1], clock).begin(SCOPE, "k1", FP), Execute)
    finally:
        for built in stores:
            await built.aclose()


@pytest.mark.parametrize(
    "options",
    [
        {"table": "a.b.c"},
        {"table": "schema."},
        {"table": "t" * 64},
        {"min_size": 0},
        {"min_size": 5, "max_size": 2},
        {"timeout": 0},
    ],
)
def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        store_from_url(POSTGRES_URL, **options)


# -- purge ---------------------------------------------------------------------------------------


async def test_purge_skips_a_row_another_transaction_holds(
    store: PostgresStore, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    for key in ("held", "free"):
        await executed(engine, key)
    clock.advance(3600)
    await store.get(SCOPE, "held")  # the table exists
    with psycopg.connect(POSTGRES_URL) as holder:
        holder.execute(
            sql.SQL("SELECT 1 FROM {} WHERE idempotency_key = 'held' FOR UPDATE").format(
                sql.Identifier(*store.table.split("."))
            )
        )
        assert await store.purge_expired(now=clock.now) == 1  # did not wait for the lock
        assert await store.get(SCOPE, "held") is not None
        holder.rollback()
    assert await store.purge_expired(now=clock.now) == 1
    assert await store.get(SCOPE, "held") is None


# -- failures ------------------------------------------------------------------------------------


def closed_port() -> int:
    """A port nothing listens on: bound by us a moment ago, then released."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_an_unreachable_server_is_store_unavailable() -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    store = PostgresStore(url, timeout=0.5)  # a bound on connecting, not a sleep
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)  # the driver's error
        with pytest.raises(StoreUnavailable):  # a later call tries again, and fails again
            await store.get(SCOPE, "k1")
        with pytest.raises(StoreUnavailable):
            async with store.watch(SCOPE, "k1"):
                pass
    finally:
        await store.aclose()


async def test_a_closed_store_is_unavailable(store: PostgresStore) -> None:
    await store.get(SCOPE, "k1")
    await store.aclose()
    await store.aclose()  # closing twice is harmless
    with pytest.raises(StoreUnavailable):
        await store.get(SCOPE, "k1")
    with pytest.raises(StoreUnavailable):
        async with store.watch(SCOPE, "k1"):
            pass
