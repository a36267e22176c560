"""Engine rules that do not depend on a store."""

from __future__ import annotations

from pathlib import Path

import pytest

from oncepay.errors import ConfigurationError, IdempotencyKeyInvalid, IdempotencyKeyMissing
from oncepay.idempotency import Engine, Execute, Invalid, StoredResponse, store_from_url
from oncepay.idempotency.records import next_fence
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock


def test_a_missing_key_is_invalid_when_required_and_absent_when_optional() -> None:
    engine = Engine(MemoryStore())
    missing = engine.parse(None)
    assert isinstance(missing, Invalid)
    assert isinstance(missing.error, IdempotencyKeyMissing)
    assert missing.error.status == 400
    assert engine.parse(None, required=False) is None


def test_a_malformed_key_is_invalid_and_a_good_one_parses() -> None:
    engine = Engine(MemoryStore())
    bad = engine.parse('"open')
    assert isinstance(bad, Invalid)
    assert isinstance(bad.error, IdempotencyKeyInvalid)
    assert engine.parse('"abc"') == "abc"


@pytest.mark.parametrize(("ttl", "lease"), [(10, 10), (10, 20), (10, 0), (0, 0), (10, -1)])
def test_a_lease_must_be_positive_and_shorter_than_the_ttl(ttl: float, lease: float) -> None:
    with pytest.raises(ConfigurationError, match="lease < ttl"):
        Engine(MemoryStore(), ttl=ttl, lease=lease)


async def test_a_per_request_ttl_shorter_than_the_lease_is_refused() -> None:
    engine = Engine(MemoryStore(), ttl=3600, lease=30)
    with pytest.raises(ConfigurationError):
        await engine.begin("s", "k", "fp", ttl=10)


def test_negative_wait_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="wait"):
        Engine(MemoryStore(), wait=-1)


async def test_retry_after_never_exceeds_the_lease_left_nor_drops_below_a_second() -> None:
    clock = FakeClock()
    engine = Engine(MemoryStore(), ttl=3600, lease=30, retry_after=5, clock=clock)
    assert isinstance(await engine.begin("s", "k", "fp"), Execute)
    clock.advance(27)
    busy = await engine.begin("s", "k", "fp")
    assert getattr(busy, "retry_after", None) == 3
    clock.advance(2.5)
    busy = await engine.begin("s", "k", "fp")
    assert getattr(busy, "retry_after", None) == 1


def test_fences_grow_while_a_record_exists_and_restart_above_the_clock() -> None:
    assert next_fence(None, 1_700_000_000.0) == 1_700_000_000_000
    assert next_fence(1_700_000_000_005, 1_700_000_000.0) == 1_700_000_000_006
    assert next_fence(5, 1_700_000_000.0) == 1_700_000_000_000


def test_unknown_store_schemes_are_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unknown store URL scheme 'mongodb'"):
        store_from_url("mongodb://localhost")


def test_store_options_can_travel_in_the_url_query() -> None:
    from oncepay.idempotency.stores import _split_options

    url, options = _split_options("redis://h:6379/0?prefix=app:&socket_timeout=2")
    assert (url, options) == ("redis://h:6379/0?socket_timeout=2", {"prefix": "app:"})
    assert _split_options("sqlite:///k.db") == ("sqlite:///k.db", {})


async def test_transactional_completion_through_the_engine(tmp_path: Path) -> None:
    import sqlite3

    from oncepay.idempotency import Replay

    db = tmp_path / "app.db"
    engine = Engine(store_from_url(f"sqlite:///{db}"))
    try:
        decision = await engine.begin("s", "k", "fp")
        assert isinstance(decision, Execute)
        with sqlite3.connect(db) as conn:  # the app's own transaction on the same file
            conn.execute("CREATE TABLE orders (id TEXT)")
            conn.execute("INSERT INTO orders VALUES ('o1')")
            engine.complete_in(conn, decision.ticket, StoredResponse(201, (), b"o1"))
        assert isinstance(await engine.begin("s", "k", "fp"), Replay)
    finally:
        await engine.store.aclose()


async def test_transactional_completion_needs_a_sql_store() -> None:
    engine = Engine(MemoryStore())
    decision = await engine.begin("s", "k", "fp")
    assert isinstance(decision, Execute)
    with pytest.raises(ConfigurationError, match="cannot complete inside your transaction"):
        engine.complete_in(object(), decision.ticket, StoredResponse(200))


async def test_a_tiered_store_over_memory_cannot_complete_in_a_transaction() -> None:
    from oncepay.idempotency.stores.tiered import TieredStore

    engine = Engine(TieredStore(MemoryStore(), MemoryStore()))
    decision = await engine.begin("s", "k", "fp")
    assert isinstance(decision, Execute)
    with pytest.raises(ConfigurationError, match="TieredStore cannot complete inside"):
        await engine.acomplete_in(object(), decision.ticket, StoredResponse(200))
    with pytest.raises(ConfigurationError, match="cannot complete inside"):
        await engine.acheckpoint_in(object(), decision.ticket, "started")


def test_transactional_completion_is_a_typed_capability(tmp_path: Path) -> None:
    from oncepay.idempotency.stores.base import TransactionalStore
    from oncepay.idempotency.stores.tiered import TieredStore

    sqlite = store_from_url(f"sqlite:///{tmp_path}/k.db")
    assert isinstance(sqlite, TransactionalStore)
    assert not isinstance(MemoryStore(), TransactionalStore)
    assert isinstance(TieredStore(sqlite, MemoryStore()), TransactionalStore)  # its durable tier
    assert not isinstance(TieredStore(MemoryStore(), MemoryStore()), TransactionalStore)
    assert isinstance(TieredStore(sqlite, MemoryStore()), TieredStore)
