"""The Redis stores beyond the conformance suite: what only Redis has to get right.

Unreachable servers, the record's layout and TTL, the number of commands a request costs, and
wait mode woken by pub/sub. Everything runs on Redis servers of our own (``tests.redis_cluster``):
a private standalone node and the session's 3-master cluster, since the shared server on 6379
also runs benchmarks that flush its script cache and would blur any command count.
"""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from oncepay.errors import ConfigurationError, StoreUnavailable
from oncepay.idempotency import Engine, Execute, Replay, StoredResponse, fingerprint
from oncepay.idempotency.records import Claim, Record, RecordState, next_fence
from oncepay.idempotency.stores import Store, store_from_url
from oncepay.idempotency.stores.base import DEFAULT_PURGE_BATCH, Watch
from oncepay.idempotency.stores.redis import RedisClusterStore, RedisStore
from tests.clock import FakeClock
from tests.conftest import StoreSpec
from tests.redis_cluster import running_server
from tests.servers import require_redis

SCOPE = "merchant-a"
FP = fingerprint("POST", "/v1/payments", b'{"amount":100}')
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), b'{"id":"pay_1"}\x00\xff')
TTL = 600.0
LEASE = 30.0
# How long a test waits for something that happens in milliseconds before calling it a hang.
PATIENCE = 10.0


class Commands(Protocol):
    """redis-py's clients, seen through the one method these tests call on them."""

    async def execute_command(self, *args: Any, **options: Any) -> Any: ...

    async def aclose(self) -> None: ...


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis_url() -> Iterator[str]:
    require_redis()  # the binaries ship with the server
    with running_server() as url:
        yield url


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.cluster]),
    ]
)
def spec(request: pytest.FixtureRequest) -> StoreSpec:
    fixture = "private_redis_url" if request.param == "redis" else "redis_cluster_url"
    url = request.getfixturevalue(fixture)
    return StoreSpec(request.param, url, {"prefix": f"oncepay-test:{uuid.uuid4().hex[:12]}:"})


@pytest.fixture
async def store(spec: StoreSpec) -> AsyncIterator[RedisStore | RedisClusterStore]:
    built = spec.build()
    assert isinstance(built, RedisStore | RedisClusterStore)
    try:
        yield built
    finally:
        await built.aclose()


def engine_for(store: Any, clock: FakeClock, *, wait: float = 0.0) -> Engine:
    return Engine(store, ttl=TTL, lease=LEASE, wait=wait, clock=clock)


async def executed(engine: Engine, key: str = "k1") -> Execute:
    decision = await engine.begin(SCOPE, key, FP)
    assert isinstance(decision, Execute), decision
    return decision


# -- servers seen from outside the store -----------------------------------------------------


@asynccontextmanager
async def inspector(spec: StoreSpec) -> AsyncIterator[Commands]:
    """A plain redis-py client on the spec's server or cluster, routed by key."""
    client: Commands
    if spec.backend == "cluster":
        client = RedisCluster.from_url(spec.url.replace("redis+cluster://", "redis://"))
    else:
        client = Redis.from_url(spec.url)
    try:
        yield client
    finally:
        await client.aclose()


async def node_ports(spec: StoreSpec) -> list[int]:
    """Every master's port: the one server, or each master of the cluster."""
    if spec.backend != "cluster":
        return [int(spec.url.rsplit(":", 1)[1].split("/")[0])]
    cluster = RedisCluster.from_url(spec.url.replace("redis+cluster://", "redis://"))
    try:
        await cluster.initialize()
        return sorted(int(node.port) for node in cluster.get_primaries())
    finally:
        await cluster.aclose()


async def on_every_node(spec: StoreSpec, *command: Any) -> list[Any]:
    replies = []
    for port in await node_ports(spec):
        client: Commands = Redis(port=port)
        try:
            replies.append(await client.execute_command(*command))
        finally:
            await client.aclose()
    return replies


async def subscribers(spec: StoreSpec, channel: str) -> int:
    """How many connections the servers hold subscribed to ``channel``."""
    numsub = "SHARDNUMSUB" if spec.backend == "cluster" else "NUMSUB"
    replies = await on_every_node(spec, "PUBSUB", numsub, channel)
    return sum(int(reply[1]) for reply in replies)


