"""``CachedStore``: completed records kept in this process, in front of any store (issue 12,
item 21). It must answer only what cannot be wrong: replays (and reuse errors) of completed
records until they expire; everything else goes to the store it wraps."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.errors import ConfigurationError, LeaseLost
from oncepay.http import IdempotencyMiddleware
from oncepay.idempotency import Engine, Execute, InProgress, Replay, Reused, StoredResponse
from oncepay.idempotency.records import Claim
from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.cached import CachedStore
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock
from tests.conftest import make_spec

# The whole conformance suite, run again over a cache in front of real stores: the cache must
# not change one row of the decision table.
from tests.test_store_conformance import *  # noqa: F403

SCOPE = "tenant"
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}')


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """The conformance suite's ``store``, cached (overrides tests/conftest.py's here)."""
    cached = CachedStore(make_spec(request, request.param, tmp_path).build())
    try:
        yield cached
    finally:
        await cached.aclose()


class Counting(MemoryStore):
    """A memory store that counts the claims that reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.claims: Counter[str] = Counter()

    async def claim(self, scope: str, key: str, fingerprint: str, **kw: Any) -> Claim:
        self.claims[key] += 1
        return await super().claim(scope, key, fingerprint, **kw)


def _engine(store: Store, clock: FakeClock) -> Engine:
    return Engine(store, ttl=3600.0, lease=30.0, clock=clock)


async def _complete(engine: Engine, key: str, fp: str = "fp") -> None:
    decision = await engine.begin(SCOPE, key, fp)
    assert isinstance(decision, Execute)
    await engine.complete(decision.ticket, RESPONSE)


async def test_replays_of_a_record_completed_here_do_not_reach_the_store() -> None:
    inner, clock = Counting(), FakeClock()
    engine = _engine(CachedStore(inner), clock)
    await _complete(engine, "k")
    for _ in range(3):
        replay = await engine.begin(SCOPE, "k", "fp")
        assert isinstance(replay, Replay)
        assert replay.response == RESPONSE
        assert replay.record.expires_at == pytest.approx(clock.now + 3600.0)
    assert isinstance(await engine.begin(SCOPE, "k", "other"), Reused)  # reuse, from memory
    assert inner.claims["k"] == 1


async def test_a_record_completed_elsewhere_is_cached_once_a_claim_finds_it() -> None:
    inner, clock = Counting(), FakeClock()
    await _complete(_engine(inner, clock), "k")  # another process, straight to the store
    engine = _engine(CachedStore(inner), clock)
    for _ in range(3):
        assert isinstance(await engine.begin(SCOPE, "k", "fp"), Replay)
    assert inner.claims["k"] == 2  # the other process's claim, and this one's first


async def test_records_still_executing_are_never_cached() -> None:
    inner, clock = Counting(), FakeClock()
    engine = _engine(CachedStore(inner), clock)
    first = await engine.begin(SCOPE, "k", "fp")
    assert isinstance(first, Execute)
    for _ in range(3):
        assert isinstance(await engine.begin(SCOPE, "k", "fp"), InProgress)
    assert inner.claims["k"] == 4
    clock.advance(31.0)  # the lease ran out: the store hands the key over, the cache never knew
    taken = await engine.begin(SCOPE, "k", "fp")
    assert isinstance(taken, Execute)
    assert taken.ticket.resumed


async def test_a_released_key_runs_again() -> None:
    clock = FakeClock()
    engine = _engine(CachedStore(MemoryStore()), clock)
    first = await engine.begin(SCOPE, "k", "fp")
    assert isinstance(first, Execute)
    await engine.release(first.ticket)
    assert isinstance(await engine.begin(SCOPE, "k", "other"), Execute)


async def test_a_cached_record_expires_with_the_record() -> None:
    inner, clock = Counting(), FakeClock()
    cached = CachedStore(inner)
    engine = _engine(cached, clock)
    await _complete(engine, "k")
    clock.advance(3599.0)
    assert isinstance(await engine.begin(SCOPE, "k", "fp"), Replay)
    clock.advance(1.0)  # the record's expiry, by the engine's clock
    assert isinstance(await engine.begin(SCOPE, "k", "other"), Execute)
    assert inner.claims["k"] == 2
    assert len(cached) == 0


async def test_a_stale_ticket_completing_caches_nothing() -> None:
    inner, clock = Counting(), FakeClock()
    cached = CachedStore(inner)
    engine = _engine(cached, clock)
    stale = await engine.begin(SCOPE, "k", "fp")
    assert isinstance(stale, Execute)
    clock.advance(31.0)
    newer = await _engine(inner, clock).begin(SCOPE, "k", "fp")  # another process takes over
    assert isinstance(newer, Execute)
    with pytest.raises(LeaseLost):
        await engine.complete(stale.ticket, RESPONSE)
    assert len(cached) == 0
    assert isinstance(await engine.begin(SCOPE, "k", "fp"), InProgress)


async def test_the_cache_keeps_the_most_recently_used_records_up_to_its_count() -> None:
    inner, clock = Counting(), FakeClock()
    cached = CachedStore(inner, max_items=2)
    engine = _engine(cached, clock)
    for key in ("a", "b"):
        await _complete(engine, key)
    await engine.begin(SCOPE, "a", "fp")  # a is now the most recently used
    await _complete(engine, "c")  # pushes b out
    assert len(cached) == 2
    for key in ("a", "c", "b"):  # b last: bringing it back pushes out the least recent
        assert isinstance(await engine.begin(SCOPE, key, "fp"), Replay)
    assert inner.claims == {"a": 1, "b": 2, "c": 1}


async def test_the_cache_keeps_records_up_to_its_size_in_bytes() -> None:
    inner, clock = Counting(), FakeClock()
    cached = CachedStore(inner, max_bytes=3000)
    engine = _engine(cached, clock)
    big = StoredResponse(200, (), b"x" * 5000)
    decision = await engine.begin(SCOPE, "big", "fp")
    assert isinstance(decision, Execute)
    await engine.complete(decision.ticket, big)
    assert len(cached) == 0  # larger than the whole cache: never kept
    for key in ("a", "b", "c", "d", "e", "f"):
        await _complete(engine, key)
    assert 0 < len(cached) < 6
    assert cached._bytes <= 3000
    replay = await engine.begin(SCOPE, "big", "fp")
    assert isinstance(replay, Replay)
    assert replay.response == big


def test_a_cache_without_room_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        CachedStore(MemoryStore(), max_items=0)


async def test_the_middleware_replays_from_the_cache() -> None:
    inner = Counting()
    runs: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        runs.append(scope["path"])
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"created"})

    wrapped = IdempotencyMiddleware(app, store=CachedStore(inner))
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [
            await client.post("/pay", content=b"{}", headers={"Idempotency-Key": "k"})
            for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [201, 201, 201]
    assert [a.headers.get("idempotent-replayed") for a in answers] == [None, "true", "true"]
    assert runs == ["/pay"]
    assert sum(inner.claims.values()) == 1
