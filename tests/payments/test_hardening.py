"""Hardening of the payments service (issue 12, items 2 and 22-26): outbound clients keep no
cookies, duplicate JSON keys are refused, 405s list every method and HEAD works, authentication
comes before query checks, a payment's refunds are a list object, and event types follow one
rule. Each test failed on the code before its fix (a few parametrized cases pin what was
already right beside it: a POST-only path's Allow, FastAPI's own query checks after 401)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tenacity import wait_none

from oncepay.payments.acquirers.base import Outcome
from oncepay.payments.acquirers.breaker import CircuitBreaker, consecutive_failures
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.merchants import create_merchant
from oncepay.payments.webhooks.delivery import deliver_due, delivery_client
from tests.payments.stack import Stack
from tests.payments.test_webhook_addresses import listening

# -- no cookie state in outbound clients (item 2) ------------------------------------------------


class Recorder:
    """A loopback HTTP server that keeps every request's head and answers ``status`` with
    ``body``, setting a cookie when ``cookie`` is given."""

    def __init__(self, *, cookie: str | None = None, body: bytes = b"{}", status: int = 200):
        self.cookie, self.body, self.status = cookie, body, status
        self.heads: list[dict[str, str]] = []

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")[1:]
        headers = dict(line.lower().split(": ", 1) for line in head if line)
        await reader.readexactly(int(headers.get("content-length", "0")))
        self.heads.append(headers)
        cookie = f"set-cookie: {self.cookie}; Path=/\r\n" if self.cookie else ""
        writer.write(
            f"HTTP/1.1 {self.status} OK\r\ncontent-type: application/json\r\n{cookie}"
            f"content-length: {len(self.body)}\r\nconnection: close\r\n\r\n".encode()
            + self.body
        )
        await writer.drain()
        writer.close()


async def subscribe(stack: Stack, port: int, api_key: str) -> None:
    headers = {"Idempotency-Key": stack.new_key(), "Authorization": f"Bearer {api_key}"}
    body = {"url": f"http://127.0.0.1:{port}/hook", "events": ["payment.captured"]}
    created = await stack.client.post("/v1/webhook_endpoints", json=body, headers=headers)
    assert created.status_code == 201, created.text


async def pay_as(stack: Stack, api_key: str) -> None:
    headers = {"Idempotency-Key": stack.new_key(), "Authorization": f"Bearer {api_key}"}
    body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
    paid = await stack.client.post("/v1/payments", json=body, headers=headers)
    assert paid.status_code == 201, paid.text


async def test_a_cookie_one_merchants_endpoint_set_never_reaches_another(stack: Stack) -> None:
    """One worker client for both merchants, as the worker has: merchant A's endpoint sets a
    cookie; merchant B's endpoint (same host, another port: cookies ignore ports) gets none,
    and neither does A's own next delivery."""
    _, key_b = await create_merchant(stack.db, "Merchant B")
    a, b = Recorder(cookie="session=merchant-a-secret"), Recorder()
    async with listening(a) as port_a, listening(b) as port_b, delivery_client() as client:
        await subscribe(stack, port_a, stack.api_key)
        await subscribe(stack, port_b, key_b)
        await pay_as(stack, stack.api_key)
        assert dict((await deliver_due(stack.services, client)).results) == {"succeeded": 1}
        await pay_as(stack, key_b)
        await pay_as(stack, stack.api_key)
        assert dict((await deliver_due(stack.services, client)).results) == {"succeeded": 2}
    assert [len(a.heads), len(b.heads)] == [2, 1]
    assert "cookie" not in b.heads[0]
    assert "cookie" not in a.heads[1]
    assert not client.cookies


