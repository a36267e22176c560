"""What a black-box review of the running service found (2026-12-07), one test a finding; each
failed before its fix. The 500s it found (a 5,000-digit number, JSON nested 5,000 deep, a NUL or
an out-of-range number in a dashboard or operator parameter) are pinned in test_bad_input.py,
test_clear_errors.py and test_hostile_parameters.py."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.insight.analyzer import _DETAILS
from oncepay.insight.baseline import Episode
from oncepay.payments.api.routes import currencies
from tests.payments.stack import Stack


class _Broken:
    def values(self) -> Any:
        raise RuntimeError("a bug in the handler")


async def test_an_unexpected_error_is_a_problem_with_a_request_id_and_a_true_detail(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(currencies, "CURRENCIES", _Broken())
    app = stack.client._transport.app  # type: ignore[attr-defined]
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://payments",
        headers={"Authorization": f"Bearer {stack.api_key}"},
    )
    with caplog.at_level(logging.ERROR, logger="oncepay.payments"):
        async with client:
            answer = await client.get("/v1/currencies")
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/problem+json"
    request_id = answer.headers["request-id"]  # as on every other answer
    assert re.fullmatch(r"req_[0-9a-f]{24}", request_id)
    problem = answer.json()
    assert problem["code"] == "internal_error"
    assert "Request-Id" in problem["detail"]
    assert "idempotency layer" not in problem["detail"]  # it was not the idempotency layer
    logged = [r for r in caplog.records if "unhandled error" in r.getMessage()]
    assert logged
    assert request_id in logged[0].getMessage()  # the id finds the traceback


async def test_a_401_says_how_to_authenticate(stack: Stack) -> None:
    for path in ("/v1/payments", "/v1/admin/merchants"):
        answer = await stack.client.get(path, headers={"Authorization": "Bearer sk_wrong"})
        assert answer.status_code in (401, 404), path  # no operator API without its token
        if answer.status_code == 401:
            assert answer.headers["www-authenticate"] == 'Bearer realm="oncepay"'
    answer = await stack.client.get("/v1/payments", headers={"Authorization": "Bearer sk_wrong"})
    assert answer.status_code == 401


async def test_an_unknown_currency_filter_is_refused_not_an_empty_list(stack: Stack) -> None:
    await stack.pay(currency="EUR")
    refused = await stack.client.get("/v1/payments", params={"currency": "XYZ"})
    assert refused.status_code == 400
    assert "unknown currency 'XYZ'" in refused.json()["detail"]
    found = await stack.client.get("/v1/payments", params={"currency": "EUR"})
    assert len(found.json()["data"]) == 1


async def test_a_query_parameter_given_twice_is_refused(stack: Stack) -> None:
    for _ in range(3):
        await stack.pay()
    for query in ("limit=1&limit=3", "limit=3&limit=1", "status=captured&status=failed"):
        answer = await stack.client.get(f"/v1/payments?{query}")
        assert answer.status_code == 400, query
        assert "given more than once" in answer.json()["detail"]
    once = await stack.client.get("/v1/payments?limit=2")
    assert len(once.json()["data"]) == 2


async def test_a_webhook_endpoint_update_refuses_null_instead_of_ignoring_it(
    stack: Stack,
) -> None:
    headers = {"Idempotency-Key": stack.new_key()}
    body = {"url": "https://example.com/hook", "events": ["*"], "description": "mine"}
    made = await stack.client.post("/v1/webhook_endpoints", json=body, headers=headers)
    assert made.status_code == 201, made.text
    path = f"/v1/webhook_endpoints/{made.json()['id']}"
    for field in ("url", "events", "disabled", "description"):
        answer = await stack.client.post(
            path, json={field: None}, headers={"Idempotency-Key": stack.new_key()}
        )
        assert answer.status_code == 400, (field, answer.text)
        assert f"{field} may not be null" in answer.json()["detail"]
    cleared = await stack.client.post(
        path, json={"description": ""}, headers={"Idempotency-Key": stack.new_key()}
    )
    assert cleared.status_code == 200
    kept = cleared.json()
    assert (kept["url"], kept["description"]) == ("https://example.com/hook", "")


@pytest.mark.parametrize("kind", sorted(_DETAILS))
def test_an_insight_detail_agrees_with_its_counts(kind: str) -> None:
    one = _DETAILS[kind](Episode(0.0, 1.0, events=1, expected=0.0, examples=("k",), sources=1))
    assert not re.search(r"\b1 (requests|replays|keys|retries|addresses)\b", one), one
    assert " were refused" not in one, one
    assert " retries were" not in one, one
    many = _DETAILS[kind](Episode(0.0, 1.0, events=5, expected=0.0, examples=("k",), sources=3))
    assert re.search(r"\b5 (requests|replays|keys|retries)\b", many), many


async def test_a_trailing_slash_is_no_route_not_a_redirect_to_the_callers_host(
    stack: Stack,
) -> None:
    """A 307 before authentication, to http://<the client's Host>/v1/payments: an unknown path
    is a 404 like any other, and a missing key is still a 401 first where the route exists."""
    for method, path in (
        ("POST", "/v1/payments/"),
        ("GET", "/v1/payments/"),
        ("GET", "/v1/events/"),
    ):
        answer = await stack.client.request(method, path, headers={"Host": "evil.example"})
        assert answer.status_code == 404, (method, path, answer.status_code)
        assert answer.json()["code"] == "resource_missing"
        assert "location" not in answer.headers


async def test_a_null_amount_is_refused_not_taken_for_everything(stack: Stack) -> None:
    """A client's unset field serialised as null captured or refunded everything."""
    payment = (await stack.pay(capture_method="manual")).json()
    path = f"/v1/payments/{payment['id']}"
    for action in ("capture", "refunds"):
        answer = await stack.post(f"{path}/{action}", {"amount": None})
        assert answer.status_code == 400, answer.text
        assert "null is not an amount" in answer.json()["detail"]
    after = (await stack.client.get(path)).json()
    assert (after["status"], after["amount_captured"]) == ("authorized", 0)
    captured = await stack.post(f"{path}/capture", {})  # left out: the authorized amount
    assert captured.json()["amount_captured"] == payment["amount"]


