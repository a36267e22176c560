"""The ASGI middleware's short way on a Redis store (``_ScriptedMiddleware``): chosen only in
the usual configuration, and never a different answer, record or replay from the general way.

Runs on a private Redis server: a test here flushes the script cache, which would blur the
command counts of other suites on the shared one.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis.asyncio import Redis

from oncepay.http import IdempotencyMiddleware
from oncepay.http.asgi import _ScriptedMiddleware
from oncepay.idempotency import RecordState
from oncepay.idempotency.stores import store_from_url
from oncepay.idempotency.stores.redis import RedisStore
from oncepay.insight.usage_log import UsageLog
from tests.http.apps import Executions, starlette_app
from tests.http.test_asgi import _scope, raw_call
from tests.processes import free_port
from tests.redis_cluster import running_server
from tests.servers import require_redis

pytestmark = pytest.mark.redis

BODY = b'{"amount":100,"currency":"eur"}'


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    require_redis()
    with running_server() as url:
        yield url


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    built = store_from_url(redis_url, prefix=f"oncepay-test:{uuid.uuid4().hex[:12]}:")
    assert isinstance(built, RedisStore)
    yield built
    await built.aclose()


@pytest.fixture
def runs() -> Executions:
    return Executions()


def usual(runs: Executions, store: Any, **options: Any) -> Any:
    return IdempotencyMiddleware(starlette_app(runs), store=store, **options)


def general(runs: Executions, store: Any) -> Any:
    """The same policy the general way: an alias header the short way does not handle."""
    app = IdempotencyMiddleware(starlette_app(runs), store=store, aliases=["x-idempotency-key"])
    assert type(app) is IdempotencyMiddleware
    return app


async def call(app: Any, key: str, path: str = "/payments", **headers: str) -> dict[str, Any]:
    """One request with the whole body in one message: (status, headers, body) as sent."""
    sent = await raw_call(
        app,
        [{"type": "http.request", "body": BODY}],
        path=path,
        idempotency_key=key,
        content_type="application/json",
        **headers,
    )
    assert sent[0]["type"] == "http.response.start"
    assert {m["type"] for m in sent[1:]} == {"http.response.body"}
    assert not sent[-1].get("more_body", False)
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return {"status": sent[0]["status"], "headers": sent[0]["headers"], "body": body}


def test_only_the_usual_configuration_on_redis_takes_the_short_way(
    store: RedisStore, runs: Executions, tmp_path: Any
) -> None:
    assert type(usual(runs, store)) is _ScriptedMiddleware
    assert type(usual(runs, store, redact=lambda r: r)) is _ScriptedMiddleware
    assert type(usual(runs, "memory://")) is IdempotencyMiddleware
    assert type(usual(runs, store, route_ttl={"/pay*": 600})) is IdempotencyMiddleware
    log = UsageLog(tmp_path / "usage.jsonl")
    assert type(usual(runs, store, usage_log=log)) is IdempotencyMiddleware
    log.close()


@pytest.mark.parametrize("path", ["/payments", "/headers", "/stream", "/status/404"])
async def test_both_ways_store_and_replay_the_same_answer(
    store: RedisStore, runs: Executions, path: str
) -> None:
    short, long = usual(runs, store), general(runs, store)
    first_short = await call(short, "k-short", path)
    first_long = await call(long, "k-long", path)
    assert first_short["status"] == first_long["status"]
    a = await store.get(_scope(), "k-short")
    b = await store.get(_scope(), "k-long")
    assert a is not None
    assert b is not None
    assert a.state is b.state is RecordState.COMPLETED
    assert a.response is not None
    assert b.response is not None
    assert (a.response.status, a.response.headers) == (b.response.status, b.response.headers)
    assert all(name not in ("set-cookie", "date") for name, _ in a.response.headers)
    executed = sum(runs.values())
    for key in ("k-short", "k-long"):  # every replay alike, whichever way it goes
        replays = [await call(short, key, path), await call(long, key, path)]
        assert replays[0] == replays[1]
        assert (b"idempotent-replayed", b"true") in replays[0]["headers"]
    assert sum(runs.values()) == executed


async def test_the_other_rows_of_the_table_on_the_short_way(
    store: RedisStore, runs: Executions
) -> None:
    app = usual(runs, store)
    assert (await call(app, "k1"))["status"] == 201
    reused = await raw_call(
        app, [{"type": "http.request", "body": b'{"amount":5}'}], idempotency_key="k1"
    )
    assert reused[0]["status"] == 422
    assert (await call(app, "k2", "/fail"))["status"] == 502  # released: a retry runs again
    assert (await call(app, "k2", "/fail"))["status"] == 502
    assert runs["fail"] == 2
    assert (await call(app, "k3", "/status/429"))["status"] == 429  # not now: not stored
    record = await store.get(_scope(), "k3")
    assert record is not None
    assert record.state is RecordState.RELEASED
    bad = await raw_call(app, [{"type": "http.request", "body": BODY}], idempotency_key=" k4")
    assert (await call(app, "k4"))["status"] == 201  # the same key, once spaces are stripped
    assert bad[0]["status"] == 201
    assert runs["pay"] == 2


async def test_a_request_in_several_messages_or_lines_is_the_same_request(
    store: RedisStore, runs: Executions
) -> None:
    app = usual(runs, store)
    chunked = [
        {"type": "http.request", "body": BODY[:10], "more_body": True},
        {"type": "http.request", "body": BODY[10:], "more_body": False},
    ]
    assert (await raw_call(app, chunked, idempotency_key="k1"))[0]["status"] == 201
    replay = await call(app, "k1", accept="text/plain")
    assert (b"idempotent-replayed", b"true") in replay["headers"]
    scope_headers = [
        (b"authorization", b"Bearer tenant-a"),
        (b"idempotency-key", b"k1"),
        (b"accept", b"a"),
        (b"accept", b"b"),
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/payments",
        "query_string": b"",
        "headers": scope_headers,
    }
    await app(scope, receive, send)  # a repeated header line: the general way, same key
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]
    assert runs["pay"] == 1


async def test_a_body_over_the_limit_is_413_on_the_short_way(
    store: RedisStore, runs: Executions
) -> None:
    app = usual(runs, store, max_body=8)
    declared = await raw_call(
        app,
        [{"type": "http.request", "body": BODY}],
        idempotency_key="k1",
        content_length=str(len(BODY)),
    )
    undeclared = await raw_call(app, [{"type": "http.request", "body": BODY}], idempotency_key="k2")
    assert declared[0]["status"] == undeclared[0]["status"] == 413
    assert runs["pay"] == 0
    assert await store.get(_scope(), "k1") is None


async def test_headers_sent_as_lists_are_stored_and_replayed(
    store: RedisStore, runs: Executions
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        runs["lists"] += 1
        headers = [[b"content-type", b"text/plain"], [b"x-run", str(runs["lists"]).encode()]]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = IdempotencyMiddleware(app, store=store)
    assert (await call(middleware, "k1"))["status"] == 200
    replay = await call(middleware, "k1")
    assert replay["headers"][:2] == [(b"content-type", b"text/plain"), (b"x-run", b"1")]
    assert runs["lists"] == 1


async def test_a_lost_script_cache_costs_a_request_nothing(
    store: RedisStore, runs: Executions, redis_url: str
) -> None:
    app = usual(runs, store)
    assert (await call(app, "k1"))["status"] == 201
    server = Redis.from_url(redis_url)
    try:
        await server.script_flush()  # as after a restart or a failover: NOSCRIPT, then EVAL
        replay = await call(app, "k1")
        await server.script_flush()
        fresh = await call(app, "k2")
    finally:
        await server.aclose()
    assert (b"idempotent-replayed", b"true") in replay["headers"]
    assert fresh["status"] == 201
    assert (b"idempotent-replayed", b"true") in (await call(app, "k2"))["headers"]
    assert runs["pay"] == 2


async def test_redis_down_is_503_and_fail_open_runs_the_app(runs: Executions) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    refused = await call(usual(runs, dead), "k1")
    assert refused["status"] == 503
    assert b"idempotency_store_unavailable" in refused["body"]
    assert runs["pay"] == 0
    assert (await call(usual(runs, dead, fail_open=True), "k1"))["status"] == 201
    assert runs["pay"] == 1


@pytest.mark.cluster
async def test_the_short_way_on_a_cluster_store(redis_cluster_url: str, runs: Executions) -> None:
    prefix = f"oncepay-test:{uuid.uuid4().hex[:12]}:"
    store = store_from_url(redis_cluster_url, prefix=prefix)
    try:
        app = usual(runs, store)
        assert type(app) is _ScriptedMiddleware
        first = await call(app, "k1", "/headers")
        replay = await call(app, "k1", "/headers")
        reused = await raw_call(
            app, [{"type": "http.request", "body": b"{}"}], idempotency_key="k1"
        )
    finally:
        await store.aclose()
    assert first["status"] == replay["status"] == 200
    assert replay["body"] == first["body"]
    assert (b"idempotent-replayed", b"true") in replay["headers"]
    assert reused[0]["status"] == 422
    assert runs["headers"] == 1


async def test_the_store_encodes_the_short_ways_commands_as_hiredis_would(redis_url: str) -> None:
    from oncepay._drivers import resp
    from oncepay.idempotency.stores.redis import _Packed

    sent: list[bytes] = []

    class Recording(resp.RespClient):
        def execute_packed(self, command: bytes) -> Any:
            sent.append(command)
            return super().execute_packed(command)

    store = store_from_url(redis_url, prefix="oncepay-test:\u00e9t\u00e9:")
    assert isinstance(store, RedisStore)
    await store._commands.aclose()
    client = Recording.from_url(redis_url, timeout=2.0)
    store._commands = client
    store._packed = _Packed.of(client, store._scripts)
    scripts = store._scripts
    try:
        # The server's script cache, filled whatever ran on it before (the short way's
        # commands are EVALSHA alone; on NOSCRIPT its caller goes the general way).
        for script in (scripts.claim, scripts.complete):
            assert (
                await client.execute_command("SCRIPT", "LOAD", script.source) == script.sha.encode()
            )
        sent.clear()
        scope, key, fp, now = "s\u00e9", "k-1", "f" * 64, 1733480000.123456
        reply = await store.claim_reply(scope, key, fp, now, "60.0", "86400.0")
        fence = reply[1]
        done = await store.complete_reply(scope, key, fence, 201, '[["a","\u00e9"]]', b"\x00\xff")
    finally:
        await store.aclose()
    assert reply[0] == b"created"
    assert done == 1
    name = store.record_name(scope, key)
    claim = ("EVALSHA", scripts.claim.sha, 1, name, scope, key, fp, now, "60.0", "86400.0")
    complete = (
        *("EVALSHA", scripts.complete.sha, 1, name, fence, "201"),
        *('[["a","\u00e9"]]', b"\x00\xff"),
    )
    assert sent == [resp._pack_command(claim), resp._pack_command(complete)]


async def test_a_completion_that_lost_its_lease_is_answered_as_the_general_way_does(
    store: RedisStore, redis_url: str
) -> None:
    """The app's record taken over while it runs: the short way's completion reads the
    script's 0 as LeaseLost and answers what the general way answers."""
    server = Redis.from_url(redis_url)

    def taking_over(key: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()
            name = store.record_name(_scope(), key)
            await server.hset(name, "fence", "1")  # a newer holder's token, not ours
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        return app

    try:
        short = IdempotencyMiddleware(taking_over("k-short"), store=store)
        long = IdempotencyMiddleware(
            taking_over("k-long"), store=store, aliases=["x-idempotency-key"]
        )
        assert type(short) is _ScriptedMiddleware
        assert type(long) is IdempotencyMiddleware
        answers = [await call(short, "k-short"), await call(long, "k-long")]
    finally:
        await server.aclose()
    assert answers[0]["status"] == answers[1]["status"] == 409
    problems = [json.loads(answer["body"]) for answer in answers]
    assert re.fullmatch(r"token \d+ no longer holds key 'k-short'", problems[0].pop("detail"))
    assert re.fullmatch(r"token \d+ no longer holds key 'k-long'", problems[1].pop("detail"))
    assert problems[0] == problems[1]
    headers = [[h for h in a["headers"] if h[0] != b"content-length"] for a in answers]
    assert headers[0] == headers[1]
    record = await store.get(_scope(), "k-short")
    assert record is not None
    assert record.state is RecordState.EXECUTING  # not completed by the stale token


async def test_a_completion_the_server_refuses_is_a_503_on_the_short_way(
    store: RedisStore, runs: Executions
) -> None:
    from oncepay._drivers import resp

    client = store._commands
    assert isinstance(client, resp.RespClient)
    refused: list[bytes] = []

    def refusing(command: bytes) -> Any:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(resp.ResponseError("ERR out of memory"))
        refused.append(command)
        return future

    app = usual(runs, store)
    assert (await call(app, "k0"))["status"] == 201  # connected, scripts loaded
    claim = client.execute_packed
    sends = iter([claim, refusing])

    def in_turn(command: bytes) -> Any:  # the claim as it is, then the refused completion
        return next(sends)(command)

    client.execute_packed = in_turn  # type: ignore[method-assign]
    answer = await call(app, "k1")
    assert answer["status"] == 503
    assert b"idempotency_store_unavailable" in answer["body"]
    assert len(refused) == 1
    assert runs["pay"] == 2
    record = await store.get(_scope(), "k1")
    assert record is not None
    assert record.state is RecordState.EXECUTING  # stays locked until its lease lapses


@pytest.mark.parametrize("ns", [1_733_480_000_123_456_789, 1_733_480_000_100_000_000])
async def test_the_default_clock_is_claimed_to_the_bit(
    store: RedisStore, runs: Executions, ns: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the default clock the short way reads the time in nanoseconds and sends the claim's
    ``now`` as an exact decimal text: the script must read it as the very double the engine
    holds (the record's times, %.17g, are ``now`` plus the lease and TTL to the bit)."""
    import time

    monkeypatch.setattr(time, "time_ns", lambda: ns)
    app = usual(runs, store)
    assert type(app) is _ScriptedMiddleware
    assert app.gate.engine.clock is time.time
    answer = await call(app, "k-clock")
    assert answer["status"] == 201
    record = await store.get(_scope(), "k-clock")
    assert record is not None
    now = ns / 1_000_000_000
    engine = app.gate.engine
    assert (record.created_at, record.lease_expires_at, record.expires_at) == (
        now,
        now + engine.lease,
        now + engine.ttl,
    )


async def test_the_short_way_holds_a_body_complete_by_its_length_until_stored(
    store: RedisStore, redis_url: str
) -> None:
    """The black-box review's finding on the short way too: a body whose Content-Length is
    reached before an empty last message is held with that message and sent once stored."""
    from tests.http.test_asgi import _whole_body_then_an_empty_last_message as app

    working = IdempotencyMiddleware(app, store=store)
    assert isinstance(working, _ScriptedMiddleware)
    sent = await raw_call(working, [{"type": "http.request", "body": b"{}"}], idempotency_key="w")
    assert sent[0]["status"] == 201
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b'{"ok":true}'
    record = await store.get(_scope(), "w")
    assert record is not None
    assert record.state is RecordState.COMPLETED
    assert record.response is not None
    assert record.response.body == b'{"ok":true}'
