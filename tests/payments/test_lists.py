"""Lists (issue 14): one list object everywhere, pages both ways (``starting_after``,
``ending_before``), filters on payments (status, currency, created and amount ranges,
``metadata[key]``), and cursors that must come from the list they are used on: a cursor from
another list, or another merchant's object, is a 400 that reveals nothing. On SQLite and
PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import inspect, update

from oncepay.payments.merchants import create_merchant
from oncepay.payments.storage.schema import payments, refunds
from oncepay.storage.db import read, write
from tests.payments.stack import Stack

pytestmark = pytest.mark.slow


async def listed(stack: Stack, path: str, **params: Any) -> dict[str, Any]:
    response = await stack.client.get(path, params=params)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def ids(page: dict[str, Any]) -> list[str]:
    return [item["id"] for item in page["data"]]


async def pay_many(stack: Stack, count: int, **fields: Any) -> list[str]:
    """``count`` payments, oldest first."""
    made = []
    for _ in range(count):
        response = await stack.pay(**fields)
        assert response.status_code == 201, response.text
        made.append(response.json()["id"])
    return made


async def test_pages_forwards_and_backwards(stack: Stack) -> None:
    made = await pay_many(stack, 5)
    newest_first = made[::-1]
    first = await listed(stack, "/v1/payments", limit=2)
    assert first["object"] == "list"
    assert first["url"] == "/v1/payments"
    assert (ids(first), first["has_more"]) == (newest_first[:2], True)
    second = await listed(stack, "/v1/payments", limit=2, starting_after=ids(first)[-1])
    assert (ids(second), second["has_more"]) == (newest_first[2:4], True)
    third = await listed(stack, "/v1/payments", limit=2, starting_after=ids(second)[-1])
    assert (ids(third), third["has_more"]) == (newest_first[4:], False)
    # Back from the third page: the previous page, still newest first; has_more says there
    # are newer ones still before it.
    back = await listed(stack, "/v1/payments", limit=2, ending_before=ids(third)[0])
    assert (ids(back), back["has_more"]) == (newest_first[2:4], True)
    back = await listed(stack, "/v1/payments", limit=2, ending_before=ids(back)[0])
    assert (ids(back), back["has_more"]) == (newest_first[:2], False)
    newest = await listed(stack, "/v1/payments", limit=10, ending_before=made[0])
    assert (ids(newest), newest["has_more"]) == (newest_first[:4], False)


async def test_both_cursors_at_once_is_a_400(stack: Stack) -> None:
    [a, b] = await pay_many(stack, 2)
    response = await stack.client.get(
        "/v1/payments", params={"starting_after": a, "ending_before": b}
    )
    assert response.status_code == 400
    assert "not both" in response.json()["detail"]


async def test_status_currency_and_amount_filters(stack: Stack) -> None:
    held = await pay_many(stack, 2, capture_method="manual", amount=500)
    captured = await pay_many(stack, 1, amount=2500)
    [yen] = await pay_many(stack, 1, currency="JPY", amount=700)
    declined = await pay_many(stack, 1, payment_method="pm_card_declined", amount=900)
    assert ids(await listed(stack, "/v1/payments", status="authorized")) == held[::-1]
    assert ids(await listed(stack, "/v1/payments", status="failed")) == declined
    assert ids(await listed(stack, "/v1/payments", currency="JPY")) == [yen]
    assert ids(await listed(stack, "/v1/payments", **{"amount[gte]": 2500})) == captured
    between = await listed(stack, "/v1/payments", **{"amount[gt]": 500, "amount[lte]": 900})
    assert ids(between) == [declined[0], yen]
    assert ids(await listed(stack, "/v1/payments", **{"amount[lt]": 501})) == held[::-1]


async def test_created_ranges_take_whole_seconds(stack: Stack) -> None:
    made = await pay_many(stack, 3)
    # Force the creation times: 1000.0, 1000.7 and 1002.5 (shown as 1000, 1000, 1002).
    async with write(stack.db) as conn:
        for payment_id, at in zip(made, (1000.0, 1000.7, 1002.5), strict=True):
            await conn.execute(
                update(payments).where(payments.c.id == payment_id).values(created_at=at)
            )
    shown = await listed(stack, "/v1/payments")
    assert [p["created"] for p in shown["data"]] == [1002, 1000, 1000]

    async def created(**bounds: int) -> list[str]:
        return ids(
            await listed(stack, "/v1/payments", **{f"created[{k}]": v for k, v in bounds.items()})
        )

    assert await created(lte=1000) == made[1::-1]  # 1000.7 is "1000" too
    assert await created(lt=1000) == []
    assert await created(gte=1000) == made[::-1]
    assert await created(gt=1000) == [made[2]]
    assert await created(gte=1001, lte=1002) == [made[2]]
    assert await created(gt=1002) == []


async def test_metadata_filters(stack: Stack) -> None:
    odd = {"order": "1", 'quote"key': "a.b", "dot.key": "$x"}
    [a] = await pay_many(stack, 1, metadata=odd)
    [b] = await pay_many(stack, 1, metadata={"order": "2", "dot.key": "$x"})
    await pay_many(stack, 1)
    assert ids(await listed(stack, "/v1/payments", **{"metadata[order]": "1"})) == [a]
    assert ids(await listed(stack, "/v1/payments", **{"metadata[dot.key]": "$x"})) == [b, a]
    both = {"metadata[dot.key]": "$x", 'metadata[quote"key]': "a.b"}
    assert ids(await listed(stack, "/v1/payments", **both)) == [a]
    assert ids(await listed(stack, "/v1/payments", **{"metadata[order]": "3"})) == []
    assert ids(await listed(stack, "/v1/payments", **{"metadata[nope]": "1"})) == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"metadata": "1"}, "unknown query parameter"),
        ({"metadatax[a]": "1"}, "unknown query parameter"),
        ({"metadata[]": "1"}, "metadata key"),
        ({"metadata[a]": "x" * 501}, "at most 500"),
        ({"created[gte]": "yesterday"}, "created[gte]"),
        ({"created[gte]": "-1"}, "created[gte]"),
        ({"amount[lt]": "1.5"}, "amount[lt]"),
        ({"status": "paid"}, "status"),
        ({"currency": "usd"}, "currency"),
        ({"ending_before": "x" * 65}, "ending_before"),
    ],
)
async def test_bad_filters_are_400(stack: Stack, params: dict[str, str], detail: str) -> None:
    response = await stack.client.get("/v1/payments", params=params)
    assert response.status_code == 400, response.text
    assert detail in response.json()["detail"]


async def test_a_cursor_must_come_from_the_same_list(stack: Stack) -> None:
    [small] = await pay_many(stack, 1, amount=100)
    [big] = await pay_many(stack, 1, amount=5000)
    refund = (await stack.post(f"/v1/payments/{big}/refunds", {"amount": 10})).json()["id"]
    other_merchant, other_key = await create_merchant(stack.db, "Other shop")
    theirs = await stack.client.post(
        "/v1/payments",
        json={"amount": 100, "currency": "USD", "payment_method": "pm_card_ok"},
        headers={"Authorization": f"Bearer {other_key}", "Idempotency-Key": "theirs"},
    )
    their_id = theirs.json()["id"]
    cases = [
        ({"starting_after": small, "amount[gte]": 1000}, small),  # filtered out of this list
        ({"ending_before": refund}, refund),  # a refund on the payments list
        ({"starting_after": their_id}, their_id),  # another merchant's payment
        ({"starting_after": "pay_" + "0" * 24}, "pay_"),  # no such payment at all
    ]
    for params, named in cases:
        response = await stack.client.get("/v1/payments", params=params)
        assert response.status_code == 400, (params, response.text)
        problem = response.json()
        assert problem["code"] == "invalid_request"
        assert named in problem["detail"]
        assert "not an object of this list" in problem["detail"]
    # The other merchant's page is as if the cursor were unknown: no data, nothing about it.
    assert other_merchant.id not in response.text


async def test_a_cursor_stays_valid_when_its_status_changes(stack: Stack) -> None:
    held = await pay_many(stack, 3, capture_method="manual")
    page = await listed(stack, "/v1/payments", status="authorized", limit=1)
    [cursor] = ids(page)
    captured = await stack.post(f"/v1/payments/{cursor}/capture")
    assert captured.status_code == 200
    after = await listed(stack, "/v1/payments", status="authorized", starting_after=cursor)
    assert ids(after) == held[1::-1]


async def test_refund_lists_page_both_ways(stack: Stack) -> None:
    [payment, other] = await pay_many(stack, 2, amount=5000)
    made = []
    for _ in range(3):
        response = await stack.post(f"/v1/payments/{payment}/refunds", {"amount": 100})
        assert response.status_code == 201
        made.append(response.json()["id"])
    elsewhere = (await stack.post(f"/v1/payments/{other}/refunds", {"amount": 100})).json()["id"]
    path = f"/v1/payments/{payment}/refunds"
    first = await listed(stack, path, limit=2)
    assert (ids(first), first["has_more"], first["url"]) == (made[:0:-1], True, path)
    rest = await listed(stack, path, limit=2, starting_after=made[1])
    assert (ids(rest), rest["has_more"]) == ([made[0]], False)
    back = await listed(stack, path, limit=2, ending_before=made[0])
    assert ids(back) == made[:0:-1]
    everywhere = await listed(stack, "/v1/refunds")
    assert (ids(everywhere), everywhere["url"]) == ([elsewhere, *made[::-1]], "/v1/refunds")
    assert ids(await listed(stack, "/v1/refunds", payment=other)) == [elsewhere]
    # A refund of another payment is not a cursor of this payment's refunds.
    response = await stack.client.get(path, params={"starting_after": elsewhere})
    assert response.status_code == 400
    response = await stack.client.get("/v1/refunds", params={"payment": "pay_nope"})
    assert response.status_code == 400


async def test_refund_status_filter(stack: Stack) -> None:
    [payment] = await pay_many(stack, 1, amount=5000)
    made = (await stack.post(f"/v1/payments/{payment}/refunds", {"amount": 100})).json()
    async with write(stack.db) as conn:
        await conn.execute(
            update(refunds).where(refunds.c.id == made["id"]).values(status="failed")
        )
    assert ids(await listed(stack, "/v1/refunds", status="failed")) == [made["id"]]
    assert ids(await listed(stack, "/v1/refunds", status="succeeded")) == []


async def test_event_and_delivery_lists_page(stack: Stack) -> None:
    body = {"url": "http://127.0.0.1:9/hook", "events": ["payment.captured"]}
    endpoint = (await stack.post("/v1/webhook_endpoints", body)).json()["id"]
    await pay_many(stack, 3)
    path = f"/v1/webhook_endpoints/{endpoint}/deliveries"
    first = await listed(stack, path, limit=2)
    assert (len(first["data"]), first["has_more"], first["url"]) == (2, True, path)
    rest = await listed(stack, path, limit=2, starting_after=ids(first)[-1])
    assert (len(rest["data"]), rest["has_more"]) == (1, False)
    back = await listed(stack, path, limit=5, ending_before=ids(rest)[0])
    assert ids(back) == ids(first)
    captured = await listed(stack, "/v1/events", type="payment.captured")
    assert len(captured["data"]) == 3
    event = captured["data"][0]["id"]
    of_event = await listed(stack, f"/v1/events/{event}/deliveries", limit=1)
    assert (len(of_event["data"]), of_event["has_more"]) == (1, False)
    assert of_event["url"] == f"/v1/events/{event}/deliveries"
    # A delivery of one event is not a cursor of another event's deliveries.
    other = captured["data"][1]["id"]
    response = await stack.client.get(
        f"/v1/events/{other}/deliveries", params={"starting_after": ids(of_event)[0]}
    )
    assert response.status_code == 400


async def test_the_lists_read_by_index(stack: Stack) -> None:
    async with read(stack.db) as conn:
        names = await conn.run_sync(
            lambda sync: {
                index["name"]
                for table in ("payments", "refunds", "events", "webhook_deliveries")
                for index in inspect(sync).get_indexes(table)
            }
        )
    assert {
        "payments_merchant_status",
        "payments_merchant_created",
        "refunds_merchant_seq",
        "refunds_payment_seq",
        "events_merchant_type",
        "events_merchant_created",
        "webhook_deliveries_endpoint_seq",
        "webhook_deliveries_event_seq",
    } <= names


@pytest.mark.parametrize(
    ("where", "index"),
    [
        ("merchant_id = :m AND status = :s ORDER BY seq DESC", "payments_merchant_status"),
        ("merchant_id = :m AND created_at >= :t", "payments_merchant_created"),
    ],
)
async def test_payment_filters_read_by_an_index(stack: Stack, where: str, index: str) -> None:
    from sqlalchemy import text

    query = f"SELECT id FROM payments WHERE {where} LIMIT 11"
    params = {"m": stack.merchant.id, "s": "captured", "t": 0.0}
    async with read(stack.db) as conn:
        if stack.db.is_sqlite:
            plan = await conn.execute(text(f"EXPLAIN QUERY PLAN {query}"), params)
        else:
            # A few rows: the planner would rightly scan; forbid that to see the index is usable.
            await conn.execute(text("SET LOCAL enable_seqscan = off"))
            plan = await conn.execute(text(f"EXPLAIN {query}"), params)
        lines = " ".join(str(row[-1]) for row in plan)
    # Ours (migration 7), or another that serves as well (PostgreSQL may pick either).
    assert "INDEX" in lines.upper(), lines
    assert "Seq Scan" not in lines, lines
    if stack.db.is_sqlite:
        assert index in lines, lines
