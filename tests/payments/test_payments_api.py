"""The payments API as a client sees it (SPEC §5), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text

from oncepay.storage.db import read
from tests.payments.stack import Stack


def problem(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    document: dict[str, object] = response.json()
    assert document["code"] == code, document
    assert document["detail"]
    return document


async def test_automatic_payment_is_captured_and_replayed(stack: Stack) -> None:
    first = await stack.pay(key="order-1", metadata={"order": "1"}, description="Mug")
    assert first.status_code == 201, first.text
    payment = first.json()
    assert payment["status"] == "captured"
    assert payment["amount_captured"] == 1000
    assert payment["metadata"] == {"order": "1"}
    assert "idempotency-key-expires" in first.headers
    again = await stack.pay(key="order-1", metadata={"order": "1"}, description="Mug")
    assert again.status_code == 201
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(payment["id"]) == 1
    assert await stack.ledger_violations() == []


async def test_field_order_does_not_change_the_fingerprint(stack: Stack) -> None:
    body = '{"amount": 500, "currency": "EUR", "payment_method": "pm_card_ok"}'
    reordered = '{"payment_method": "pm_card_ok", "currency": "EUR", "amount": 500}'
    headers = {"Idempotency-Key": "same", "Content-Type": "application/json"}
    first = await stack.client.post("/v1/payments", content=body, headers=headers)
    second = await stack.client.post("/v1/payments", content=reordered, headers=headers)
    assert second.content == first.content
    assert second.headers["idempotent-replayed"] == "true"


async def test_same_key_other_body_is_422_and_changes_nothing(stack: Stack) -> None:
    await stack.pay(key="k")
    problem(await stack.pay(key="k", amount=2000), 422, "idempotency_key_reused")
    assert await stack.count("payments") == 1


async def test_missing_and_malformed_keys(stack: Stack) -> None:
    body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
    problem(await stack.client.post("/v1/payments", json=body), 400, "idempotency_key_missing")
    long_key = {"Idempotency-Key": "x" * 256}
    response = await stack.client.post("/v1/payments", json=body, headers=long_key)
    problem(response, 400, "idempotency_key_invalid")
    assert await stack.count("payments") == 0


async def test_the_key_is_checked_before_the_body(stack: Stack) -> None:
    """SPEC §2's first row: a managed request without its key is 400 idempotency_key_missing,
    whatever else is wrong with it (a contract review got invalid_request for a missing key and
    a bad body); a malformed key likewise. With a good key the body's problem stands. Each is
    counted as its §9 decision."""
    for body in ({"amount": 0}, {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok",
                                 "surprise": 1}):  # fmt: skip
        problem(await stack.client.post("/v1/payments", json=body), 400, "idempotency_key_missing")
        response = await stack.client.post(
            "/v1/payments", json=body, headers={"Idempotency-Key": "x" * 256}
        )
        problem(response, 400, "idempotency_key_invalid")
        response = await stack.client.post(
            "/v1/payments", json=body, headers={"Idempotency-Key": stack.new_key()}
        )
        problem(response, 400, "invalid_request")
    not_json = await stack.client.post(
        "/v1/payments", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    problem(not_json, 400, "idempotency_key_missing")
    on_a_path = await stack.client.post("/v1/payments/pay_nothing!/capture", json={"amount": -1})
    problem(on_a_path, 400, "idempotency_key_missing")
    assert await stack.count("payments") == 0
    metrics = (await stack.client.get("/metrics")).text
    assert 'decision="missing",route="POST /v1/payments"' in metrics
    assert 'decision="invalid",route="POST /v1/payments"' in metrics


@pytest.mark.parametrize(
    ("method", "code"),
    [("pm_card_declined", "card_declined"), ("pm_card_insufficient_funds", "insufficient_funds")],
)
async def test_declined_payment_is_created_as_failed(stack: Stack, method: str, code: str) -> None:
    response = await stack.pay(key="d", payment_method=method)
    assert response.status_code == 201
    payment = response.json()
    assert (payment["status"], payment["failure_code"]) == ("failed", code)
    assert payment["failure_message"]
    replay = await stack.pay(key="d", payment_method=method)
    assert replay.content == response.content
    assert await stack.ledger_violations() == []


async def test_authentication(stack: Stack) -> None:
    body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
    anonymous = httpx.AsyncClient(transport=stack.client._transport, base_url="http://payments")
    async with anonymous:
        response = await anonymous.post("/v1/payments", json=body, headers={"Idempotency-Key": "a"})
        problem(response, 401, "authentication_required")
        bad = {"Idempotency-Key": "a", "Authorization": "Bearer sk_test_nope"}
        problem(
            await anonymous.post("/v1/payments", json=body, headers=bad), 401, "invalid_api_key"
        )
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        problem(await anonymous.get("/v1/payments", headers=basic), 401, "invalid_api_key")
    assert await stack.count("payments") == 0


async def test_another_merchants_payment_is_not_found(stack: Stack) -> None:
    from oncepay.payments.merchants import create_merchant

    payment = (await stack.pay()).json()
    _, other_key = await create_merchant(stack.db, "Other shop")
    other = {"Authorization": f"Bearer {other_key}"}
    response = await stack.client.get(f"/v1/payments/{payment['id']}", headers=other)
    problem(response, 404, "resource_missing")
    capture = await stack.client.post(
        f"/v1/payments/{payment['id']}/refunds", headers={**other, "Idempotency-Key": "r"}
    )
    problem(capture, 404, "resource_missing")
    # The same key from two merchants names two records: no cross-tenant replay.
    mine = await stack.pay(key="shared")
    theirs = await stack.client.post(
        "/v1/payments",
        json={"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"},
        headers={**other, "Idempotency-Key": "shared"},
    )
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine.json()["id"]
    assert "idempotent-replayed" not in theirs.headers


async def test_manual_capture_then_refunds(stack: Stack) -> None:
    payment = (await stack.pay(capture_method="manual", amount=5000)).json()
    assert payment["status"] == "authorized"
    assert payment["amount_capturable"] == 5000
    pid = payment["id"]
    too_much = await stack.post(f"/v1/payments/{pid}/capture", {"amount": 5001})
    problem(too_much, 400, "amount_too_large")
    captured = await stack.post(f"/v1/payments/{pid}/capture", {"amount": 4000}, key="cap")
    assert captured.status_code == 200, captured.text
    assert (captured.json()["status"], captured.json()["amount_captured"]) == ("captured", 4000)
    replay = await stack.post(f"/v1/payments/{pid}/capture", {"amount": 4000}, key="cap")
    assert replay.content == captured.content
    problem(await stack.post(f"/v1/payments/{pid}/capture"), 409, "invalid_state_transition")
    problem(await stack.post(f"/v1/payments/{pid}/cancel"), 409, "invalid_state_transition")

    refund = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 1500})
    assert refund.status_code == 201, refund.text
    assert refund.json()["status"] == "succeeded"
    assert refund.json()["id"].startswith("re_")
    partial = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (partial["status"], partial["amount_refunded"]) == ("partially_refunded", 1500)
    over = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 2501})
    problem(over, 400, "amount_too_large")
    rest = await stack.post(f"/v1/payments/{pid}/refunds")
    assert rest.json()["amount"] == 2500
    done = (await stack.client.get(f"/v1/payments/{pid}")).json()
    assert (done["status"], done["amount_refunded"]) == ("refunded", 4000)
    problem(await stack.post(f"/v1/payments/{pid}/refunds"), 409, "invalid_state_transition")
    listed = (await stack.client.get(f"/v1/payments/{pid}/refunds")).json()["data"]
    assert [r["amount"] for r in listed] == [2500, 1500]  # newest first, like every list
    fetched = await stack.client.get(f"/v1/refunds/{listed[0]['id']}")
    assert fetched.json() == listed[0]
    assert await stack.ledger_violations() == []


async def test_cancel_an_authorization(stack: Stack) -> None:
    pid = (await stack.pay(capture_method="manual")).json()["id"]
    canceled = await stack.post(f"/v1/payments/{pid}/cancel")
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    problem(await stack.post(f"/v1/payments/{pid}/capture"), 409, "invalid_state_transition")
    problem(await stack.post(f"/v1/payments/{pid}/refunds"), 409, "invalid_state_transition")
    assert (await stack.client.get(f"/v1/payments/{pid}")).json()["status"] == "canceled"
    assert await stack.ledger_violations() == []


async def test_refund_of_a_failed_payment_is_an_invalid_transition(stack: Stack) -> None:
    pid = (await stack.pay(payment_method="pm_card_declined")).json()["id"]
    response = await stack.post(f"/v1/payments/{pid}/refunds")
    problem(response, 409, "invalid_state_transition")
    assert await stack.count("refunds") == 0


async def test_list_payments_with_cursor(stack: Stack) -> None:
    ids = [(await stack.pay(amount=100 + i)).json()["id"] for i in range(5)]
    first = (await stack.client.get("/v1/payments", params={"limit": 2})).json()
    assert [p["id"] for p in first["data"]] == ids[::-1][:2]
    assert first["has_more"] is True
    cursor = first["data"][-1]["id"]
    rest = (await stack.client.get("/v1/payments", params={"starting_after": cursor})).json()
    assert [p["id"] for p in rest["data"]] == ids[::-1][2:]
    assert rest["has_more"] is False
    unknown = await stack.client.get("/v1/payments", params={"starting_after": "pay_nope"})
    problem(unknown, 400, "invalid_request")


async def test_events_record_every_change(stack: Stack) -> None:
    pid = (await stack.pay(capture_method="manual")).json()["id"]
    await stack.post(f"/v1/payments/{pid}/capture")
    await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 100})
    listed = (await stack.client.get("/v1/events", params={"limit": 100})).json()["data"]
    types = [e["type"] for e in reversed(listed)]
    assert types == [
        "payment.created",
        "payment.authorized",
        "payment.captured",
        "refund.created",
        "refund.succeeded",
        "payment.refunded",
    ]
    captured = (await stack.client.get("/v1/events", params={"type": "payment.captured"})).json()
    assert [e["data"]["object"]["status"] for e in captured["data"]] == ["captured"]
    one = await stack.client.get(f"/v1/events/{captured['data'][0]['id']}")
    assert one.json() == captured["data"][0]


async def test_health_and_metrics(stack: Stack) -> None:
    assert (await stack.client.get("/health")).json() == {"status": "ok"}
    await stack.pay(key="m")
    await stack.pay(key="m")
    metrics = (await stack.client.get("/metrics")).text
    assert 'oncepay_idempotency_decisions_total{decision="replay"}' in metrics
    assert 'route="/v1/payments"' in metrics
    assert "oncepay_acquirer_calls_total" in metrics


async def test_openapi_document(stack: Stack) -> None:
    document = (await stack.client.get("/openapi.json")).json()
    assert document["openapi"].startswith("3.1")
    assert "/v1/payments/{id}/refunds" in document["paths"]
    docs = await stack.client.get("/docs")
    assert docs.status_code == 200


def _layers(app: object) -> list[str]:
    stack, names = app.build_middleware_stack(), []  # type: ignore[attr-defined]
    while stack is not None:
        names.append(type(stack).__name__)
        stack = getattr(stack, "app", None)
    return names


def test_fastapis_pass_through_layers_are_left_out_only_while_they_would_pass_through() -> None:
    """FastAPI's native exception telemetry (off here) and its app body limit (none set) add a
    frame to every request and do nothing; either one stays when it would do something."""
    from oncepay.payments.api.app import _Api, create_app
    from oncepay.payments.settings import Settings

    ours = _layers(create_app(Settings(database_url="sqlite:///unused.db", run_worker=False)))
    assert ours[:3] == ["ServerErrorMiddleware", "AccessLog", "RequestMetrics"]
    assert not {"ExceptionTelemetryMiddleware", "AppBodyLimitMiddleware"} & set(ours)
    off: Any = {"tracing": False, "metrics": False, "logs": False}
    assert _layers(_Api(telemetry=off, max_body_size=1000))[1] == "AppBodyLimitMiddleware"
    logs: Any = {**off, "logs": True}
    assert _layers(_Api(telemetry=logs))[1] == "ExceptionTelemetryMiddleware"


async def test_a_plain_payment_request_skips_fastapis_handler_and_answers_the_same(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /v1/payments is answered without FastAPI's dependency solving when it is plain (no
    query string, a body that validates); anything else goes through FastAPI, in its order,
    with the rate limit counted once either way."""
    from fastapi.dependencies.utils import solve_dependencies as solve

    from oncepay.payments.api.ratelimit import RateLimits

    solved: list[str] = []

    async def counted(*args: Any, **kwargs: Any) -> Any:
        solved.append(kwargs["request"].url.path)
        return await solve(*args, **kwargs)

    checks: list[str] = []
    check = RateLimits.check

    async def counted_check(self: RateLimits, key_id: str, merchant_id: str) -> None:
        checks.append(key_id)
        await check(self, key_id, merchant_id)

    monkeypatch.setattr("fastapi.routing.solve_dependencies", counted)
    monkeypatch.setattr(RateLimits, "check", counted_check)
    body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}

    first = await stack.pay(key="plain", **body)
    assert first.status_code == 201, first.text
    replay = await stack.pay(key="plain", **body)
    assert replay.json() == first.json()
    assert (solved, len(checks)) == ([], 2)

    # a body that does not validate: FastAPI's refusal (400), once the merchant is known
    problem(await stack.post("/v1/payments", {**body, "amount": -5}), 400, "invalid_request")
    assert (len(solved), len(checks)) == (1, 3)
    anonymous = httpx.AsyncClient(transport=stack.client._transport, base_url="http://payments")
    async with anonymous:
        bad = {"Idempotency-Key": "b", "Authorization": "Bearer sk_test_nope"}
        invalid = {**body, "amount": -5}
        for sent in (body, invalid):  # 401 whether the body validates or not
            response = await anonymous.post("/v1/payments", json=sent, headers=bad)
            problem(response, 401, "invalid_api_key")
    assert len(solved) == 2  # the valid body's 401 came from the direct path
    # a query string: FastAPI's unknown-query refusal, after authentication
    response = await stack.client.post(
        "/v1/payments?limt=5", json=body, headers={"Idempotency-Key": "q"}
    )
    problem(response, 400, "invalid_request")
    assert len(solved) == 3
    assert await stack.count("payments") == 1


