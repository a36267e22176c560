"""What only the SQLite store does: its cost per request, its worker thread, its locks and
files, and several processes meeting on one new database file.

The conformance suite covers the decision table; these tests count statements with
``sqlite3.Connection.set_trace_callback`` and force races with barriers and trace hooks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from oncepay.errors import ConfigurationError, StoreUnavailable
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
from oncepay.idempotency.records import Claim, ClaimOutcome
from oncepay.idempotency.stores.sqlite import SQLiteStore
from tests.clock import FakeClock

SCOPE = "merchant-a"
FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
OTHER_FP = fingerprint("POST", "/v1/payments", b'{"amount":999}')
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')


class StatementLog:
    """The verb of every statement the store's connection runs, from SQLite's trace hook."""

    def __init__(self) -> None:
        self.verbs: list[str] = []
        self.threads: set[str] = set()

    def attach(self, conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(self._trace)

    def _trace(self, statement: str) -> None:
        self.verbs.append(statement.split(None, 1)[0].upper())
        self.threads.add(threading.current_thread().name)

    def take(self) -> list[str]:
        verbs, self.verbs = self.verbs, []
        return verbs


def transactions(verbs: list[str]) -> list[list[str]]:
    """Group statements into the transactions they ran in: BEGIN..COMMIT is one, and any
    statement outside one is its own."""
    grouped: list[list[str]] = []
    current: list[str] | None = None
    for verb in verbs:
        if verb == "BEGIN":
            current = []
        elif verb in {"COMMIT", "ROLLBACK"}:
            assert current is not None
            grouped.append(current)
            current = None
        elif current is not None:
            current.append(verb)
        else:
            grouped.append([verb])
    return grouped


def engine_for(store: SQLiteStore, clock: FakeClock, **options: float) -> Engine:
    return Engine(store, clock=clock, **{"ttl": 3600.0, "lease": 30.0, **options})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


# -- cost per request ----------------------------------------------------------------------------


async def test_a_new_request_is_one_claim_transaction_and_one_update(
    db: Path, clock: FakeClock
) -> None:
    log = StatementLog()
    store = SQLiteStore(str(db), on_connect=log.attach)
    engine = engine_for(store, clock)
    try:
        await store.get(SCOPE, "warm-up")  # connects and creates the schema
        log.take()
        decision = await engine.begin(SCOPE, "k1", FP)
        assert isinstance(decision, Execute)
        claim = log.take()
        await engine.complete(decision.ticket, RESPONSE)
        complete = log.take()
    finally:
        await store.aclose()
    assert claim == ["BEGIN", "SELECT", "INSERT", "COMMIT"]
    assert complete == ["UPDATE"]
    assert transactions(claim + complete) == [["SELECT", "INSERT"], ["UPDATE"]]


async def test_a_replay_409_or_422_is_a_single_read(db: Path, clock: FakeClock) -> None:
    log = StatementLog()
    store = SQLiteStore(str(db), on_connect=log.attach)
    engine = engine_for(store, clock)
    try:
        done = await engine.begin(SCOPE, "done", FP)
        assert isinstance(done, Execute)
        await engine.complete(done.ticket, RESPONSE)
        assert isinstance(await engine.begin(SCOPE, "busy", FP), Execute)
        log.take()
        answers = []
        for key, fp in (("done", FP), ("busy", FP), ("done", OTHER_FP)):
            decision = await engine.begin(SCOPE, key, fp)
            answers.append((type(decision), transactions(log.take())))
    finally:
        await store.aclose()
    assert answers == [
        (Replay, [["SELECT"]]),
        (InProgress, [["SELECT"]]),
        (Reused, [["SELECT"]]),
    ]


# -- the worker thread ---------------------------------------------------------------------------


async def test_every_statement_runs_on_the_store_thread_not_the_event_loop(db: Path) -> None:
    log = StatementLog()
    store = SQLiteStore(str(db), on_connect=log.attach)
    try:
        await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
        await store.get(SCOPE, "k1")
    finally:
        await store.aclose()
    assert len(log.threads) == 1
    (thread,) = log.threads
    assert thread.startswith("oncepay-sqlite")
    assert thread != threading.current_thread().name


async def test_a_claim_whose_read_went_stale_is_decided_again_under_the_write_lock(
    db: Path, clock: FakeClock
) -> None:
    """Another writer claims the key between this claim's read and its write: SQLite refuses
    the stale write, and the claim, taken again under the lock, sees the other's record."""
    loop = asyncio.get_running_loop()
    rival = SQLiteStore(str(db))
    log = StatementLog()
    rival_claims: list[Claim] = []

    def interfere(statement: str) -> None:
        log._trace(statement)
        if statement.startswith("INSERT") and not rival_claims:
            claim = rival.claim(SCOPE, "k1", FP, now=clock.now, lease=30, ttl=3600)
            rival_claims.append(asyncio.run_coroutine_threadsafe(claim, loop).result())

    store = SQLiteStore(str(db), on_connect=lambda conn: conn.set_trace_callback(interfere))
    try:
        await store.get(SCOPE, "warm-up")
        log.take()
        claim = await store.claim(SCOPE, "k1", FP, now=clock.now, lease=30, ttl=3600)
    finally:
        await store.aclose()
        await rival.aclose()
    (rival_claim,) = rival_claims
    assert rival_claim.outcome is ClaimOutcome.CREATED
    assert claim.outcome is ClaimOutcome.EXISTING
    assert claim.record.fence == rival_claim.record.fence
    assert log.take() == ["BEGIN", "SELECT", "INSERT", "ROLLBACK", "BEGIN", "SELECT", "COMMIT"]


