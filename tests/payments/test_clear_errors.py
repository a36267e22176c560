"""The first five minutes' errors (issue 14): each says what is wrong in the client's terms,
and who is asking is settled first (401 before any complaint about the body)."""

from __future__ import annotations

import json

import pytest

from tests.payments.stack import Stack

PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "text/plain; charset=utf-8"]
)
async def test_a_json_body_sent_as_another_type_is_415_naming_json(
    stack: Stack, content_type: str
) -> None:
    key = stack.new_key()
    response = await stack.client.post(
        "/v1/payments",
        content=json.dumps(PAYMENT),
        headers={"Idempotency-Key": key, "Content-Type": content_type},
    )
    assert response.status_code == 415, response.text
    problem = response.json()
    assert problem["code"] == "unsupported_media_type"
    assert "application/json" in problem["detail"]
    assert content_type.split(";", maxsplit=1)[0] in problem["detail"]
    # Nothing was claimed: the same key with the right type runs the payment.
    retried = await stack.post("/v1/payments", PAYMENT, key=key)
    assert retried.status_code == 201, retried.text
    assert await stack.count("payments") == 1


@pytest.mark.parametrize("content_type", ["application/json", "application/merchant+json"])
async def test_json_and_json_suffixed_types_are_read_as_json(
    stack: Stack, content_type: str
) -> None:
    response = await stack.client.post(
        "/v1/payments",
        content=json.dumps(PAYMENT),
        headers={"Idempotency-Key": stack.new_key(), "Content-Type": content_type},
    )
    assert response.status_code == 201, response.text


async def test_a_body_without_a_content_type_is_415_too(stack: Stack) -> None:
    request = stack.client.build_request("POST", "/v1/payments", content=json.dumps(PAYMENT))
    request.headers["Idempotency-Key"] = stack.new_key()
    assert "content-type" not in request.headers  # httpx adds none for raw content
    response = await stack.client.send(request)
    assert response.status_code == 415, response.text
    assert "without a Content-Type" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"{not json", "application/json"),
        (json.dumps(PAYMENT).encode(), "text/plain"),
        (b'{"amount": ' + b"9" * 5000 + b"}", "application/json"),
        (b"[" * 5000 + b"]" * 5000, "application/json"),
    ],
)
async def test_who_is_asking_is_settled_before_the_body(
    stack: Stack, body: bytes, content_type: str
) -> None:
    response = await stack.client.post(
        "/v1/payments",
        content=body,
        headers={
            "Idempotency-Key": stack.new_key(),
            "Content-Type": content_type,
            "Authorization": "Bearer sk_test_not_a_key",
        },
    )
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "invalid_api_key"


async def test_malformed_json_says_where_in_characters(stack: Stack) -> None:
    response = await stack.client.post(
        "/v1/payments",
        content=b'{"amount": 1000,}',
        headers={"Idempotency-Key": stack.new_key(), "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert detail.startswith("body: malformed JSON: ")
    assert "at character 16" in detail


async def test_string_limits_are_in_characters(stack: Stack) -> None:
    response = await stack.pay(description="x" * 2000)
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert "at most 1000 characters" in detail, detail
    assert "items" not in detail
    long_value = await stack.pay(metadata={"k": "v" * 600})
    assert long_value.status_code == 400
    assert "characters" in long_value.json()["detail"]


async def test_a_405_says_the_method_is_not_allowed(stack: Stack) -> None:
    response = await stack.client.delete("/v1/payments")
    assert response.status_code == 405
    problem = response.json()
    assert problem["title"] == "The method is not allowed on this path"
    assert problem["detail"] == "DELETE is not allowed here; use GET, HEAD, POST"