async def test_a_refusal_by_the_acquirer_is_a_402_problem_and_replays(stack: Stack) -> None:
    """Found by a black-box review: the 402 was plain JSON with the code "acquirerrefused"."""
    payment = (await stack.pay(capture_method="manual")).json()
    async with read(stack.db) as conn:
        found = await conn.execute(
            text("SELECT authorization_id FROM payments WHERE id = :id"), {"id": payment["id"]}
        )
        authorization = found.scalar_one()
    voided = await stack.simulators["primary"].post(  # voided at the acquirer, out of band
        f"/v1/authorizations/{authorization}/void",
        json={"reference": "out-of-band-void"},
        headers={"Idempotency-Key": "out-of-band-void"},
    )
    assert voided.status_code == 201, voided.text
    capture = await stack.post(f"/v1/payments/{payment['id']}/capture", key="cap-refused")
    body = problem(capture, 402, "acquirer_refused")
    assert body["type"] == "urn:oncepay:problem:acquirer_refused"
    assert body["title"] == "The acquirer refused"
    assert "the acquirer refused to capture" in str(body["detail"])
    replay = await stack.post(f"/v1/payments/{payment['id']}/capture", key="cap-refused")
    assert replay.content == capture.content
    assert replay.headers["content-type"] == "application/problem+json"
    # A cancel asks for what is true at the acquirer already: the payment follows (it stayed
    # authorized for good, its hold in the ledger, before), and the ledger balances.
    cancel = await stack.post(f"/v1/payments/{payment['id']}/cancel")
    assert cancel.status_code == 200, cancel.text
    assert (cancel.json()["status"], cancel.json()["amount_capturable"]) == ("canceled", 0)
    assert await stack.ledger_violations() == []
