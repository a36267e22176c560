"""SPEC §2's decision table through the ASGI middleware, in front of real Starlette and
FastAPI apps, on real stores."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.errors import ConfigurationError, LeaseLost, StoreUnavailable
from oncepay.http import IdempotencyMiddleware
from oncepay.idempotency import Engine, RecordState, StoredResponse
from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock
from tests.conftest import make_spec
from tests.http.apps import Executions, fastapi_app, starlette_app
from tests.signalling import SignallingStore

AUTH = {"authorization": "Bearer tenant-a"}


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    built = make_spec(request, request.param, tmp_path).build()
    yield built
    await built.aclose()


@pytest.fixture
def runs() -> Executions:
    return Executions()


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture(params=["starlette", "fastapi"])
def framework(request: pytest.FixtureRequest) -> Any:
    return starlette_app if request.param == "starlette" else fastapi_app


@pytest.fixture
def make_client(store: Store, runs: Executions, framework: Any) -> Any:
    def make(**options: Any) -> httpx.AsyncClient:
        return client_for(IdempotencyMiddleware(framework(runs), store=store, **options))

    return make


def post(client: httpx.AsyncClient, path: str, key: str | None, body: Any = None, **kw: Any) -> Any:
    headers = {**AUTH, **kw.pop("headers", {})}
    if key is not None:
        headers["idempotency-key"] = key
    return client.post(
        path, json=body if body is not None else {"amount": 100}, headers=headers, **kw
    )


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert (problem["status"], problem["code"]) == (status, code)
    assert problem["detail"]
    return problem


# -- rows of the decision table ----------


async def test_managed_request_without_a_key_is_400_when_required(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        assert_problem(await post(client, "/payments", None), 400, "idempotency_key_missing")
    assert runs["pay"] == 0


async def test_missing_key_passes_through_when_keys_are_optional(
    make_client: Any, runs: Executions
) -> None:
    async with make_client(required=False) as client:
        first = await post(client, "/payments", None)
        second = await post(client, "/payments", None)
    assert (first.status_code, second.status_code) == (201, 201)
    assert runs["pay"] == 2
    assert "idempotent-replayed" not in second.headers


@pytest.mark.parametrize("key", ['"unterminated', "caf\u00e9", "k" * 256, '"bad \\n"', ""])
async def test_malformed_key_is_400_and_nothing_runs(
    make_client: Any, runs: Executions, key: str
) -> None:
    async with make_client() as client:
        headers = {**AUTH, "idempotency-key": key}
        response = await client.post(
            "/payments", content=b"{}", headers={k: v.encode() for k, v in headers.items()}
        )
    assert_problem(response, 400, "idempotency_key_invalid")
    assert runs["pay"] == 0


async def test_body_over_the_limit_is_413_and_nothing_is_stored(
    make_client: Any, runs: Executions, store: Store
) -> None:
    async with make_client(max_body=1000) as client:
        response = await post(client, "/payments", "big", {"pad": "x" * 2000})
        assert_problem(response, 413, "request_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(4):
                yield b"x" * 400

        streamed = await client.post(
            "/payments", content=chunks(), headers={**AUTH, "idempotency-key": "big2"}
        )
        assert_problem(streamed, 413, "request_too_large")
    assert runs["pay"] == 0
    for key in ("big", "big2"):
        assert await store.get(_scope(), key) is None


async def test_first_request_executes_and_a_retry_replays_byte_for_byte(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        first = await post(client, "/payments", "k1")
        again = await post(client, "/payments", "k1")
    assert first.status_code == again.status_code == 201
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert first.headers["idempotency-key-expires"] == again.headers["idempotency-key-expires"]
    assert runs["pay"] == 1


async def test_quoted_and_bare_forms_of_a_key_are_the_same_key(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        await post(client, "/payments", "abc")
        again = await post(client, "/payments", '"abc"')
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["pay"] == 1


async def test_json_field_order_does_not_make_a_different_request(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        await client.post(
            "/payments", content=b'{"a":1,"b":2}', headers={**AUTH, "idempotency-key": "k"}
        )
        again = await client.post(
            "/payments", content=b'{ "b": 2, "a": 1 }', headers={**AUTH, "idempotency-key": "k"}
        )
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["pay"] == 1


async def test_same_key_different_body_is_422(make_client: Any, runs: Executions) -> None:
    async with make_client() as client:
        await post(client, "/payments", "k1", {"amount": 100})
        assert_problem(
            await post(client, "/payments", "k1", {"amount": 999}), 422, "idempotency_key_reused"
        )
        other_path = await client.patch(
            "/payments", json={"amount": 100}, headers={**AUTH, "idempotency-key": "k1"}
        )
        assert_problem(other_path, 422, "idempotency_key_reused")
    assert runs["pay"] == 1


async def test_stripe_compatible_mode_answers_with_stripes_error_object(
    make_client: Any, runs: Executions
) -> None:
    async with make_client(stripe_compatible=True) as client:
        await post(client, "/payments", "k1", {"amount": 100})
        reused = await post(client, "/payments", "k1", {"amount": 999})
        runs.hold.clear()
        slow = asyncio.create_task(post(client, "/slow", "s1"))
        await runs.held.wait()
        in_use = await post(client, "/slow", "s1")
        runs.hold.set()
        await slow
        missing = await post(client, "/payments", None)
    assert reused.status_code == 400
    assert reused.headers["content-type"] == "application/json"
    error = reused.json()["error"]
    assert set(error) == {"type", "message"}  # Stripe's reuse error carries no code
    assert (error["type"], bool(error["message"])) == ("idempotency_error", True)
    assert in_use.status_code == 409
    assert int(in_use.headers["retry-after"]) >= 1
    assert {k: v for k, v in in_use.json()["error"].items() if k != "message"} == {
        "type": "invalid_request_error", "code": "idempotency_key_in_use",
    }  # fmt: skip
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert missing.json()["error"]["code"] == "idempotency_key_missing"


async def test_same_key_while_the_first_executes_is_409_with_retry_after(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        runs.hold.clear()
        first = asyncio.create_task(post(client, "/slow", "k1"))
        await runs.held.wait()  # the first request is inside the app, holding the key
        busy = await post(client, "/slow", "k1")
        assert_problem(busy, 409, "idempotency_request_in_progress")
        assert int(busy.headers["retry-after"]) >= 1
        runs.hold.set()
        done = await first
        replay = await post(client, "/slow", "k1")
    assert done.status_code == 201
    assert replay.content == done.content
    assert runs["slow"] == 1


async def test_wait_mode_holds_the_duplicate_and_replays(store: Store, runs: Executions) -> None:
    signalling = SignallingStore(store)
    engine = Engine(signalling, wait=10.0)  # type: ignore[arg-type]
    async with client_for(IdempotencyMiddleware(starlette_app(runs), engine=engine)) as client:
        runs.hold.clear()
        first = asyncio.create_task(post(client, "/slow", "k1"))
        await runs.held.wait()
        duplicate = asyncio.create_task(post(client, "/slow", "k1"))
        await signalling.subscribed.wait()  # the duplicate is waiting on the store
        runs.hold.set()
        a, b = await first, await duplicate
    assert a.status_code == b.status_code == 201
    assert b.content == a.content
    assert runs["slow"] == 1


async def test_an_upstream_5xx_releases_the_key_so_a_retry_runs_again(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        first = await post(client, "/fail", "k1")
        second = await post(client, "/fail", "k1")
    assert first.status_code == second.status_code == 502
    assert "idempotent-replayed" not in second.headers
    assert runs["fail"] == 2


async def test_only_an_answer_stored_under_its_key_says_when_the_key_expires(
    make_client: Any, runs: Executions
) -> None:
    # A released key (a 5xx, a "not now" answer, a refusal the app marks) has no expiry to
    # tell: a retry runs again. A stored answer says when, and its replay says the same.
    async with make_client() as client:
        released = [await post(client, path, path) for path in ("/fail", "/status/429", "/refuse")]
        stored = await post(client, "/status/404", "k4")
        replayed = await post(client, "/status/404", "k4")
    assert [r.status_code for r in released] == [502, 429, 400]
    assert all("idempotency-key-expires" not in r.headers for r in released)
    assert stored.headers["idempotency-key-expires"] == replayed.headers["idempotency-key-expires"]


@pytest.mark.parametrize("status", [200, 503])
async def test_a_streamed_answer_says_when_the_key_expires_only_if_it_is_kept(
    store: Store, status: int
) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        for chunk in (b"one;", b"two;"):  # chunked: the head goes out with the first chunk
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async with client_for(IdempotencyMiddleware(app, store=store)) as client:
        first = await post(client, "/stream", "k1")
        again = await post(client, "/stream", "k1")
    assert (first.status_code, first.text) == (status, "one;two;")
    if status < 500:
        assert again.headers["idempotent-replayed"] == "true"
        assert first.headers["idempotency-key-expires"] == again.headers["idempotency-key-expires"]
    else:
        assert "idempotent-replayed" not in again.headers
        assert "idempotency-key-expires" not in first.headers


async def test_an_exception_in_the_app_releases_the_key(store: Store, runs: Executions) -> None:
    app = IdempotencyMiddleware(starlette_app(runs), store=store)
    async with client_for(app) as client:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="crashed"):
                await post(client, "/boom", "k1")
    assert runs["boom"] == 2
    record = await store.get(_scope(), "k1")
    assert record is not None
    assert record.state is RecordState.RELEASED


async def test_a_crashed_request_is_taken_over_once_its_lease_lapses(
    store: Store, runs: Executions
) -> None:
    clock = FakeClock()
    engine = Engine(store, lease=30, clock=clock)
    async with client_for(IdempotencyMiddleware(starlette_app(runs), engine=engine)) as client:
        runs.hold.clear()
        crashed = asyncio.create_task(post(client, "/slow", "k1"))
        await runs.held.wait()
        crashed.cancel()  # the worker dies mid-request, holding the key
        with pytest.raises(asyncio.CancelledError):
            await crashed
        record = await store.get(_scope(), "k1")
        assert record is not None
        assert record.state is RecordState.RELEASED  # cancellation is an exception: released
        # A harder crash leaves the record executing: simulate it with a raw claim.
        await engine.begin(_scope(), "k2", _fp("/slow"))
        assert_problem(await post(client, "/slow", "k2"), 409, "idempotency_request_in_progress")
        clock.advance(31)
        runs.hold.set()
        taken = await post(client, "/slow", "k2")
    assert taken.status_code == 201


async def test_store_outage_is_503_and_nothing_runs(runs: Executions) -> None:
    async with client_for(IdempotencyMiddleware(starlette_app(runs), store=_DownStore())) as client:
        assert_problem(await post(client, "/payments", "k1"), 503, "idempotency_store_unavailable")
    assert runs["pay"] == 0


async def test_fail_open_runs_the_app_when_the_store_is_down(runs: Executions) -> None:
    app = IdempotencyMiddleware(starlette_app(runs), store=_DownStore(), fail_open=True)
    async with client_for(app) as client:
        assert (await post(client, "/payments", "k1")).status_code == 201
    assert runs["pay"] == 1


async def test_a_response_that_cannot_be_stored_is_not_reported_as_success(
    runs: Executions,
) -> None:
    store = _CompleteFails()
    async with client_for(IdempotencyMiddleware(starlette_app(runs), store=store)) as client:
        response = await post(client, "/payments", "k1")
        assert_problem(response, 503, "idempotency_store_unavailable")
        assert_problem(
            await post(client, "/payments", "k1"), 409, "idempotency_request_in_progress"
        )
    record = await store.get(_scope(), "k1")
    assert record is not None
    assert record.state is RecordState.EXECUTING  # locked, recoverable after the lease


# -- surfaces and fidelity ----------


async def test_safe_methods_and_excluded_routes_pass_through(
    make_client: Any, runs: Executions
) -> None:
    async with make_client(exclude=["/payments"]) as client:
        for _ in range(2):
            assert (await client.get("/read", headers={"idempotency-key": "k"})).status_code == 200
            assert (await post(client, "/payments", None)).status_code == 201
    assert (runs["read"], runs["pay"]) == (2, 2)


async def test_a_streamed_response_is_replayed_whole(make_client: Any, runs: Executions) -> None:
    async with make_client() as client:
        first = await post(client, "/stream", "k1")
        again = await post(client, "/stream", "k1")
    assert first.text == again.text == "".join(f"chunk-{i};" for i in range(5))
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["stream"] == 1


async def test_multi_valued_headers_are_kept_and_cookies_never_replayed(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        first = await post(client, "/headers", "k1")
        again = await post(client, "/headers", "k1")
    assert first.headers.get_list("x-multi") == again.headers.get_list("x-multi") == ["one", "two"]
    assert "set-cookie" in first.headers
    assert "set-cookie" not in again.headers


async def test_a_key_is_never_replayed_to_another_tenant(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        await post(client, "/payments", "k1")
        other = await post(client, "/payments", "k1", headers={"authorization": "Bearer tenant-b"})
    assert "idempotent-replayed" not in other.headers
    assert runs["pay"] == 2


async def test_an_oversized_response_is_stored_without_its_body(
    make_client: Any, runs: Executions
) -> None:
    async with make_client(max_response=10) as client:
        first = await post(client, "/payments", "k1")
        again = await post(client, "/payments", "k1")
    assert len(first.content) > 10
    assert again.status_code == 201
    assert again.content == b""
    assert again.headers["idempotent-body-omitted"] == "true"
    assert runs["pay"] == 1


async def test_fastapi_validation_errors_release_the_key_so_a_fixed_body_runs(
    store: Store, runs: Executions
) -> None:
    # Stripe stores nothing when validation fails before the endpoint runs; neither do we.
    async with client_for(IdempotencyMiddleware(fastapi_app(runs), store=store)) as client:
        body = {"amount": 100, "currency": "EUR"}
        invalid = await post(client, "/typed", "k1", {"amount": "lots"})
        fixed = await post(client, "/typed", "k1", body)
        again = await post(client, "/typed", "k1", body)
        broken = await client.post(
            "/typed", content=b'{"amount":', headers={**AUTH, "idempotency-key": "k2",
                                                      "content-type": "application/json"}
        )  # fmt: skip
        fixed_too = await post(client, "/typed", "k2", body)
    assert invalid.status_code == 422
    assert invalid.json()["detail"][0]["loc"] == ["body", "amount"]  # FastAPI's own answer
    assert (fixed.status_code, fixed.json()["run"]) == (201, 1)  # same key: it executed
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == fixed.content
    assert broken.status_code == 422  # broken JSON: refused by FastAPI, released too
    assert fixed_too.status_code == 201
    assert runs["typed"] == 2


async def test_a_422_from_an_endpoint_that_ran_is_stored(store: Store, runs: Executions) -> None:
    async with client_for(IdempotencyMiddleware(fastapi_app(runs), store=store)) as client:
        body = {"amount": 100, "currency": "EUR"}
        first = await post(client, "/declined", "k1", body)
        again = await post(client, "/declined", "k1", body)
    assert first.status_code == again.status_code == 422
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["declined"] == 1


async def test_fastapi_validation_errors_can_be_stored_like_any_4xx(
    store: Store, runs: Executions
) -> None:
    app = IdempotencyMiddleware(fastapi_app(runs), store=store, not_executed=None)
    async with client_for(app) as client:
        await post(client, "/typed", "k1", {"amount": "lots"})
        again = await post(client, "/typed", "k1", {"amount": "lots"})
    assert again.headers["idempotent-replayed"] == "true"


async def test_an_app_can_say_a_request_was_refused_before_anything_ran(
    make_client: Any, runs: Executions, store: Store
) -> None:
    async with make_client() as client:
        first = await post(client, "/refuse", "k1")
        second = await post(client, "/refuse", "k1")
    assert first.status_code == second.status_code == 400
    assert "idempotent-replayed" not in second.headers
    assert runs["refuse"] == 2
    record = await store.get(_scope(), "k1")
    assert record is not None
    assert record.state is RecordState.RELEASED


@pytest.mark.parametrize("status", [408, 425, 429])
async def test_not_now_answers_are_not_stored_so_a_retry_runs(
    make_client: Any, runs: Executions, status: int
) -> None:
    async with make_client() as client:
        first = await post(client, f"/status/{status}", "k1")
        retry = await post(client, f"/status/{status}", "k1")
    assert first.status_code == retry.status_code == status
    assert "idempotent-replayed" not in retry.headers
    assert runs["status"] == 2


async def test_other_4xx_answers_are_stored(make_client: Any, runs: Executions) -> None:
    async with make_client() as client:
        await post(client, "/status/404", "k1")
        again = await post(client, "/status/404", "k1")
    assert again.headers["idempotent-replayed"] == "true"
    assert runs["status"] == 1


async def test_header_aliases_and_included_routes(make_client: Any, runs: Executions) -> None:
    async with make_client(aliases=["X-Idempotency-Key"], include=["/pay*"]) as client:
        first = await post(client, "/payments", None, headers={"x-idempotency-key": "k1"})
        again = await post(client, "/payments", "k1")  # the primary header names the same key
        unmanaged = await post(client, "/stream", None)  # outside include: passes through
        # Both the key and its alias (a black-box review: the first was used, silently).
        both = await post(client, "/payments", "k2", headers={"x-idempotency-key": "other"})
    assert again.headers["idempotent-replayed"] == "true"
    assert first.content == again.content
    assert unmanaged.status_code == 200
    problem = assert_problem(both, 400, "idempotency_key_invalid")
    assert "both idempotency-key and x-idempotency-key" in problem["detail"]
    assert runs["pay"] == 1


async def test_redaction_and_cacheable_statuses(make_client: Any, runs: Executions) -> None:
    def redact(response: StoredResponse) -> StoredResponse:
        headers = tuple((k, v) for k, v in response.headers if k != "x-multi")
        return StoredResponse(response.status, headers, response.body)

    async with make_client(redact=redact, cacheable=lambda status: status < 300) as client:
        await post(client, "/headers", "k1")
        again = await post(client, "/headers", "k1")
    assert again.headers["idempotent-replayed"] == "true"
    assert "x-multi" not in again.headers  # redacted before it was stored
    assert runs["headers"] == 1


async def test_unknown_and_safe_methods_pass_through_untouched(
    make_client: Any, runs: Executions
) -> None:
    async with make_client() as client:
        unknown = await client.request("BREW", "/payments", headers={"idempotency-key": "k"})
        put = await client.put("/payments", json={"amount": 1}, headers={"idempotency-key": "k"})
    assert unknown.status_code == 405  # the app's own answer, not a 5xx
    assert put.status_code == 201  # PUT is not managed by default
    assert "idempotency-key-expires" not in put.headers


# -- helpers ----------


def _scope() -> str:
    from oncepay.idempotency import scope_from_authorization

    return scope_from_authorization(AUTH["authorization"])


def _fp(path: str) -> str:
    from oncepay.idempotency import fingerprint

    return fingerprint("POST", path, json.dumps({"amount": 100}).encode())


class _DownStore(MemoryStore):
    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused")


class _CompleteFails(MemoryStore):
    async def complete(self, *args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("connection reset while storing")


async def test_a_route_can_have_its_own_ttl(store: Store, runs: Executions) -> None:
    clock = FakeClock()
    engine = Engine(store, ttl=3600, lease=30, clock=clock)
    app = IdempotencyMiddleware(starlette_app(runs), engine=engine, route_ttl={"/pay*": 60})
    async with client_for(app) as client:
        await post(client, "/payments", "k1")
        await post(client, "/stream", "k2")
        clock.advance(61)
        expired = await post(client, "/payments", "k1")
        kept = await post(client, "/stream", "k2")
    assert "idempotent-replayed" not in expired.headers  # past its route's 60 s TTL: new
    assert kept.headers["idempotent-replayed"] == "true"  # the default TTL still holds
    assert (runs["pay"], runs["stream"]) == (2, 1)


# -- protocol edges, driven with raw ASGI messages ---------------------------------------


async def raw_call(
    app: Any, messages: list[dict[str, Any]], path: str = "/payments", **headers: str
) -> list[dict[str, Any]]:
    """Call an ASGI app with the given request messages; return what it sent."""
    scope = {
        "type": "http", "method": "POST", "path": path, "raw_path": path.encode(),
        "query_string": b"", "headers": [
            (k.replace("_", "-").encode(), v.encode("latin-1"))
            for k, v in {"authorization": "Bearer tenant-a", **headers}.items()
        ],
    }  # fmt: skip
    inbox = list(messages)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_client_that_leaves_mid_upload_runs_nothing(store: Store, runs: Executions) -> None:
    app = IdempotencyMiddleware(starlette_app(runs), store=store)
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"amount":1', "more_body": True},
        {"type": "http.disconnect"},
    ]
    assert await raw_call(app, messages, idempotency_key="k1") == []
    assert runs["pay"] == 0
    assert await store.get(_scope(), "k1") is None
    full = [{"type": "http.request", "body": b'{"amount":1}'}]
    sent = await raw_call(app, full, idempotency_key="k1")  # the retry with the whole body
    assert sent[0]["status"] == 201


@pytest.mark.parametrize(
    ("path", "body", "content_length"),
    [
        ("/payments/\u20ac", b'{"amount":1}', None),  # ASGI paths are UTF-8 decoded
        ("/headers", b'{"a":"\\ud800"}', None),  # a lone surrogate: parses, will not re-encode
        ("/payments", b'{"amount":1}', "\u00b2"),  # '2' superscript: isdigit(), not int()
    ],
)
async def test_odd_but_legal_input_never_becomes_a_500(
    store: Store, runs: Executions, path: str, body: bytes, content_length: str | None
) -> None:
    app = IdempotencyMiddleware(starlette_app(runs), store=store)
    headers = {"idempotency_key": "odd", "content_type": "application/json"}
    if content_length is not None:
        headers["content_length"] = content_length
    sent = await raw_call(app, [{"type": "http.request", "body": body}], path=path, **headers)
    assert sent[0]["status"] < 500


def test_managed_requests_do_not_offer_pathsend_to_the_app() -> None:
    # A pathsend response could be neither captured nor stored: the app must send bodies.
    from oncepay.http.asgi import _bodies_only

    scope = {"type": "http", "extensions": {"http.response.pathsend": {}, "other": {}}}
    assert _bodies_only(scope)["extensions"] == {"other": {}}
    assert scope["extensions"] == {"http.response.pathsend": {}, "other": {}}  # not mutated
    plain = {"type": "http"}
    assert _bodies_only(plain) is plain


# -- after the last body message: the record is stored before it goes out, never after ------


def _answering_app(after: Any) -> Any:
    """A raw ASGI app: one whole 201 response, then ``after()`` (its afterwork)."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-n", b"1")]})
        await send({"type": "http.response.body", "body": b'{"id":1}'})
        await after()

    return app