async def test_a_null_body_is_refused_not_taken_for_no_body(stack: Stack) -> None:
    """FastAPI reads a literal ``null`` body as no body at all, which on a capture or a refund
    means the whole amount: a body that is sent must be an object."""
    payment = (await stack.pay(capture_method="manual")).json()
    path = f"/v1/payments/{payment['id']}"
    for action in ("capture", "refunds", "cancel"):
        answer = await stack.client.post(
            f"{path}/{action}",
            content=b"null",
            headers={"Content-Type": "application/json", "Idempotency-Key": stack.new_key()},
        )
        assert answer.status_code == 400, answer.text
        assert answer.json()["detail"] == (
            "body: null is not a JSON object; send an object, or no body"
        )
    after = (await stack.client.get(path)).json()
    assert (after["status"], after["amount_captured"]) == ("authorized", 0)
    assert (await stack.post(f"{path}/capture")).status_code == 200  # no body: the whole amount


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-16-be"])
async def test_json_in_another_encoding_than_utf_8_is_refused(stack: Stack, encoding: str) -> None:
    """RFC 8259 §8.1: JSON between systems is UTF-8. json.loads took UTF-16 and UTF-32 bodies
    (201) while a body declared latin-1 was refused."""
    body = json.dumps({"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"})
    answer = await stack.client.post(
        "/v1/payments",
        content=body.encode(encoding),
        headers={"Content-Type": "application/json", "Idempotency-Key": f"enc-{encoding}"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith("body: malformed JSON")  # not UTF-8, or no JSON
    assert await stack.count("payments") == 0


async def test_a_lease_shorter_than_an_acquirer_call_is_warned_of_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A review ran with ONCEPAY_LEASE=3 s and a 5 s acquirer: every slow request ended in
    409 idempotency_lease_lost. Money stayed right; the start now says why it will not work."""
    from oncepay.payments.bootstrap import lease_warning, start
    from oncepay.payments.settings import Settings

    def settings(**given: Any) -> Settings:
        return Settings(
            database_url=f"sqlite:///{tmp_path / 'p.db'}",
            acquirer_database_url=f"sqlite:///{tmp_path / 'a.db'}",
            run_worker=False,
            **given,
        )

    assert lease_warning(settings()) is None  # the defaults: 60 s against 3 x 5 s
    assert lease_warning(settings(lease=15)) is None
    short = settings(lease=14)
    said = lease_warning(short)
    assert said is not None
    assert said.startswith("ONCEPAY_LEASE (14 s) is shorter than an acquirer call may take")
    two = lease_warning(settings(lease=29, secondary_acquirer_url="http://127.0.0.1:9/"))
    assert two is not None
    assert "on each of 2 acquirers" in two
    with caplog.at_level(logging.WARNING, logger="oncepay.payments"):
        services = await start(short)
        await services.aclose()
    assert [r.getMessage() for r in caplog.records if r.name == "oncepay.payments"] == [said]