async def test_the_acquirer_client_sends_no_cookie_it_was_given() -> None:
    """A cookie the acquirer (or a proxy before it) sets is not sent back on later calls."""
    approved = {"object": "authorization", "id": "auth_1", "status": "approved"}
    acquirer = Recorder(cookie="affinity=node-7", body=json.dumps(approved).encode(), status=201)
    async with listening(acquirer) as port:
        name = "cookie-test"
        client = HttpAcquirer(
            name,
            f"http://127.0.0.1:{port}",
            backoff=wait_none(),
            breaker=CircuitBreaker(name, trip=consecutive_failures(1000)),
        )
        try:
            for reference in ("pay_1_a1", "pay_2_a1"):
                answer = await client.authorize(
                    reference=reference, order_id=reference[:5], amount=1000, currency="EUR",
                    payment_method="pm_card_ok", capture=False,
                )  # fmt: skip
                assert answer.outcome is Outcome.APPROVED
        finally:
            await client.aclose()
    assert len(acquirer.heads) == 2
    assert "cookie" not in acquirer.heads[1]


# -- duplicate JSON keys (item 22) ---------------------------------------------------------------

GOOD = b'"currency": "USD", "payment_method": "pm_card_ok"'


async def nothing_stored(stack: Stack) -> None:
    for table in ("payments", "refunds", "oncepay_idempotency", "webhook_endpoints"):
        assert await stack.count(table) == 0, table


@pytest.mark.parametrize(
    ("body", "key"),
    [
        pytest.param(b'{"amount": 1000, "amount": 5, ' + GOOD + b"}", "amount", id="top-level"),
        pytest.param(b'{"amount": 1000, "\\u0061mount": 5, ' + GOOD + b"}", "amount", id="escape"),
        pytest.param(
            b'{"amount": 1000, "metadata": {"order": "1", "order": "2"}, ' + GOOD + b"}",
            "order",
            id="nested",
        ),
    ],
)
async def test_a_duplicate_json_key_is_400_and_releases_the_key(
    stack: Stack, body: bytes, key: str
) -> None:
    headers = {"Idempotency-Key": "dup", "Content-Type": "application/json"}
    response = await stack.client.post("/v1/payments", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["code"] == "invalid_request"
    assert f"duplicate key {key!r}" in problem["detail"], problem
    await nothing_stored(stack)
    fixed = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
    retry = await stack.client.post("/v1/payments", json=fixed, headers=headers)
    assert retry.status_code == 201, retry.text  # the key was not used up


async def test_a_duplicate_key_in_any_body_is_refused(stack: Stack) -> None:
    """Not only payments: every JSON body of the API is parsed by the same rule."""
    body = b'{"url": "https://shop.example/a", "events": ["*"], "url": "https://shop.example/b"}'
    response = await stack.client.post(
        "/v1/webhook_endpoints",
        content=body,
        headers={"Idempotency-Key": "dup-endpoint", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert "duplicate key 'url'" in response.json()["detail"]
    await nothing_stored(stack)


async def test_malformed_json_says_what_and_where(stack: Stack) -> None:
    headers = {"Idempotency-Key": "broken", "Content-Type": "application/json"}
    response = await stack.client.post("/v1/payments", content=b'{"amount": 1000,', headers=headers)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("body: malformed JSON"), response.json()


# -- 405 and HEAD (item 23) ----------------------------------------------------------------------


def allowed(response: Any) -> set[str]:
    return {method.strip() for method in response.headers["allow"].split(",")}


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/payments", {"GET", "HEAD", "POST"}),
        ("PUT", "/v1/payments", {"GET", "HEAD", "POST"}),
        ("DELETE", "/v1/payments/pay_x/refunds", {"GET", "HEAD", "POST"}),
        ("GET", "/v1/payments/pay_x/capture", {"POST"}),
        ("PATCH", "/v1/webhook_endpoints/we_x", {"GET", "HEAD", "POST", "DELETE"}),
        ("POST", "/health", {"GET", "HEAD"}),
    ],
)
async def test_a_405_allows_every_method_of_the_path(
    stack: Stack, method: str, path: str, allow: set[str]
) -> None:
    response = await stack.client.request(method, path)
    assert response.status_code == 405, response.text
    assert response.json()["code"] == "method_not_allowed"
    assert allowed(response) == allow


@pytest.mark.parametrize(
    "path",
    ["/v1/payments", "/v1/payments/{id}", "/v1/payments/{id}/refunds", "/v1/events",
     "/v1/webhook_endpoints", "/health", "/v1/payments/pay_nope"],
)  # fmt: skip
async def test_head_answers_like_get_without_a_body(stack: Stack, path: str) -> None:
    payment_id = (await stack.pay()).json()["id"]
    path = path.replace("{id}", payment_id)
    got = await stack.client.get(path)
    head = await stack.client.head(path)
    assert head.status_code == got.status_code
    assert head.content == b""
    assert head.headers["content-length"] == str(len(got.content))
    assert head.headers["content-type"] == got.headers["content-type"]


async def test_head_needs_authentication_like_get(stack: Stack) -> None:
    head = await stack.client.head("/v1/payments", headers={"Authorization": "Bearer nope"})
    assert head.status_code == 401
    assert head.content == b""


# -- authentication before query checks (item 24) ------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [{"limt": "5"}, {"limit": "0"}, {"limit": "ten", "bogus": "1"}, {"type": "payment.bogus"}],
)
@pytest.mark.parametrize("authorization", [None, "Bearer sk_wrong"])
async def test_authentication_comes_before_query_parameters(
    stack: Stack, params: dict[str, str], authorization: str | None
) -> None:
    stack.client.headers.pop("authorization")
    headers = {"Authorization": authorization} if authorization else {}
    response = await stack.client.get("/v1/events", params=params, headers=headers)
    assert response.status_code == 401, response.text


