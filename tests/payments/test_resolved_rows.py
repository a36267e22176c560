"""A payment's new state is not read back from the database (``resolve`` builds it from the
row the transaction holds, and on PostgreSQL the update travels with the next statement:
storage/raw.py). What the operations answer and put in their events must still be the row
the database holds, to the column and the type, on both databases."""

from __future__ import annotations

from typing import Any

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
