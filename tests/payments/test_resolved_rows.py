"""A payment's new state is not read back from the database (``resolve`` builds it from the
row the transaction holds, and on PostgreSQL the update travels with the next statement:
storage/raw.py). What the operations answer and put in their events must still be the row
the database holds, to the column and the type, on both databases."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import text

from oncepay.payments.operations.common import load_payment, resolve
from oncepay.payments.states import Transition
from oncepay.storage.db import read, write
from tests.payments.stack import Stack


def _types(row: Any) -> list[type]:
    return [type(value) for value in row]


async def test_a_resolved_row_is_the_row_the_database_holds(stack: Stack) -> None:
    created = await stack.pay(capture_method="manual")
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]
    async with write(stack.db) as conn:
        row = await load_payment(conn, payment_id, lock=True)
        assert row.status == "authorized"
        resolved = await resolve(
            conn, row, Transition.CAPTURE, amount_captured=row.amount, pending_operation=None
        )
        within = await load_payment(conn, payment_id)  # the same transaction sees it
        assert within == resolved
        assert _types(within) == _types(resolved)
    async with read(stack.db) as conn:
        after = await load_payment(conn, payment_id)
    assert after == resolved
    assert _types(after) == _types(resolved)
    assert (after.status, after.amount_captured) == ("captured", row.amount)


async def test_every_answer_is_the_payment_as_stored(stack: Stack) -> None:
    """Create (automatic capture: authorized, then captured in one transaction), a manual
    payment's capture, a partial and a full refund: each answer equals the payment read
    afterwards."""
    automatic = await stack.pay()
    assert automatic.status_code == 201, automatic.text
    assert (await stack.client.get(f"/v1/payments/{automatic.json()['id']}")).json() == (
        automatic.json()
    )
    manual = (await stack.pay(capture_method="manual")).json()
    captured = await stack.post(f"/v1/payments/{manual['id']}/capture", {})
    assert captured.status_code == 200, captured.text
    stored = (await stack.client.get(f"/v1/payments/{manual['id']}")).json()
    assert captured.json() == stored
    assert stored["status"] == "captured"
    for amount in (100, stored["amount"] - 100):
        refund = await stack.post(f"/v1/payments/{manual['id']}/refunds", {"amount": amount})
        assert refund.status_code == 201, refund.text
    final = (await stack.client.get(f"/v1/payments/{manual['id']}")).json()
    assert (final["status"], final["amount_refunded"]) == ("refunded", stored["amount"])
    # The newest events (first in the list) show the payment as stored, too.
    events = (await stack.client.get("/v1/events", params={"limit": 100})).json()["data"]
    newest = {}
    for event in reversed(events):
        newest[event["data"]["object"]["id"]] = event["data"]["object"]
    assert newest[manual["id"]] == final
    assert newest[automatic.json()["id"]] == automatic.json()


async def test_every_event_shows_the_payment_at_its_change_in_order(stack: Stack) -> None:
    """Each event of a transaction that changes a payment twice (create with automatic
    capture; refunds: the refund's event, then the payment's) is the payment as that change
    left it, in the order of the changes, with a delivery per subscribed endpoint (on
    PostgreSQL the second event's rows join the first's pending insert)."""
    for types in (["*"], ["payment.captured", "refund.succeeded"]):
        body = {"url": "https://example.com/hook", "events": types}
        assert (await stack.post("/v1/webhook_endpoints", body)).status_code == 201
    automatic = (await stack.pay()).json()
    manual = (await stack.pay(capture_method="manual")).json()
    captured = await stack.post(f"/v1/payments/{manual['id']}/capture", {"amount": 800})
    assert captured.status_code == 200, captured.text
    for amount in (300, 500):
        refund = await stack.post(f"/v1/payments/{manual['id']}/refunds", {"amount": amount})
        assert refund.status_code == 201, refund.text
    async with read(stack.db) as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT e.type, e.object_id, e.data, (SELECT count(*) FROM webhook_deliveries"
                    " d WHERE d.event_id = e.id) FROM events e ORDER BY e.seq"
                )
            )
        ).all()
    for type_, _, _, deliveries in rows:
        assert deliveries == 1 + (type_ in ("payment.captured", "refund.succeeded")), type_
    shown = [
        (type_, json.loads(data)["status"], json.loads(data)["amount_captured"])
        for type_, object_id, data, _ in rows
        if object_id == automatic["id"]
    ]
    assert shown == [
        ("payment.created", "processing", 0),
        ("payment.authorized", "authorized", 0),
        ("payment.captured", "captured", 1000),
    ]
    refunded = [
        (json.loads(data)["status"], json.loads(data)["amount_refunded"])
        for type_, object_id, data, _ in rows
        if object_id == manual["id"] and type_ == "payment.refunded"
    ]
    assert refunded == [("partially_refunded", 300), ("refunded", 800)]
    types = [type_ for type_, *_ in rows]
    assert types[-6:] == ["refund.created", "refund.succeeded", "payment.refunded"] * 2