async def test_an_unknown_query_parameter_is_still_400_once_authenticated(stack: Stack) -> None:
    response = await stack.client.get("/v1/payments", params={"limt": "5"})
    assert response.status_code == 400
    assert "limt" in response.json()["detail"]
    health = await stack.client.get("/health", params={"verbose": "1"})
    assert health.status_code == 400  # routes without authentication check them too


# -- a payment's refunds are a list object (item 25) ---------------------------------------------


async def test_a_payments_refunds_are_a_paginated_list_newest_first(stack: Stack) -> None:
    payment_id = (await stack.pay(amount=1000)).json()["id"]
    other = (await stack.pay(amount=1000)).json()["id"]
    refund_ids = []
    for amount in (100, 200, 300):
        refund = await stack.post(f"/v1/payments/{payment_id}/refunds", {"amount": amount})
        refund_ids.append(refund.json()["id"])
    await stack.post(f"/v1/payments/{other}/refunds", {"amount": 50})
    path = f"/v1/payments/{payment_id}/refunds"
    first = (await stack.client.get(path, params={"limit": 2})).json()
    assert first["object"] == "list"
    assert [r["id"] for r in first["data"]] == refund_ids[::-1][:2]  # newest first
    assert first["has_more"] is True
    cursor = first["data"][-1]["id"]
    rest = await stack.client.get(path, params={"limit": 2, "starting_after": cursor})
    assert [r["id"] for r in rest.json()["data"]] == refund_ids[:1]
    assert rest.json()["has_more"] is False
    everything = (await stack.client.get(path)).json()
    assert [r["amount"] for r in everything["data"]] == [300, 200, 100]
    assert (await stack.client.get(path, params={"limit": 0})).status_code == 400


# -- one rule for event types (item 26) ----------------------------------------------------------


async def test_an_unknown_event_type_is_400_when_listing_as_when_subscribing(stack: Stack) -> None:
    listed = await stack.client.get("/v1/events", params={"type": "payment.bogus"})
    subscribed = await stack.post(
        "/v1/webhook_endpoints", {"url": "https://shop.example/h", "events": ["payment.bogus"]}
    )
    for response in (listed, subscribed):
        assert response.status_code == 400, response.text
        assert response.json()["code"] == "invalid_request"
        assert "unknown event type 'payment.bogus'" in response.json()["detail"]
    await stack.pay()
    known = await stack.client.get("/v1/events", params={"type": "payment.captured"})
    assert [event["type"] for event in known.json()["data"]] == ["payment.captured"]
