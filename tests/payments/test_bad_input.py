"""SPEC §8: every malformed input gets a 4xx problem with a clear detail, never a 500, and
leaves nothing behind — no payment, no refund, no idempotency record that would lock a key."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.payments.stack import Stack

GOOD: dict[str, Any] = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}

BAD_BODIES = [
    pytest.param(b'{"amount": 1000,', id="broken-json"),
    pytest.param(b"amount=1000&currency=USD", id="form-body"),
    pytest.param(b"", id="empty-body"),
    pytest.param(b"[1, 2]", id="json-array"),
    pytest.param(json.dumps({**GOOD, "amount": "1000"}).encode(), id="amount-string"),
    pytest.param(json.dumps({**GOOD, "amount": 10.5}).encode(), id="amount-float"),
    pytest.param(json.dumps({**GOOD, "amount": True}).encode(), id="amount-bool"),
    pytest.param(json.dumps({**GOOD, "amount": 0}).encode(), id="amount-zero"),
    pytest.param(json.dumps({**GOOD, "amount": -5}).encode(), id="amount-negative"),
    pytest.param(json.dumps({**GOOD, "amount": 10**20}).encode(), id="amount-huge"),
    pytest.param(json.dumps({**GOOD, "currency": "XYZ"}).encode(), id="currency-unknown"),
    pytest.param(json.dumps({**GOOD, "currency": "US"}).encode(), id="currency-short"),
    pytest.param(json.dumps({**GOOD, "currency": 840}).encode(), id="currency-number"),
    pytest.param(json.dumps({**GOOD, "payment_method": "pm_card_gold"}).encode(), id="method"),
    pytest.param(json.dumps({**GOOD, "capture_method": "later"}).encode(), id="capture-method"),
    pytest.param(json.dumps({**GOOD, "metadata": {"k": 1}}).encode(), id="metadata-value"),
    pytest.param(json.dumps({**GOOD, "metadata": "x"}).encode(), id="metadata-type"),
    pytest.param(json.dumps({**GOOD, "colour": "red"}).encode(), id="unknown-field"),
    pytest.param(
        json.dumps({k: v for k, v in GOOD.items() if k != "amount"}).encode(), id="amount-missing"
    ),
    pytest.param(
        b'{"amount": 1000, "currency": "USD", "payment_method": "\\ud800"}', id="lone-surrogate"
    ),
    pytest.param(json.dumps({**GOOD, "description": "a\x00b"}).encode(), id="nul-description"),
    pytest.param(
        b'{"amount": 1, "currency": "USD", "payment_method": "pm_card_ok", '
        b'"description": "\\ud800"}',
        id="surrogate-description",
    ),
    pytest.param(json.dumps({**GOOD, "currency": "XAU"}).encode(), id="currency-gold"),
    pytest.param(json.dumps({**GOOD, "metadata": {"k\x00": "v"}}).encode(), id="nul-metadata"),
    pytest.param(json.dumps({**GOOD, "metadata": {"k": "x" * 501}}).encode(), id="metadata-long"),
    # Past Python's limit on an integer's digits (4,300) and past its recursion limit: the
    # parser's own errors, not a malformed document, and still a 400.
    pytest.param(
        b'{"amount": ' + b"9" * 5000 + b', "currency": "USD", "payment_method": "pm_card_ok"}',
        id="number-5000-digits",
    ),
    pytest.param(
        b'{"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok", "metadata": '
        + b"[" * 5000
        + b"]" * 5000
        + b"}",
        id="nested-5000-deep",
    ),
    pytest.param(
        json.dumps({**GOOD, "metadata": {str(i): "v" for i in range(51)}}).encode(),
        id="metadata-many",
    ),
]


async def nothing_written(stack: Stack) -> None:
    assert await stack.count("payments") == 0
    assert await stack.count("refunds") == 0
    assert await stack.count("oncepay_idempotency") == 0


@pytest.mark.parametrize("body", BAD_BODIES)
async def test_malformed_payment_body(stack: Stack, body: bytes) -> None:
    headers = {"Idempotency-Key": "bad", "Content-Type": "application/json"}
    response = await stack.client.post("/v1/payments", content=body, headers=headers)
    assert response.status_code == 400, response.text
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "invalid_request"
    assert problem["detail"]
    await nothing_written(stack)
    # The key is not used up: the corrected request goes through under the same key.
    fixed = await stack.client.post("/v1/payments", json=GOOD, headers=headers)
    assert fixed.status_code == 201


async def test_detail_names_the_field(stack: Stack) -> None:
    response = await stack.post("/v1/payments", {**GOOD, "amount": -1, "currency": "ZZZ"})
    detail = response.json()["detail"]
    assert "amount" in detail
    assert "currency" in detail


async def test_oversized_body_is_413(stack: Stack) -> None:
    big = {**GOOD, "description": "x" * (1024 * 1024)}
    response = await stack.post("/v1/payments", big)
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large"
    await nothing_written(stack)


async def test_oversized_streamed_body_is_413(stack: Stack) -> None:
    async def chunks() -> Any:
        for _ in range(17):
            yield b" " * 65536
            await asyncio.sleep(0)

    response = await stack.client.post(
        "/v1/payments", content=chunks(), headers={"Idempotency-Key": "big"}
    )
    assert response.status_code == 413
    await nothing_written(stack)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/payments/pay_nope/capture", {"amount": "1"}),
        ("/v1/payments/pay_nope/refunds", {"amount": 0}),
        ("/v1/payments/pay_nope/refunds", {"amount": 5, "reason": "x"}),
        ("/v1/payments/pay_nope/cancel", {"why": "x"}),
    ],
)
async def test_malformed_follow_on_bodies(stack: Stack, path: str, body: Any) -> None:
    response = await stack.post(path, body)
    assert response.status_code == 400
    assert response.json()["code"] == "invalid_request"
    await nothing_written(stack)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/payments/pay_nope",
        "/v1/payments/%00",
        "/v1/refunds/re_x",
        "/v1/events/evt_x",
        "/v1/payments/" + "9" * 300,
        "/v1/nothing-here",
    ],
)
async def test_unknown_ids_and_routes_are_404(stack: Stack, path: str) -> None:
    response = await stack.client.get(path)
    assert response.status_code == 404
    assert response.json()["code"] == "resource_missing"


async def test_follow_on_of_unknown_payment_is_404_and_stored(stack: Stack) -> None:
    response = await stack.post("/v1/payments/pay_nope/capture", key="c")
    assert response.status_code == 404
    assert await stack.count("payments") == 0


@pytest.mark.parametrize(
    ("path", "params", "field"),
    [
        ("/v1/payments", {"limit": 0}, "limit"),
        ("/v1/payments", {"limit": 101}, "limit"),
        ("/v1/payments", {"limit": "ten"}, "limit"),
        ("/v1/payments", {"starting_after": "\x00"}, "starting_after"),
        ("/v1/events", {"type": "\x00"}, "type"),
        ("/v1/events", {"type": "x" * 100}, "type"),
    ],
)
async def test_bad_list_parameters(
    stack: Stack, path: str, params: dict[str, Any], field: str
) -> None:
    response = await stack.client.get(path, params=params)
    assert response.status_code == 400
    assert field in response.json()["detail"]


async def test_wrong_method_is_405_problem(stack: Stack) -> None:
    response = await stack.client.delete("/v1/payments")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