async def test_the_response_does_not_wait_for_the_apps_afterwork(store: Store) -> None:
    release, delivered = asyncio.Event(), asyncio.Event()
    app = IdempotencyMiddleware(_answering_app(release.wait), store=store)
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)
        if not message.get("more_body") and message["type"] == "http.response.body":
            record = await store.get(_scope(), "k1")
            assert record is not None
            assert record.state is RecordState.COMPLETED  # stored before the last chunk
            delivered.set()

    scope = {
        "type": "http", "method": "POST", "path": "/payments", "query_string": b"",
        "headers": [(b"authorization", b"Bearer tenant-a"), (b"idempotency-key", b"k1")],
    }  # fmt: skip
    inbox = [{"type": "http.request", "body": b"{}"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    call = asyncio.create_task(app(scope, receive, send))
    await asyncio.wait_for(delivered.wait(), 5)  # while the app still works (a background task)
    assert not call.done()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert (b"idempotency-key-expires", sent[0]["headers"][-1][1]) == sent[0]["headers"][-1]
    release.set()
    await call


@pytest.mark.parametrize("suspends", [False, True], ids=["at-once", "after-an-await"])
async def test_an_app_that_fails_after_its_whole_response_still_stores_and_sends_it(
    store: Store, suspends: bool
) -> None:
    runs = 0

    async def crash() -> None:
        nonlocal runs
        runs += 1
        if suspends:
            await asyncio.sleep(0)
        raise RuntimeError("background task crashed")

    app = IdempotencyMiddleware(_answering_app(crash), store=store)
    with pytest.raises(RuntimeError, match="background task crashed"):
        await raw_call(app, [{"type": "http.request", "body": b"{}"}], idempotency_key="k1")
    record = await store.get(_scope(), "k1")
    assert record is not None
    assert record.state is RecordState.COMPLETED  # it ran: a retry must replay, not rerun
    with pytest.raises(RuntimeError):
        await raw_call(app, [{"type": "http.request", "body": b"{}"}], idempotency_key="k2")
    sent = await raw_call(app, [{"type": "http.request", "body": b"{}"}], idempotency_key="k1")
    assert (sent[0]["status"], sent[1]["body"]) == (201, b'{"id":1}')
    assert (b"idempotent-replayed", b"true") in sent[0]["headers"]
    assert runs == 2  # k1 once, k2 once: the replay ran nothing


async def test_messages_after_the_last_body_follow_it(store: Store) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
        await send({"type": "http.response.trailers", "headers": [], "more_trailers": False})

    sent = await raw_call(
        IdempotencyMiddleware(app, store=store),
        [{"type": "http.request", "body": b"{}"}],
        idempotency_key="k1",
    )
    kinds = [m["type"] for m in sent]
    assert kinds == ["http.response.start", "http.response.body", "http.response.trailers"]


# -- start-up, configuration and lifespan ------------------------------------------------


def test_a_route_ttl_shorter_than_the_lease_is_refused_at_start_up(runs: Executions) -> None:
    with pytest.raises(ConfigurationError, match=r"route_ttl\['/v1/refunds\*'\]"):
        IdempotencyMiddleware(starlette_app(runs), lease=60, route_ttl={"/v1/refunds*": 30})
    engine = Engine(MemoryStore(), lease=10)
    with pytest.raises(ConfigurationError, match="/pay"):
        IdempotencyMiddleware(starlette_app(runs), engine=engine, route_ttl={"/pay": 10})


async def test_a_configuration_error_during_a_request_is_a_problem_not_a_plain_500(
    runs: Executions, caplog: pytest.LogCaptureFixture
) -> None:
    class Misconfigured(MemoryStore):
        async def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise ConfigurationError("table idempotency_keys has the wrong columns")

    app = IdempotencyMiddleware(starlette_app(runs), store=Misconfigured())
    async with client_for(app) as client:
        response = await post(client, "/payments", "k1")
    problem = assert_problem(response, 500, "configuration_error")
    assert "wrong columns" not in problem["detail"]  # for the operator's log, not the client
    assert "wrong columns" in caplog.text
    assert runs["pay"] == 0


async def test_a_lost_lease_is_a_409_with_retry_after_and_an_honest_log_line(
    runs: Executions, caplog: pytest.LogCaptureFixture
) -> None:
    class Overtaken(MemoryStore):
        async def complete(self, *args: Any, **kwargs: Any) -> None:
            raise LeaseLost("token 1 no longer holds key 'k1'")

    async with client_for(IdempotencyMiddleware(starlette_app(runs), store=Overtaken())) as client:
        response = await post(client, "/payments", "k1")
    assert_problem(response, 409, "idempotency_lease_lost")
    assert int(response.headers["retry-after"]) >= 1
    assert "stays locked" not in caplog.text
    assert "newer attempt holds key 'k1'" in caplog.text


async def test_two_key_header_lines_are_400(make_client: Any, runs: Executions) -> None:
    async with make_client() as client:
        lines = [*AUTH.items(), ("idempotency-key", "a"), ("idempotency-key", "b")]
        two = await client.post("/payments", json={"amount": 1}, headers=lines)
        folded = await post(client, "/payments", "a, b")
        quoted = await post(client, "/payments", '"a, b"')  # a comma inside an sf-string is fine
    problem = assert_problem(two, 400, "idempotency_key_invalid")
    assert "2 idempotency-key header lines" in problem["detail"]
    assert_problem(folded, 400, "idempotency_key_invalid")
    assert quoted.status_code == 201
    assert runs["pay"] == 1


async def test_the_fingerprint_can_be_keyed(store: Store, runs: Executions) -> None:
    from oncepay.idempotency import fingerprint

    app = IdempotencyMiddleware(starlette_app(runs), store=store, fingerprint_secret=b"s3cret")
    async with client_for(app) as client:
        await post(client, "/payments", "k1")
        again = await post(client, "/payments", "k1")
    assert again.headers["idempotent-replayed"] == "true"
    record = await store.get(_scope(), "k1")
    assert record is not None
    body = json.dumps({"amount": 100}).encode()
    assert record.fingerprint == fingerprint("POST", "/payments", body, secret=b"s3cret")


@pytest.mark.parametrize("value", ["1", "true", "YES"])
async def test_a_test_suite_can_turn_idempotency_off(
    runs: Executions, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ONCEPAY_IDEMPOTENCY_DISABLED", value)
    app = IdempotencyMiddleware(starlette_app(runs), store=MemoryStore())
    monkeypatch.delenv("ONCEPAY_IDEMPOTENCY_DISABLED")  # read when built, not per request
    async with client_for(app) as client:
        first = await post(client, "/payments", "k1")
        again = await post(client, "/payments", "k1")
        keyless = await post(client, "/payments", None)
    assert first.status_code == again.status_code == keyless.status_code == 201
    assert "idempotency-key-expires" not in again.headers
    assert runs["pay"] == 3


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
async def test_idempotency_stays_on_unless_the_switch_says_true(
    runs: Executions, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ONCEPAY_IDEMPOTENCY_DISABLED", value)
    app = IdempotencyMiddleware(starlette_app(runs), store=MemoryStore())
    async with client_for(app) as client:
        await post(client, "/payments", "k1")
        again = await post(client, "/payments", "k1")
    assert again.headers["idempotent-replayed"] == "true"


class _ClosingStore(MemoryStore):
    closed = 0

    async def aclose(self) -> None:
        self.closed += 1
        await super().aclose()


async def _lifespan(app: Any) -> list[str]:
    """Run an app's lifespan, startup then shutdown, as a server does; what it sent."""
    inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    return sent


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_the_store_is_closed_at_lifespan_shutdown(runs: Executions, framework: str) -> None:
    store = _ClosingStore()
    inner = starlette_app(runs) if framework == "starlette" else fastapi_app(runs)
    sent = await _lifespan(IdempotencyMiddleware(inner, store=store))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert store.closed == 1


async def test_the_store_is_closed_at_shutdown_of_an_app_added_as_middleware(
    runs: Executions, tmp_path: Path
) -> None:
    from oncepay.idempotency.stores.sqlite import SQLiteStore

    store = SQLiteStore(f"{tmp_path}/k.db")
    app = fastapi_app(runs)
    # mypy cannot match Starlette's ParamSpec against an __init__ taking **options
    app.add_middleware(IdempotencyMiddleware, store=store)  # type: ignore[arg-type]
    async with client_for(app) as client:
        assert (await post(client, "/payments", "k1")).status_code == 201
    assert await _lifespan(app) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    with pytest.raises(StoreUnavailable):
        await store.get(_scope(), "k1")  # closed


# -- a body whose declared length is reached before its last message (black-box review) -------


async def _whole_body_then_an_empty_last_message(scope: Any, receive: Any, send: Any) -> None:
    """An app that streams as a proxy does: its whole Content-Length with more_body, then an
    empty closing message."""
    await receive()
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"11")]
    await send({"type": "http.response.start", "status": 201, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_a_body_complete_by_its_length_waits_for_the_record_like_a_last_chunk() -> None:
    request = [{"type": "http.request", "body": b"{}"}]
    failing = IdempotencyMiddleware(_whole_body_then_an_empty_last_message, store=_CompleteFails())
    sent = await raw_call(failing, request, idempotency_key="k1")
    # The record could not be stored: a clean 503, not the app's complete 201 followed by a
    # closing message that never comes (a client reading by length would have had it all).
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 503
    assert b"idempotency_store_unavailable" in sent[1]["body"]
    store = MemoryStore()
    working = IdempotencyMiddleware(_whole_body_then_an_empty_last_message, store=store)
    sent = await raw_call(working, request, idempotency_key="k2")
    assert sent[0]["status"] == 201
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b'{"ok":true}'
    assert sent[-1]["more_body"] is False
    record = await store.get(_scope(), "k2")
    assert record is not None
    assert record.state is RecordState.COMPLETED
