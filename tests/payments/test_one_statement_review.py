"""Review of a new payment's phases at once (payments/operations/onestatement.py): webhook
endpoints changing between the phases, bad input, follow-on operations, the SQLite writer
after a failed raw transaction, and many payments at once — each compared with the usual
transactions where the two can be compared."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from oncepay.payments.operations import CreatePayment, onestatement
from oncepay.storage.db import read, write, write_raw
from tests.payments.stack import Stack

BODY = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_ok"}


async def rows(stack: Stack, sql: str, **params: Any) -> list[Any]:
    async with read(stack.db) as conn:
        return list((await conn.execute(text(sql), params)).all())


async def endpoint(stack: Stack, name: str, events: list[str] | None = None) -> str:
    body: dict[str, Any] = {"url": f"https://hooks.example/{name}"}
    if events is not None:
        body["events"] = events
    created = await stack.post("/v1/webhook_endpoints", body)
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def delivered(stack: Stack, payment_id: str, names: dict[str, str]) -> set[tuple[str, str]]:
    """(event type, endpoint name) of every delivery of the payment's events."""
    by_id = {v: k for k, v in names.items()}
    found = await rows(
        stack,
        "SELECT e.type, d.endpoint_id FROM webhook_deliveries AS d JOIN events AS e "
        "ON e.id = d.event_id WHERE e.object_id = :p",
        p=payment_id,
    )
    pairs = [(r.type, by_id.get(r.endpoint_id, r.endpoint_id)) for r in found]
    assert len(pairs) == len(set(pairs)), pairs  # one delivery per event and endpoint
    return set(pairs)


@pytest.mark.parametrize("way", ["fast", "usual"])
async def test_endpoints_changed_between_the_phases(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """During the acquirer call an endpoint is created, one disabled, one deleted, one
    re-enabled: payment.created goes to the endpoints as they were in phase 1, the events of
    phase 2 to them as they are then — the same either way."""
    names = {
        "kept": await endpoint(stack, "kept"),
        "disabled": await endpoint(stack, "disabled"),
        "deleted": await endpoint(stack, "deleted", ["payment.created", "payment.captured"]),
        "reenabled": await endpoint(stack, "reenabled", ["payment.authorized"]),
    }
    await stack.post(f"/v1/webhook_endpoints/{names['reenabled']}", {"disabled": True})
    real_call = CreatePayment.call

    async def call_then_change(self: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await real_call(self, *args, **kwargs)
        names["new"] = await endpoint(stack, "new", ["payment.captured"])
        names["star"] = await endpoint(stack, "star", ["*"])
        changed = await stack.post(f"/v1/webhook_endpoints/{names['disabled']}", {"disabled": True})
        assert changed.status_code == 200, changed.text
        changed = await stack.post(
            f"/v1/webhook_endpoints/{names['reenabled']}", {"disabled": False}
        )
        assert changed.status_code == 200, changed.text
        gone = await stack.client.delete(f"/v1/webhook_endpoints/{names['deleted']}")
        assert gone.is_success, gone.text
        return answer

    monkeypatch.setattr(CreatePayment, "call", call_then_change)
    if way == "usual":
        monkeypatch.setattr(onestatement, "usable", lambda *args, **kwargs: False)
    response = await stack.post("/v1/payments", BODY, key="k")
    assert response.status_code == 201, response.text
    assert await delivered(stack, response.json()["id"], names) == {
        ("payment.created", "kept"),
        ("payment.created", "disabled"),
        ("payment.created", "deleted"),
        ("payment.authorized", "kept"),
        ("payment.authorized", "star"),
        ("payment.authorized", "reenabled"),
        ("payment.captured", "kept"),
        ("payment.captured", "star"),
        ("payment.captured", "new"),
    }
    assert await stack.ledger_violations() == []


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"description": "a\x00b"}, id="description"),
        pytest.param({"metadata": {"k": "v\x00"}}, id="metadata-value"),
        pytest.param({"metadata": {"k\x00": "v"}}, id="metadata-key"),
        pytest.param({"description": "\ud800"}, id="lone-surrogate"),
        pytest.param({"amount": 0}, id="amount-zero"),
        pytest.param({"amount": 2**63}, id="amount-huge"),
    ],
)
async def test_bad_input_is_a_4xx_and_writes_no_payment(
    stack: Stack, fields: dict[str, Any]
) -> None:
    # ASCII JSON: a lone surrogate travels as its escape, as a client's JSON may carry it
    response = await stack.client.post(
        "/v1/payments",
        content=json.dumps({**BODY, **fields}),
        headers={"Idempotency-Key": "bad", "Content-Type": "application/json"},
    )
    assert 400 <= response.status_code < 500, response.text
    assert await stack.count("payments") == 0
    assert await stack.count("events") == 0