# -- locks, files and failures -------------------------------------------------------------------


async def test_the_database_runs_in_wal_mode(db: Path) -> None:
    store = SQLiteStore(str(db))
    try:
        await store.get(SCOPE, "k1")
    finally:
        await store.aclose()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_held_write_lock_makes_claims_unavailable_after_the_busy_timeout_not_reads(
    db: Path,
) -> None:
    store = SQLiteStore(str(db), busy_timeout=0.1)  # the wait under test, not a sleep
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        await store.get(SCOPE, "warm-up")
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as info:
            await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert await store.get(SCOPE, "k1") is None  # WAL: readers do not wait for the writer
        holder.execute("ROLLBACK")
        claim = await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
        assert claim.outcome is ClaimOutcome.CREATED
    finally:
        holder.close()
        await store.aclose()


async def test_an_unopenable_path_is_store_unavailable(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path / 'no-such-dir' / 'keys.db'}")
    try:
        with pytest.raises(StoreUnavailable) as info:
            await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
        assert isinstance(info.value.__cause__, sqlite3.Error)
        with pytest.raises(StoreUnavailable):
            await store.get(SCOPE, "k1")
    finally:
        await store.aclose()


async def test_a_closed_store_is_unavailable(db: Path) -> None:
    store = SQLiteStore(str(db))
    await store.get(SCOPE, "k1")
    await store.aclose()
    await store.aclose()  # closing twice is harmless
    with pytest.raises(StoreUnavailable):
        await store.get(SCOPE, "k1")


@pytest.mark.parametrize(
    "in_query",
    [
        pytest.param(False, id="keyword"),
        pytest.param(True, id="url-query"),
    ],
)
async def test_the_table_option_names_the_table(db: Path, in_query: bool) -> None:
    if in_query:
        store = store_from_url(f"sqlite:///{db}?table=payment_keys")
    else:
        store = store_from_url(f"sqlite:///{db}", table="payment_keys")
    try:
        await store.claim(SCOPE, "k1", FP, now=time.time(), lease=30, ttl=3600)
    finally:
        await store.aclose()
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        (count,) = conn.execute("SELECT count(*) FROM payment_keys").fetchone()
    assert {"payment_keys", "payment_keys_expires_at"} <= tables
    assert count == 1


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite:///keys.db", "keys.db"),
        ("sqlite:////var/lib/oncepay/keys.db", "/var/lib/oncepay/keys.db"),
    ],
)
def test_urls_name_relative_and_absolute_paths(url: str, path: str) -> None:
    assert SQLiteStore.from_url(url).path == path


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("sqlite://host/keys.db", {}),
        ("sqlite:///", {}),
        ("sqlite:///keys.db?mode=ro", {}),
        ("sqlite:///keys.db", {"table": "bad name"}),
        ("sqlite:///keys.db", {"busy_timeout": -1}),
    ],
)
def test_bad_urls_and_options_are_configuration_errors(
    url: str, options: dict[str, object]
) -> None:
    with pytest.raises(ConfigurationError):
        store_from_url(url, **options)


# -- several processes ---------------------------------------------------------------------------


async def test_a_waiter_sees_a_completion_made_by_another_process(
    db: Path, clock: FakeClock
) -> None:
    """Another store on the same file stands in for another process: its completion cannot
    reach our waiter as an event, so the waiter finds it by polling the file."""
    ours, theirs = SQLiteStore(str(db)), SQLiteStore(str(db))
    try:
        first = await engine_for(theirs, clock).begin(SCOPE, "k1", FP)
        assert isinstance(first, Execute)
        waiter = asyncio.create_task(engine_for(ours, clock, wait=30.0).begin(SCOPE, "k1", FP))
        await theirs.complete(SCOPE, "k1", first.ticket.fence, RESPONSE, now=clock.now)
        decision = await asyncio.wait_for(waiter, 10)
    finally:
        await ours.aclose()
        await theirs.aclose()
    assert isinstance(decision, Replay)
    assert decision.response == RESPONSE
