"""The Redis fast tier in front of the SQL system of record (SPEC §3): replays and in-flight
checks answered by Redis in one round trip; losing Redis — a flush, a restart, an outage —
loses no guarantee, because SQL decides."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from oncepay.idempotency.engine import Execute, InProgress
from oncepay.idempotency.stores.tiered import TieredStore
from tests.payments.stack import Stack, running_stack
from tests.processes import free_port, wait_for_port
from tests.servers import REDIS_URL, require_redis

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The tier's Redis under a prefix of this test's own, whose records are deleted after it
    (they would otherwise stay in the shared server until their TTL)."""
    require_redis()
    import redis

    prefix = f"oncepay-test:tier-{uuid.uuid4().hex[:8]}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


@pytest.fixture
async def tiered(payments_url: str, tmp_path: Path, redis_url: str) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, redis_url=redis_url) as stack:
        yield stack


class Counting:
    """Counts the system of record's claims, to see which requests reached it."""

    def __init__(self, store: Any) -> None:
        self.claims = 0
        self._claim = store.claim

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.claims += 1
            return await self._claim(*args, **kwargs)

        store.claim = counted


def tier_of(stack: Stack) -> TieredStore:
    store = stack.services.engine.store
    assert isinstance(store, TieredStore)
    return store


async def flush(stack: Stack) -> None:
    """Lose everything the cache holds (this test's keys only: the server is shared)."""
    cache: Any = tier_of(stack).cache
    names = await cache._commands.execute_command("KEYS", f"{cache.prefix}*")
    if names:
        await cache._commands.execute_command("DEL", *names)


async def test_replays_are_answered_by_the_cache(tiered: Stack) -> None:
    first = await tiered.pay(key="p")
    sql = Counting(tier_of(tiered).primary)
    for _ in range(3):
        replay = await tiered.pay(key="p")
        assert replay.content == first.content
        assert replay.headers["idempotent-replayed"] == "true"
    assert sql.claims == 0
    reused = await tiered.pay(key="p", amount=5)
    assert reused.status_code == 422
    assert sql.claims == 0


async def test_in_flight_duplicates_are_answered_by_the_cache(tiered: Stack) -> None:
    engine = tiered.services.engine
    first = await engine.begin(tiered.merchant.id, "k", "fp")
    assert isinstance(first, Execute)
    sql = Counting(tier_of(tiered).primary)
    duplicate = await engine.begin(tiered.merchant.id, "k", "fp")
    assert isinstance(duplicate, InProgress)
    assert sql.claims == 0


async def test_a_flushed_cache_loses_no_guarantee(tiered: Stack) -> None:
    first = await tiered.pay(key="p")
    engine = tiered.services.engine
    running = await engine.begin(tiered.merchant.id, "in-flight", "fp")
    assert isinstance(running, Execute)
    await flush(tiered)
    replay = await tiered.pay(key="p")
    assert replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    assert isinstance(await engine.begin(tiered.merchant.id, "in-flight", "fp"), InProgress)
    assert await tiered.count("payments") == 1
    # ...and the replay put the record back in the cache.
    sql = Counting(tier_of(tiered).primary)
    assert (await tiered.pay(key="p")).content == first.content
    assert sql.claims == 0


async def test_unknown_outcome_and_recovery_with_the_tier(tiered: Stack) -> None:
    from oncepay.payments.recovery import recover_once

    await tiered.faults(timeout_after_commit_rate=1.0, stall_seconds=5)
    assert (await tiered.pay(key="u")).status_code == 503
    await flush(tiered)
    await tiered.faults()
    tiered.clock.advance(10)
    assert dict((await recover_once(tiered.services, now=tiered.clock())).results) == {
        "finished": 1
    }
    final = await tiered.pay(key="u")
    assert final.status_code == 201
    assert final.headers["idempotent-replayed"] == "true"
    assert await tiered.approved_authorizations(final.json()["id"]) == 1


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Redis server of this test's own, so it can be killed and restarted."""
    require_redis()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not on PATH"
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
            "no", "--dir", str(tmp_path)]  # fmt: skip
    state: dict[str, Any] = {"port": port}

    def start() -> None:
        state["process"] = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_for_port(port, state["process"])

    def stop() -> None:
        state["process"].kill()
        state["process"].wait()

    state["start"], state["stop"] = start, stop
    start()
    yield state
    stop()


async def test_a_redis_restart_loses_no_guarantee(
    payments_url: str, tmp_path: Path, private_redis: dict[str, Any]
) -> None:
    url = f"redis://127.0.0.1:{private_redis['port']}/0"
    async with running_stack(payments_url, tmp_path, redis_url=url) as stack:
        first = await stack.pay(key="p")
        private_redis["stop"]()  # Redis dies: requests carry on in SQL
        down = await stack.pay(key="p")
        assert down.content == first.content
        created = await stack.pay(key="q")
        assert created.status_code == 201
        private_redis["start"]()  # ...and comes back empty
        for key, answer in (("p", first), ("q", created)):
            again = await stack.pay(key=key)
            assert again.content == answer.content
            assert again.headers["idempotent-replayed"] == "true"
        assert await stack.count("payments") == 2
        assert await stack.ledger_violations() == []