@pytest.mark.parametrize(
    "text_in",
    ['O\'Brien "quoted" \\ back; -- $1 ?', "日本語 🎉 \u2028\u200b", "x" * 1000],
    ids=["quotes", "unicode", "longest"],
)
async def test_awkward_text_round_trips_the_same_both_ways(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, text_in: str
) -> None:
    metadata = {f"k{i}": text_in[:500] for i in range(49)}
    metadata["'\"?$1"] = "é"
    body = {**BODY, "description": text_in, "metadata": metadata}
    fast = await stack.post("/v1/payments", body, key="fast")
    with monkeypatch.context() as patch:
        patch.setattr(onestatement, "usable", lambda *args, **kwargs: False)
        usual = await stack.post("/v1/payments", body, key="usual")
    for response in (fast, usual):
        assert response.status_code == 201, response.text
        got = await stack.client.get(f"/v1/payments/{response.json()['id']}")
        assert got.status_code == 200
        assert (got.json()["description"], got.json()["metadata"]) == (text_in, metadata)
        assert got.json() == response.json()
    listed = await stack.client.get("/v1/events", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    documents = [e["data"] for e in listed.json()["data"]]
    assert documents, listed.json()
    for document in documents:
        payment = document.get("object", document)
        assert payment["metadata"] == metadata


async def test_manual_capture_then_the_follow_ons_work(stack: Stack) -> None:
    """Payments authorized by the statements, then captured in part, refunded, cancelled by
    the usual transactions: the rows they see are consistent and the ledger balances."""
    await endpoint(stack, "all")
    first = await stack.post("/v1/payments", {**BODY, "capture_method": "manual"})
    second = await stack.post("/v1/payments", {**BODY, "capture_method": "manual"})
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["status"] == second.json()["status"] == "authorized"
    pid, other = first.json()["id"], second.json()["id"]
    captured = await stack.post(f"/v1/payments/{pid}/capture", {"amount": 1000})
    assert captured.status_code == 200, captured.text
    assert captured.json()["amount_captured"] == 1000
    refund = await stack.post(f"/v1/payments/{pid}/refunds", {"amount": 400})
    assert refund.status_code in (200, 201), refund.text
    cancelled = await stack.post(f"/v1/payments/{other}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "canceled"
    got = await stack.client.get(f"/v1/payments/{pid}")
    assert (got.json()["amount_captured"], got.json()["amount_refunded"]) == (1000, 400)
    assert await stack.ledger_violations() == []
    events = await stack.client.get("/v1/events", params={"limit": 100})
    assert events.status_code == 200
    for event in events.json()["data"]:
        deliveries = await stack.client.get(f"/v1/events/{event['id']}/deliveries")
        assert deliveries.status_code == 200, deliveries.text
        assert len(deliveries.json()["data"]) == 1, (event["type"], deliveries.json())


async def test_many_payments_at_once_with_endpoints_toggled(stack: Stack) -> None:
    """64 requests (16 keys sent twice, 32 single) at once while an endpoint is toggled:
    one payment a key, the ledger balanced, every event delivered to the always-enabled
    endpoint exactly once."""
    always = await endpoint(stack, "always")
    toggled = await endpoint(stack, "toggled")
    keys = [f"dup-{i}" for i in range(16)] * 2 + [f"one-{i}" for i in range(32)]
    stop = asyncio.Event()

    async def toggle() -> None:
        flag = True
        while not stop.is_set():
            await stack.post(f"/v1/webhook_endpoints/{toggled}", {"disabled": flag})
            flag = not flag

    toggler = asyncio.create_task(toggle())
    try:
        answers = await asyncio.gather(*(stack.post("/v1/payments", BODY, key=k) for k in keys))
    finally:
        stop.set()
        await toggler
    assert {a.status_code for a in answers} <= {201, 409}, [a.text for a in answers]
    assert await stack.count("payments") == 48
    assert await stack.ledger_violations() == []
    (missing,) = await rows(
        stack,
        "SELECT count(*) AS n FROM events AS e WHERE NOT EXISTS (SELECT 1 FROM "
        "webhook_deliveries AS d WHERE d.event_id = e.id AND d.endpoint_id = :a)",
        a=always,
    )
    assert missing.n == 0
    (doubled,) = await rows(
        stack,
        "SELECT count(*) AS n FROM (SELECT event_id, endpoint_id FROM webhook_deliveries "
        "GROUP BY event_id, endpoint_id HAVING count(*) > 1) AS x",
    )
    assert doubled.n == 0


@pytest.mark.parametrize("error", [ValueError("boom"), asyncio.CancelledError()])
async def test_write_raw_rolls_back_and_the_writer_stays_usable(
    sqlite_stack: Stack, error: BaseException
) -> None:
    """A raw SQLite transaction whose block raises after writing: nothing is left, and the
    next transactions (raw and SQLAlchemy's) run on the writer as before."""
    stack = sqlite_stack

    async def failing() -> None:
        async with write_raw(stack.db) as conn:
            conn.execute(
                "INSERT INTO events (id, merchant_id, type, object_id, data, created_at) "
                "VALUES ('evt_x', ?, 'payment.created', 'pay_x', '{}', 0)",
                (stack.merchant.id,),
            )
            raise error

    with pytest.raises(type(error)):
        await failing()
    assert await stack.count("events") == 0
    async with write_raw(stack.db) as conn:
        assert conn.in_transaction  # a fresh transaction, nothing left of the failed one
        assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    async with write(stack.db) as sa:
        await sa.execute(text("SELECT 1"))
    response = await stack.post("/v1/payments", BODY)
    assert response.status_code == 201, response.text
    assert await stack.ledger_violations() == []


_WAITING = (
    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
    "AND query LIKE 'WITH k AS (INSERT INTO%' AND query LIKE '%' || $1 || '%'"
)


@pytest.mark.parametrize("other", ["rolled-back", "committed"])
@pytest.mark.postgres
async def test_phase_1_waiting_for_a_first_attempt_of_the_same_key(
    postgres_stack: Stack, other: str
) -> None:
    """PostgreSQL: another transaction has inserted the same key, uncommitted, when phase 1's
    statement comes (a first attempt still in its phase 1): the statement waits on the key's
    index. Committed, the key has a record and the gate answers (nothing inserted); rolled
    back, the statement inserts and the payment completes — without a delivery of
    payment.created to an endpoint created during the wait (the documented limitation), with
    every later event delivered to it."""
    stack = postgres_stack  # SQLite's writer lock: no wait inside a statement there
    url, schema = stack.db.url, stack.db.schema or ""
    holder = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        await holder.execute("BEGIN")
        await holder.execute(
            "INSERT INTO oncepay_idempotency (scope, idempotency_key, fingerprint, state, fence, "
            "created_at, lease_expires_at, expires_at) "
            "VALUES ($1, 'k', 'other', 'executing', 1, 1, $2, $3)",
            stack.merchant.id,
            stack.clock() + 3600,
            stack.clock() + 7200,
        )
        pending = asyncio.create_task(stack.post("/v1/payments", BODY, key="k"))
        deadline = time.monotonic() + 30
        # pg_stat_activity is read once per transaction unless its snapshot is cleared
        while await holder.execute("SELECT pg_stat_clear_snapshot()") and not await holder.fetch(
            _WAITING, schema
        ):
            assert time.monotonic() < deadline, "phase 1 never waited"
            assert not pending.done(), pending.result().text
            await asyncio.sleep(0.01)  # polling a condition with a deadline
        during = await endpoint(stack, "during")
        if other == "committed":
            await holder.execute("COMMIT")
        else:
            await holder.execute("ROLLBACK")
        response = await pending
    finally:
        await holder.close()
    if other == "committed":  # the other attempt's record (another body): the gate refuses
        assert response.status_code == 422, response.text
        assert await stack.count("payments") == 0
        return
    assert response.status_code == 201, response.text
    assert await delivered(stack, response.json()["id"], {"during": during}) == {
        ("payment.authorized", "during"),
        ("payment.captured", "during"),
    }
    assert await stack.ledger_violations() == []