async def until(condition: Any, what: str) -> None:
    """Poll an async condition (a server-side state) until it holds: never a blind sleep."""
    try:
        async with asyncio.timeout(PATIENCE):
            # The state lives in the server, so there is no event to await: re-check every
            # 10 ms (a local round trip takes ~0.1 ms).
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not within {PATIENCE} s: {what}")


class ServerLog:
    """What clients send to some Redis nodes, read from each node's MONITOR feed.

    ``commands()`` returns the names of the commands sent since the last call, leaving out
    those run inside scripts and the log's own. Each feed is read up to an ECHO marker the log
    sends after the fact, so the count never depends on timing.
    """

    def __init__(self, ports: list[int]) -> None:
        self._ports = ports
        self._stack = AsyncExitStack()
        self._feeds: list[tuple[Any, Commands]] = []

    async def __aenter__(self) -> ServerLog:
        for port in self._ports:
            monitor = await self._stack.enter_async_context(Redis(port=port).monitor())
            marker: Commands = Redis(port=port)
            self._stack.push_async_callback(marker.aclose)
            self._feeds.append((monitor, marker))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def commands(self) -> list[str]:
        names: list[str] = []
        for monitor, marker in self._feeds:
            names += await self._read_until_marker(monitor, marker)
        return names

    @staticmethod
    async def _read_until_marker(monitor: Any, marker: Commands) -> list[str]:
        token = f"marker-{uuid.uuid4().hex}"
        await marker.execute_command("ECHO", token)
        seen = []
        async with asyncio.timeout(PATIENCE):
            while token not in (entry := await monitor.next_command())["command"]:
                seen.append(entry)
        own = (entry["client_address"], entry["client_port"])  # the marker's connection
        return [
            e["command"].split()[0].upper()
            for e in seen
            if e["client_type"] != "lua" and (e["client_address"], e["client_port"]) != own
        ]


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- construction and unreachable servers --------------------------------------------------------


def test_urls_pick_the_redis_store_classes() -> None:
    assert isinstance(store_from_url("redis://127.0.0.1:6379/0"), RedisStore)
    assert isinstance(store_from_url("rediss://127.0.0.1:6380/0"), RedisStore)
    assert isinstance(store_from_url("redis+cluster://127.0.0.1:7000"), RedisClusterStore)
    from_query = store_from_url("redis+cluster://127.0.0.1:7000?prefix=app:")
    assert isinstance(from_query, RedisClusterStore)
    assert from_query.prefix == "app:"


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: RedisStore.from_url("redis://h:1/0", prefix="a:{b}:"), id="braces"),
        pytest.param(lambda: RedisClusterStore.from_url("redis://h:1"), id="not-cluster-url"),
        pytest.param(lambda: RedisStore.from_url("http://h:1"), id="not-redis-url"),
        pytest.param(lambda: RedisStore.from_url("redis://h:1/0", timeout=0), id="no-timeout"),
    ],
)
def test_bad_configuration_is_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ConfigurationError):
        build()


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:{port}/0", "redis+cluster://127.0.0.1:{port}"],
    ids=["redis", "cluster"],
)
async def test_unreachable_redis_is_store_unavailable(url: str, clock: FakeClock) -> None:
    store = store_from_url(url.format(port=closed_port()), prefix="oncepay-test:")
    now = clock.now
    try:
        with pytest.raises(StoreUnavailable):
            await Engine(store, clock=clock).begin(SCOPE, "k1", FP)
        with pytest.raises(StoreUnavailable):
            await store.complete(SCOPE, "k1", 1, RESPONSE, now=now)
        with pytest.raises(StoreUnavailable):
            await store.release(SCOPE, "k1", 1, now=now)
        with pytest.raises(StoreUnavailable):
            await store.checkpoint(SCOPE, "k1", 1, "started", now=now, lease=LEASE)
        with pytest.raises(StoreUnavailable):
            await store.get(SCOPE, "k1")
        with pytest.raises(StoreUnavailable):
            async with store.watch(SCOPE, "k1"):
                pass
    finally:
        await store.aclose()


# -- the record: one hash, hash-tagged, with a TTL Redis enforces ----------------------------------


