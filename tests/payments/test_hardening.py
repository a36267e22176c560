"""Hardening of the payments service (issue 12, items 2 and 22-26): outbound clients keep no
cookies, duplicate JSON keys are refused, 405s list every method and HEAD works, authentication
comes before query checks, a payment's refunds are a list object, and event types follow one
rule. Each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from tenacity import wait_none

from oncepay.payments.acquirers.base import Outcome
from oncepay.payments.acquirers.breaker import CircuitBreaker, consecutive_failures
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.service import create_merchant
from oncepay.payments.webhooks import deliver_due, delivery_client
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

