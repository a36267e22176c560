"""Webhook endpoint tools (issue 14): a test delivery ("ping") and the redelivery of every
event of a time range, both idempotent POSTs queued through the outbox and sent, signed, by the
delivery worker. On SQLite and PostgreSQL; deliveries answered in-process (nothing leaves it)."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from oncepay.payments.storage.schema import events
from oncepay.payments.webhooks.delivery import deliver_due
from oncepay.payments.webhooks.endpoints import MAX_REDELIVER
from oncepay.storage.db import write
from oncepay.webhooks import verify
from tests.payments.stack import Stack

pytestmark = pytest.mark.slow


class Inbox:
    """A receiver in-process: every delivery it got, verified with the endpoint's secret."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.secret = ""

    def handler(self, request: httpx.Request) -> httpx.Response:
        event = verify(request.content, dict(request.headers), self.secret)
        self.got.append((request.headers["webhook-id"], event))
        return httpx.Response(200)


async def endpoint(stack: Stack, inbox: Inbox, events: list[str] | None = None) -> str:
    body: dict[str, Any] = {"url": "http://hooks.invalid/in"}
    if events is not None:
        body["events"] = events
    response = await stack.post("/v1/webhook_endpoints", body)
    assert response.status_code == 201, response.text
    inbox.secret = response.json()["secret"]
    return str(response.json()["id"])


async def deliver(stack: Stack, inbox: Inbox) -> dict[str, int]:
    """Every delivery due: passes until one finds nothing (a pass takes at most PER_ENDPOINT
    deliveries of one endpoint)."""
    results: Counter[str] = Counter()
    async with httpx.AsyncClient(transport=httpx.MockTransport(inbox.handler)) as client:
        while (report := await deliver_due(stack.services, client)).total:
            results.update(report.results)
    return dict(results)


async def test_a_test_delivery_is_signed_and_sent_to_that_endpoint_only(stack: Stack) -> None:
    inbox = Inbox()
    other = await endpoint(stack, Inbox())  # subscribed to everything: still gets no ping
    mine = await endpoint(stack, inbox, events=["refund.succeeded"])
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/test", key="ping-1")
    assert response.status_code == 200, response.text
    queued = response.json()
    assert (queued["object"], queued["endpoint"], queued["status"]) == (
        "webhook_delivery",
        mine,
        "pending",
    )
    again = await stack.post(f"/v1/webhook_endpoints/{mine}/test", key="ping-1")
    assert again.json() == queued  # the same key: the same ping, not a second one
    assert await deliver(stack, inbox) == {"succeeded": 1}
    [(webhook_id, event)] = inbox.got
    assert webhook_id == queued["event"]
    assert event["type"] == "webhook_endpoint.test"
    assert event["data"]["object"]["id"] == mine
    detail = (await stack.client.get(f"/v1/webhook_deliveries/{queued['id']}")).json()
    assert detail["status"] == "succeeded"
    other_deliveries = await stack.client.get(f"/v1/webhook_endpoints/{other}/deliveries")
    assert other_deliveries.json()["data"] == []
    # Nor does a ping go out again as a redelivery, to every subscriber or to one endpoint.
    for body in ({}, {"endpoint": other}, {"endpoint": mine}):
        again = await stack.post(f"/v1/events/{queued['event']}/redeliver", body)
        assert again.status_code == 400, again.text
        assert "is a test ping: it is not redelivered" in again.json()["detail"]
    assert (await stack.client.get(f"/v1/webhook_endpoints/{other}/deliveries")).json()[
        "data"
    ] == []
    # Each ping is a new event, so a new webhook-id: a receiver's de-duplication lets it in.
    second = await stack.post(f"/v1/webhook_endpoints/{mine}/test")
    assert second.json()["event"] != queued["event"]
    listed = await stack.client.get("/v1/events", params={"type": "webhook_endpoint.test"})
    assert len(listed.json()["data"]) == 2


async def test_a_disabled_or_unknown_endpoint_cannot_be_tested(stack: Stack) -> None:
    mine = await endpoint(stack, Inbox())
    await stack.post(f"/v1/webhook_endpoints/{mine}", {"disabled": True})
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/test")
    assert response.status_code == 400
    assert "disabled" in response.json()["detail"]
    missing = await stack.post("/v1/webhook_endpoints/we_" + "0" * 24 + "/test")
    assert missing.status_code == 404
    no_key = await stack.client.post(f"/v1/webhook_endpoints/{mine}/test")
    assert no_key.status_code == 400
    assert "Idempotency-Key" in no_key.json()["detail"]