async def test_a_record_is_one_hash_named_by_a_digest_of_scope_and_key(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.checkpoint(first.ticket, "payment_created")
    await engine.complete(first.ticket, RESPONSE)
    name = store.record_name(SCOPE, "k1")
    assert re.fullmatch(re.escape(store.prefix) + r"\{[0-9a-f]{64}\}", name)
    async with inspector(spec) as redis:
        fields = await redis.execute_command("HGETALL", name)
    assert fields == {
        b"scope": SCOPE.encode(),
        b"key": b"k1",
        b"fingerprint": FP.encode(),
        b"state": b"completed",
        b"fence": str(first.ticket.fence).encode(),
        b"created_at": fields[b"created_at"],
        b"lease_expires_at": fields[b"lease_expires_at"],
        b"expires_at": fields[b"expires_at"],
        b"recovery_point": b"payment_created",
        b"status": b"201",
        b"headers": RESPONSE.headers_json().encode(),
        b"body": RESPONSE.body,
    }


async def test_a_fresh_claim_reports_the_record_exactly_as_redis_keeps_it(
    store: RedisStore | RedisClusterStore,
) -> None:
    # The claim script answers a fresh claim with its fence alone; the rest is computed here.
    # Odd clock and lease values: the doubles must match Lua's to the bit.
    now, lease, ttl = 1_763_000_000.123_456_7, 0.1 + 0.2, 86_400.000_000_1
    claim = await store.claim(SCOPE, "fresh", FP, now=now, lease=lease, ttl=ttl)
    assert claim.claimed
    assert await store.get(SCOPE, "fresh") == claim.record
    again = await store.claim(SCOPE, "fresh", FP, now=now + 0.01, lease=lease, ttl=ttl)
    assert not again.claimed  # existing: the full record, read back field by field
    assert again.record == claim.record


def test_stored_headers_are_the_json_they_always_were() -> None:
    import json

    headers = (("content-type", "application/json"), ("x-\u00e9", '"q"\n\u2603\x7f'), ("a", ""))
    for response in (StoredResponse(200, headers), StoredResponse(204)):
        encoded = response.headers_json()
        assert encoded == json.dumps(response.headers, separators=(",", ":"))
        assert StoredResponse.parse_headers(encoded) == response.headers


def test_braces_in_scope_or_key_never_reach_the_hash_tag() -> None:
    store = RedisClusterStore.from_url("redis+cluster://127.0.0.1:7000", prefix="p:")
    name = store.record_name("{tenant}", "{key}:{x}")
    digest = name.removeprefix("p:{").removesuffix("}")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert key_slot(name.encode()) == key_slot(digest.encode())
    # (scope, key) pairs that concatenate alike still name two records
    assert store.record_name("a:b", "c") != store.record_name("a", "b:c")


@pytest.mark.cluster
async def test_records_spread_over_slots_and_masters(redis_cluster_url: str) -> None:
    spec = StoreSpec("cluster", redis_cluster_url, {"prefix": f"spread-{uuid.uuid4().hex}:"})
    store = spec.build()
    assert isinstance(store, RedisClusterStore)
    keys = [f"k{i}" for i in range(30)]
    try:
        for key in keys:
            await store.claim(SCOPE, key, FP, now=FakeClock().now, lease=LEASE, ttl=TTL)
        slots = {key_slot(store.record_name(SCOPE, key).encode()) for key in keys}
        assert len(slots) == len(keys)  # one slot per record (these 30 do not collide)
        per_node = await on_every_node(spec, "KEYS", f"{store.prefix}*")
        assert len(per_node) == 3
        assert all(per_node), "every master holds some of the records"
        assert sum(len(names) for names in per_node) == len(keys)
    finally:
        await store.aclose()


async def _pttl(spec: StoreSpec, name: str) -> int:
    async with inspector(spec) as redis:
        return int(await redis.execute_command("PTTL", name))


async def test_records_carry_a_real_ttl_that_completion_and_release_keep(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    completed, released = await executed(engine, "done"), await executed(engine, "gone")
    for key in ("done", "gone"):
        assert TTL * 1000 - 5_000 < await _pttl(spec, store.record_name(SCOPE, key)) <= TTL * 1000
    await engine.complete(completed.ticket, RESPONSE)
    await engine.release(released.ticket)
    for key in ("done", "gone"):  # the TTL counts from the first claim: never renewed
        assert TTL * 1000 - 5_000 < await _pttl(spec, store.record_name(SCOPE, key)) <= TTL * 1000
    tombstone = await store.get(SCOPE, "gone")
    assert tombstone is not None
    assert tombstone.state is RecordState.RELEASED
    assert await store.purge_expired(now=clock.now + TTL) == 0  # Redis expires by itself


async def test_times_and_fences_round_trip_exactly(
    store: RedisStore | RedisClusterStore, spec: StoreSpec
) -> None:
    # A time whose millisecond count needs 13 digits (tostring() in Lua would print 4.1e+12)
    # and a fraction a 6-decimal format would round.
    now = 4_102_444_800.123_456_7
    first = await store.claim(SCOPE, "k1", FP, now=now, lease=LEASE, ttl=TTL)
    assert first.record.fence == next_fence(None, now) == 4_102_444_800_123
    assert (first.record.created_at, first.record.lease_expires_at, first.record.expires_at) == (
        now,
        now + LEASE,
        now + TTL,
    )
    await store.release(SCOPE, "k1", first.record.fence, now=now)
    again = await store.claim(SCOPE, "k1", FP, now=now, lease=LEASE, ttl=TTL)
    assert again.record.fence == first.record.fence + 1  # the tombstone carries the fence on
    async with inspector(spec) as redis:
        raw = await redis.execute_command("HGET", store.record_name(SCOPE, "k1"), "fence")
        assert raw == b"4102444800124"
        await redis.execute_command("DEL", store.record_name(SCOPE, "k1"))  # as at its TTL
    later = now + 1
    fresh = await store.claim(SCOPE, "k1", FP, now=later, lease=LEASE, ttl=TTL)
    assert fresh.record.fence == next_fence(None, later)


# -- round trips -------------------------------------------------------------------------------


async def test_a_replay_costs_one_command_and_a_new_request_two(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)  # loads the scripts and opens the connection
    await engine.complete(first.ticket, RESPONSE)
    async with ServerLog(await node_ports(spec)) as log:
        assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
        assert await log.commands() == ["EVALSHA"]
        clock.advance(TTL)  # the record has expired: the same key is a new request
        again = await executed(engine)
        await engine.complete(again.ticket, RESPONSE)
        assert await log.commands() == ["EVALSHA", "EVALSHA"]


async def test_a_lost_script_cache_costs_one_eval(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    first = await executed(engine)
    await engine.complete(first.ticket, RESPONSE)
    await on_every_node(spec, "SCRIPT", "FLUSH")  # as after a restart or a failover
    async with ServerLog(await node_ports(spec)) as log:
        assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
        assert await log.commands() == ["EVALSHA", "EVAL"]  # NOSCRIPT, then the script itself
        assert isinstance(await engine.begin(SCOPE, "k1", FP), Replay)
        assert await log.commands() == ["EVALSHA"]


# -- wait mode ---------------------------------------------------------------------------------


class ObservedStore:
    """A store that counts claims and reports each time a watch starts to wait."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.claims = 0
        self.waits: asyncio.Queue[None] = asyncio.Queue()

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        self.claims += 1
        return await self.inner.claim(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        await self.inner.complete(scope, key, fence, response, now=now)

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        await self.inner.release(scope, key, fence, now=now)

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        await self.inner.checkpoint(scope, key, fence, recovery_point, now=now, lease=lease)

    async def get(self, scope: str, key: str) -> Record | None:
        return await self.inner.get(scope, key)

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        return await self.inner.purge_expired(now=now, limit=limit)

    @asynccontextmanager
    async def watch(self, scope: str, key: str) -> AsyncIterator[Watch]:
        async with self.inner.watch(scope, key) as watch:
            yield _ReportingWatch(watch, self.waits)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _ReportingWatch:
    def __init__(self, inner: Watch, waits: asyncio.Queue[None]) -> None:
        self._inner = inner
        self._waits = waits

    async def wait(self, timeout: float) -> None:
        self._waits.put_nowait(None)
        await self._inner.wait(timeout)


async def test_a_waiter_is_woken_by_the_notification_not_by_polling(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    waiting_store = ObservedStore(spec.build())  # another connection, as in another process
    channel = store.record_name(SCOPE, "k1")
    try:
        first = await executed(engine_for(store, clock))
        waiter = asyncio.create_task(
            engine_for(waiting_store, clock, wait=30).begin(SCOPE, "k1", FP)
        )
        await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)
        assert await subscribers(spec, channel) == 1  # parked on a subscription, not a timer
        await engine_for(store, clock).complete(first.ticket, RESPONSE)
        decision = await asyncio.wait_for(waiter, PATIENCE)
        assert isinstance(decision, Replay)
        assert decision.response == RESPONSE
        # one claim before subscribing, one after, one once notified: no poll in between
        assert waiting_store.claims == 3
        assert waiting_store.waits.empty()  # it waited exactly once
        await until(lambda: _none_subscribed(spec, channel), "the last watch unsubscribes")
    finally:
        await waiting_store.aclose()


async def _none_subscribed(spec: StoreSpec, channel: str) -> bool:
    return await subscribers(spec, channel) == 0


async def test_a_release_wakes_the_waiter_to_execute(
    store: RedisStore | RedisClusterStore, clock: FakeClock
) -> None:
    waiting_store = ObservedStore(store)
    first = await executed(engine_for(store, clock))
    waiter = asyncio.create_task(engine_for(waiting_store, clock, wait=30).begin(SCOPE, "k1", FP))
    await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)
    await engine_for(store, clock).release(first.ticket)
    decision = await asyncio.wait_for(waiter, PATIENCE)
    assert isinstance(decision, Execute)
    assert decision.ticket.fence == first.ticket.fence + 1
    assert waiting_store.claims == 3


async def test_many_waiters_share_one_subscription(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    waiting_store = ObservedStore(store)
    first = await executed(engine_for(store, clock))
    engine = engine_for(waiting_store, clock, wait=30)
    waiters = [asyncio.create_task(engine.begin(SCOPE, "k1", FP)) for _ in range(5)]
    for _ in waiters:
        await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)
    assert await subscribers(spec, store.record_name(SCOPE, "k1")) == 1
    await engine_for(store, clock).complete(first.ticket, RESPONSE)
    decisions = await asyncio.wait_for(asyncio.gather(*waiters), PATIENCE)
    assert all(isinstance(d, Replay) for d in decisions)


async def test_a_waiter_resubscribes_when_its_pubsub_connection_drops(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    waiting_store = ObservedStore(spec.build())
    try:
        first = await executed(engine_for(store, clock))
        waiter = asyncio.create_task(
            engine_for(waiting_store, clock, wait=30).begin(SCOPE, "k1", FP)
        )
        await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)
        await on_every_node(spec, "CLIENT", "KILL", "TYPE", "pubsub")
        # Woken by the loss, it subscribes afresh, reads again and waits once more ...
        await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)
        assert await subscribers(spec, store.record_name(SCOPE, "k1")) == 1
        # ... so the completion still reaches it, long before its 30 s bound.
        await engine_for(store, clock).complete(first.ticket, RESPONSE)
        assert isinstance(await asyncio.wait_for(waiter, PATIENCE), Replay)
    finally:
        await waiting_store.aclose()


async def test_watches_coming_and_going_leave_a_waiters_subscription_intact(
    store: RedisStore | RedisClusterStore, spec: StoreSpec, clock: FakeClock
) -> None:
    # Subscriptions are not counted by the server: if one leaving watch unsubscribed the channel
    # under another, that one would miss its notification and wait out its whole bound.
    waiting_store = ObservedStore(store)
    channel = store.record_name(SCOPE, "k1")
    first = await executed(engine_for(store, clock))
    waiter = asyncio.create_task(engine_for(waiting_store, clock, wait=30).begin(SCOPE, "k1", FP))
    await asyncio.wait_for(waiting_store.waits.get(), PATIENCE)

    async def come_and_go() -> None:
        for _ in range(20):
            async with store.watch(SCOPE, "k1"):
                await asyncio.sleep(0)  # let the others interleave their joins and leaves

    await asyncio.gather(*(come_and_go() for _ in range(10)))
    await until(lambda: _subscribed_once(spec, channel), "only the waiter stays subscribed")
    await engine_for(store, clock).complete(first.ticket, RESPONSE)
    assert isinstance(await asyncio.wait_for(waiter, PATIENCE), Replay)


async def _subscribed_once(spec: StoreSpec, channel: str) -> bool:
    return await subscribers(spec, channel) == 1
