"""The retrying client: one key per logical request, reused on every retry."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from tenacity import RetryCallState, Retrying

from oncepay.http import IdempotencyMiddleware
from oncepay.http.client import ATTEMPTS, AsyncClient, Client, RetryPolicy
from oncepay.idempotency.stores.memory import MemoryStore
from tests.http.apps import Executions, starlette_app

FAST = RetryPolicy(base=0.001, cap=0.005, total=5.0)


def scripted(
    *answers: int | type[httpx.TransportError], seen: list[httpx.Request]
) -> httpx.MockTransport:
    """A transport that answers each attempt with the next status, or raises the next error."""
    script = list(answers)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = script.pop(0)
        if isinstance(answer, int):
            headers = {"retry-after": "0"} if answer in (409, 429, 503) else {}
            return httpx.Response(answer, headers=headers, json={"attempt": len(seen)})
        raise answer("injected", request=request)

    return httpx.MockTransport(handler)


@pytest.mark.parametrize(
    "failure", [500, 502, 503, 409, 429, httpx.ConnectError, httpx.ReadTimeout]
)
async def test_transient_failures_are_retried_with_the_same_key(failure: Any) -> None:
    seen: list[httpx.Request] = []
    transport = scripted(failure, failure, 201, seen=seen)
    async with AsyncClient(transport=transport, retry=FAST) as client:
        response = await client.post("http://svc/v1/payments", json={"amount": 1})
    assert response.status_code == 201
    assert response.extensions[ATTEMPTS] == 3
    keys = {request.headers["idempotency-key"] for request in seen}
    assert len(keys) == 1  # one logical request, one key, three attempts


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
async def test_client_errors_other_than_409_and_429_are_never_retried(status: int) -> None:
    seen: list[httpx.Request] = []
    async with AsyncClient(transport=scripted(status, 201, seen=seen), retry=FAST) as client:
        response = await client.post("http://svc/x", json={})
    assert response.status_code == status
    assert response.extensions[ATTEMPTS] == 1


@pytest.mark.parametrize(
    ("body", "retried"),
    [
        ({"code": "invalid_state_transition"}, False),  # final: retrying cannot help
        ({"code": "idempotency_request_in_progress"}, True),  # the first attempt still runs
        ({"code": "payment_operation_in_progress"}, True),
        ("not a problem document", True),  # SPEC §4: a 409 is retried (a contract review)
        ({"code": "resource_exists"}, True),  # a code the client does not know: retried
        (None, True),  # a bare 409
    ],
)
async def test_a_409_is_retried_unless_it_says_it_is_final(body: Any, retried: bool) -> None:
    seen: list[httpx.Request] = []
    first = httpx.Response(409) if body is None else httpx.Response(409, json=body)
    answers = [first, httpx.Response(201, json={})]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    async with AsyncClient(transport=httpx.MockTransport(handler), retry=FAST) as client:
        response = await client.post("http://svc/v1/payments/pay_1/capture", json={})
    assert response.status_code == (201 if retried else 409)
    assert len(seen) == (2 if retried else 1)


async def test_each_logical_request_gets_a_fresh_key_and_a_given_key_is_kept() -> None:
    seen: list[httpx.Request] = []
    async with AsyncClient(transport=scripted(201, 201, 201, seen=seen), retry=FAST) as client:
        await client.post("http://svc/x", json={})
        await client.post("http://svc/x", json={})
        await client.post("http://svc/x", json={}, headers={"Idempotency-Key": "mine"})
    keys = [request.headers["idempotency-key"] for request in seen]
    assert keys[0] != keys[1]
    assert keys[2] == "mine"


async def test_safe_methods_get_no_key() -> None:
    seen: list[httpx.Request] = []
    async with AsyncClient(transport=scripted(200, seen=seen), retry=FAST) as client:
        await client.get("http://svc/x")
    assert "idempotency-key" not in seen[0].headers


async def test_attempts_are_bounded_and_the_last_answer_is_returned() -> None:
    seen: list[httpx.Request] = []
    policy = RetryPolicy(attempts=3, base=0.001, cap=0.001)
    transport = scripted(503, 503, 503, 201, seen=seen)
    async with AsyncClient(transport=transport, retry=policy) as client:
        response = await client.post("http://svc/x", json={})
    assert response.status_code == 503
    assert response.extensions[ATTEMPTS] == 3


async def test_the_last_connection_error_is_raised_when_attempts_run_out() -> None:
    seen: list[httpx.Request] = []
    policy = RetryPolicy(attempts=2, base=0.001, cap=0.001)
    transport = scripted(httpx.ConnectError, httpx.ConnectError, seen=seen)
    async with AsyncClient(transport=transport, retry=policy) as client:
        with pytest.raises(httpx.ConnectError):
            await client.post("http://svc/x", json={})
    assert len(seen) == 2


def test_the_sync_client_behaves_the_same() -> None:
    seen: list[httpx.Request] = []
    with Client(transport=scripted(502, httpx.ReadTimeout, 201, seen=seen), retry=FAST) as client:
        response = client.post("http://svc/x", json={})
    assert response.status_code == 201
    assert response.extensions[ATTEMPTS] == 3
    assert len({request.headers["idempotency-key"] for request in seen}) == 1


def _state_after(response: httpx.Response, attempt: int) -> RetryCallState:
    state = RetryCallState(Retrying(), None, (), {})
    state.attempt_number = attempt
    state.set_result(response)
    return state


@pytest.mark.parametrize("attempt", [1, 2, 5, 10, 30])
def test_backoff_is_full_jitter_capped(attempt: int) -> None:
    ok = httpx.Response(503)
    low = RetryPolicy(random=lambda: 0.0).backoff(_state_after(ok, attempt))
    high = RetryPolicy(random=lambda: 0.999999).backoff(_state_after(ok, attempt))
    assert low == 0.0
    assert high == pytest.approx(min(5.0, 0.1 * 2 ** (attempt - 1)), rel=1e-3)


def test_retry_after_is_honoured_but_never_past_the_total_budget() -> None:
    policy = RetryPolicy(random=lambda: 0.0, total=30.0)
    hinted = httpx.Response(429, headers={"retry-after": "7"})
    assert policy.backoff(_state_after(hinted, 1)) == 7.0
    far = httpx.Response(503, headers={"retry-after": "3600"})
    assert policy.backoff(_state_after(far, 1)) <= 30.0
    dated = httpx.Response(503, headers={"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})
    assert policy.backoff(_state_after(dated, 1)) == 0.0  # a date in the past: retry now


class DropFirstResponse(httpx.AsyncBaseTransport):
    """The server finishes the first attempt, but its answer is lost on the way back."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.dropped = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not self.dropped:
            self.dropped += 1
            await response.aread()
            raise httpx.ReadTimeout("answer lost after the server finished", request=request)
        return response


async def test_a_lost_answer_is_recovered_as_a_replay_not_a_second_execution() -> None:
    runs = Executions()
    app = IdempotencyMiddleware(starlette_app(runs), store=MemoryStore())
    transport = DropFirstResponse(httpx.ASGITransport(app=app))
    async with AsyncClient(transport=transport, retry=FAST, base_url="http://svc") as client:
        response = await client.post("/payments", json={"amount": 100})
    assert response.status_code == 201
    assert response.headers["idempotent-replayed"] == "true"
    assert response.extensions[ATTEMPTS] == 2
    assert runs["pay"] == 1


async def test_retried_streamed_answers_are_closed() -> None:
    closed: list[bool] = []

    class Tracked(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"busy"

        async def aclose(self) -> None:
            closed.append(True)

    answers = iter([503, 201])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(answers), headers={"retry-after": "0"}, stream=Tracked())

    async with AsyncClient(transport=httpx.MockTransport(handler), retry=FAST) as client:
        request = client.build_request("POST", "http://svc/x", json={})
        response = await client.send(request, stream=True)
        assert response.status_code == 201
        assert closed == [True]  # the 503's stream was closed before the retry
        await response.aclose()