async def _payments_at(stack: Stack, times: list[float]) -> list[str]:
    """One payment per time; its events moved to that time. The payments' ids, in order."""
    made = []
    for at in times:
        payment = (await stack.pay()).json()["id"]
        async with write(stack.db) as conn:
            await conn.execute(
                update(events).where(events.c.object_id == payment).values(created_at=at)
            )
        made.append(payment)
    return made


async def test_redelivery_of_a_time_range(stack: Stack) -> None:
    inbox = Inbox()
    mine = await endpoint(stack, inbox, events=["payment.captured"])
    base = time.time() - 3600
    await _payments_at(stack, [base, base + 100, base + 200])
    assert await deliver(stack, inbox) == {"succeeded": 3}
    inbox.got.clear()
    in_range = await stack.client.get(
        "/v1/events", params={"type": "payment.captured", "created[gte]": int(base) + 50}
    )
    wanted = [event["id"] for event in in_range.json()["data"]]
    assert len(wanted) == 2
    body = {"created": {"gte": int(base) + 50, "lte": int(base) + 200}}
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/redeliver", body, key="again")
    assert response.status_code == 200, response.text
    assert response.json() == {"object": "webhook_redelivery", "endpoint": mine, "deliveries": 2}
    replay = await stack.post(f"/v1/webhook_endpoints/{mine}/redeliver", body, key="again")
    assert replay.json() == response.json()
    assert await deliver(stack, inbox) == {"succeeded": 2}  # the replay queued nothing more
    # Each keeps its event's webhook-id (Standard Webhooks: a message re-sent keeps its id).
    assert sorted(webhook_id for webhook_id, _ in inbox.got) == sorted(wanted)
    assert {event["type"] for _, event in inbox.got} == {"payment.captured"}
    nothing = await stack.post(
        f"/v1/webhook_endpoints/{mine}/redeliver", {"created": {"gt": int(base) + 300}}
    )
    assert nothing.json()["deliveries"] == 0


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "created"),
        ({"created": {}}, "lower bound"),
        ({"created": {"lte": 5}}, "lower bound"),
        ({"created": {"gte": "yesterday"}}, "created.gte"),
        ({"created": {"gte": -1}}, "created.gte"),
        ({"created": {"gte": 1, "since": 2}}, "since"),
    ],
)
async def test_redelivery_bad_input(stack: Stack, body: dict[str, Any], detail: str) -> None:
    mine = await endpoint(stack, Inbox())
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/redeliver", body)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]


async def test_a_range_too_large_is_refused_whole(stack: Stack, monkeypatch: Any) -> None:
    from oncepay.payments.webhooks import endpoints

    monkeypatch.setattr(endpoints, "MAX_REDELIVER", 2)
    mine = await endpoint(stack, Inbox())
    await stack.pay()  # three events
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/redeliver", {"created": {"gte": 0}})
    assert response.status_code == 400
    assert "narrow the range" in response.json()["detail"]
    deliveries = await stack.client.get(f"/v1/webhook_endpoints/{mine}/deliveries")
    assert len(deliveries.json()["data"]) == 3  # the fan-out's, nothing more
    assert MAX_REDELIVER == 1000


async def test_another_merchants_events_are_never_redelivered(stack: Stack) -> None:
    from oncepay.payments.merchants import create_merchant

    inbox = Inbox()
    mine = await endpoint(stack, inbox)
    _, other_key = await create_merchant(stack.db, "Other shop")
    theirs = await stack.client.post(
        "/v1/payments",
        json={"amount": 100, "currency": "USD", "payment_method": "pm_card_ok"},
        headers={"Authorization": f"Bearer {other_key}", "Idempotency-Key": "theirs"},
    )
    assert theirs.status_code == 201
    response = await stack.post(f"/v1/webhook_endpoints/{mine}/redeliver", {"created": {"gte": 0}})
    assert response.json()["deliveries"] == 0
    assert await deliver(stack, inbox) == {}
    assert json.dumps(inbox.got) == "[]"
