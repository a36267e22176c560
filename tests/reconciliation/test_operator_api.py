"""The operator API of reconciliation (docs/reconciliation.md "Operator API"), on SQLite and
PostgreSQL: runs and discrepancies listed under every filter and paged without loss or
repeat, one discrepancy with its evidence, resolve and accept idempotent under their key (a
second close under another key is a 409, also when two race), every bad input a 4xx problem
with nothing changed, and only the operator token opens it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.reconciliation.records import Discrepancy, Kind, Outcome
from oncepay.reconciliation.store import create_tables, save_run
from oncepay.storage.db import write
from tests.payments.stack import Stack, database_url, running_stack
from tests.servers import require_postgres

TOKEN = "op-token-0123456789abcdef"
OPERATOR = {"Authorization": f"Bearer {TOKEN}"}
BASE = "/v1/admin/reconciliation"
DAY1, DAY2 = date(2026, 12, 1), date(2026, 12, 2)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def payments_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        require_postgres()
    return database_url(request.param, tmp_path)


@pytest.fixture
async def operator(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, admin_token=TOKEN) as running:
        async with write(running.db) as conn:  # a no-op once the payments migration has them
            await create_tables(conn, running.db)
        yield running


def found(kind: Kind, reference: str, payment_id: str | None = None) -> Discrepancy:
    return Discrepancy(kind, reference, payment_id, f"{kind.value} on {reference}", "look")


async def plant(stack: Stack, payment_id: str | None = None) -> None:
    """Three runs: primary on two days, secondary on the second; five discrepancies."""
    await save_run(
        stack.db,
        "primary",
        DAY1,
        Outcome(
            10, (found(Kind.AMOUNT_MISMATCH, "r1", payment_id), found(Kind.FEE_MISMATCH, "r2"))
        ),
        now=1.0,
    )
    await save_run(
        stack.db,
        "primary",
        DAY2,
        Outcome(5, (found(Kind.UNKNOWN_AT_ONCEPAY, "r3"), found(Kind.AMOUNT_MISMATCH, "r4"))),
        now=2.0,
    )
    await save_run(
        stack.db,
        "secondary",
        DAY2,
        Outcome(7, (found(Kind.ORPHANED_AUTHORIZATION, "r5"),)),
        now=3.0,
    )


async def get(stack: Stack, path: str, **params: Any) -> httpx.Response:
    return await stack.client.get(f"{BASE}{path}", params=params, headers=OPERATOR)


async def post(
    stack: Stack, path: str, body: Any, key: str | None = "k", **headers: str
) -> httpx.Response:
    sent = {**OPERATOR, **headers}
    if key is not None:
        sent["Idempotency-Key"] = key
    return await stack.client.post(f"{BASE}{path}", json=body, headers=sent)


async def all_pages(stack: Stack, path: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    after: Any = None
    while True:
        query = {**params, "limit": limit}
        if after is not None:
            query["starting_after"] = after
        page = await get(stack, path, **query)
        assert page.status_code == 200, page.text
        document = page.json()
        assert document["object"] == "list"
        seen += document["data"]
        if not document["has_more"]:
            return seen
        after = document["data"][-1]["id"]


async def test_runs_listed_newest_first_filtered_and_paged(operator: Stack) -> None:
    await plant(operator)
    every = await all_pages(operator, "/runs", 1)
    assert [(r["acquirer"], r["day"]) for r in every] == [
        ("secondary", "2026-12-02"),
        ("primary", "2026-12-02"),
        ("primary", "2026-12-01"),
    ]
    assert len({r["id"] for r in every}) == 3
    assert every[0]["object"] == "reconciliation_run"
    assert [r["day"] for r in await all_pages(operator, "/runs", 2, acquirer="primary")] == [
        "2026-12-02",
        "2026-12-01",
    ]
    second = await all_pages(operator, "/runs", 5, day_from="2026-12-02", day_to="2026-12-02")
    assert {r["acquirer"] for r in second} == {"primary", "secondary"}
    assert await all_pages(operator, "/runs", 5, day_to="2026-11-30") == []

    one = await get(operator, f"/runs/{every[2]['id']}")
    assert one.status_code == 200, one.text
    assert one.json()["matched"] == 10
    assert one.json()["opened"] == {"open": 2, "resolved": 0, "accepted": 0}


async def test_discrepancies_listed_under_every_filter(operator: Stack) -> None:
    await plant(operator, payment_id="pay_x")

    async def refs(**params: Any) -> list[str]:
        return [d["reference"] for d in await all_pages(operator, "/discrepancies", 2, **params)]

    assert await refs() == ["r5", "r4", "r3", "r2", "r1"]  # newest first, across pages of 2
    assert await refs(kind="amount_mismatch") == ["r4", "r1"]
    assert await refs(acquirer="secondary") == ["r5"]
    assert await refs(payment_id="pay_x") == ["r1"]
    assert await refs(reference="r3") == ["r3"]
    assert await refs(status="open", day_from="2026-12-02") == ["r5", "r4", "r3"]
    assert await refs(day_to="2026-12-01") == ["r2", "r1"]
    assert await refs(status="resolved") == []
    first = (await get(operator, "/discrepancies", reference="r1")).json()["data"][0]
    assert first["object"] == "reconciliation_discrepancy"
    assert (first["kind"], first["status"], first["day"]) == (
        "amount_mismatch",
        "open",
        "2026-12-01",
    )


async def test_a_discrepancy_shows_its_evidence(operator: Stack) -> None:
    paid = await operator.pay(amount=1234)
    assert paid.status_code == 201, paid.text
    await plant(operator, payment_id=paid.json()["id"])
    listed = (await get(operator, "/discrepancies", reference="r1")).json()["data"][0]
    one = await get(operator, f"/discrepancies/{listed['id']}")
    assert one.status_code == 200, one.text
    evidence = one.json()["evidence"]
    assert evidence["detail"] == "amount_mismatch on r1"
    assert evidence["payment"]["id"] == paid.json()["id"]
    assert evidence["payment"]["amount_captured"] == 1234
    assert evidence["run"]["day"] == "2026-12-01"
    assert evidence["settlement"] is None
    other = (await get(operator, "/discrepancies", reference="r2")).json()["data"][0]
    assert (await get(operator, f"/discrepancies/{other['id']}")).json()["evidence"][
        "payment"
    ] is None


@pytest.mark.parametrize(("action", "status"), [("resolve", "resolved"), ("accept", "accepted")])
async def test_closing_is_idempotent_and_a_second_close_is_a_409(
    operator: Stack, action: str, status: str
) -> None:
    await plant(operator)
    target = (await get(operator, "/discrepancies", reference="r2")).json()["data"][0]["id"]
    note = {"note": "refund booked, ticket FIN-12"}
    first = await post(operator, f"/discrepancies/{target}/{action}", note, key="close-1")
    assert first.status_code == 200, first.text
    assert (first.json()["status"], first.json()["note"]) == (status, note["note"])
    assert first.json()["closed_at"] is not None

    replay = await post(operator, f"/discrepancies/{target}/{action}", note, key="close-1")
    assert replay.status_code == 200
    assert replay.json() == first.json()
    assert replay.headers.get("idempotent-replayed") == "true"

    for again in ("resolve", "accept"):
        second = await post(
            operator, f"/discrepancies/{target}/{again}", {"note": "again"}, key=f"k-{again}"
        )
        assert second.status_code == 409, second.text
        assert second.headers["content-type"].startswith("application/problem+json")
        assert second.json()["code"] == "discrepancy_closed"
        assert status in second.json()["detail"]
    # the same key for another request is refused, not replayed
    reused = await post(operator, f"/discrepancies/{target}/{action}", {"note": "x"}, key="close-1")
    assert reused.status_code == 422
    listed = await all_pages(operator, "/discrepancies", 10, status=status)
    assert [(d["id"], d["note"]) for d in listed] == [(target, note["note"])]
    assert len(await all_pages(operator, "/discrepancies", 10, status="open")) == 4


async def test_two_racing_closes_close_once(operator: Stack) -> None:
    await plant(operator)
    target = (await get(operator, "/discrepancies", reference="r4")).json()["data"][0]["id"]
    answers = await asyncio.gather(
        *(
            post(operator, f"/discrepancies/{target}/{action}", {"note": action}, key=action)
            for action in ("resolve", "accept")
        )
    )
    assert sorted(a.status_code for a in answers) == [200, 409], [a.text for a in answers]
    winner = next(a for a in answers if a.status_code == 200).json()
    now = (await get(operator, f"/discrepancies/{target}")).json()
    assert (now["status"], now["note"]) == (winner["status"], winner["note"])


async def test_bad_input_is_a_4xx_problem_and_changes_nothing(operator: Stack) -> None:
    await plant(operator)
    target = (await get(operator, "/discrepancies", reference="r3")).json()["data"][0]["id"]
    path = f"/discrepancies/{target}/resolve"
    refused = {
        "no key": await post(operator, path, {"note": "x"}, key=None),
        "no note": await post(operator, path, {}, key="a"),
        "blank note": await post(operator, path, {"note": "   "}, key="b"),
        "note not a string": await post(operator, path, {"note": 5}, key="c"),
        "unknown field": await post(operator, path, {"note": "x", "status": "open"}, key="d"),
        "no such discrepancy": await post(operator, "/discrepancies/999999/resolve", {"note": "x"}),
        "not an id": await post(operator, "/discrepancies/abc/accept", {"note": "x"}, key="e"),
        "unknown kind": await get(operator, "/discrepancies", kind="sideways"),
        "unknown status": await get(operator, "/discrepancies", status="closed"),
        "bad day": await get(operator, "/discrepancies", day_from="2026-13-01"),
        "day with a time": await get(operator, "/runs", day_from="2026-12-02T00:00:00"),
        "compact day": await get(operator, "/discrepancies", day_to="20261202"),
        "unix time for a day": await get(operator, "/runs", day_to="1764633600"),
        "invisible note": await post(operator, path, {"note": "\u200b\u2060 \t"}, key="f"),
        "days reversed": await get(operator, "/runs", day_from="2026-12-02", day_to="2026-12-01"),
        "bad cursor": await get(operator, "/runs", starting_after="rec_nope"),
        "bad discrepancy cursor": await get(operator, "/discrepancies", starting_after="x"),
        "limit 0": await get(operator, "/discrepancies", limit=0),
        "limit 101": await get(operator, "/runs", limit=101),
        "unknown parameter": await get(operator, "/runs", acquirer_name="primary"),
        "no such run": await get(operator, "/runs/rec_nope"),
        "no such discrepancy (get)": await get(operator, "/discrepancies/0"),
    }
    for case, response in refused.items():
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
        assert response.json()["detail"], case
    assert refused["no such discrepancy"].status_code == 404
    assert refused["no such run"].status_code == 404
    assert refused["blank note"].status_code == 400
    assert refused["invisible note"].json()["detail"] == refused["blank note"].json()["detail"]
    for case in ("day with a time", "compact day", "unix time for a day"):
        assert refused[case].status_code == 400, case
        assert "is not a day YYYY-MM-DD" in refused[case].json()["detail"], case
    assert len(await all_pages(operator, "/discrepancies", 10, status="open")) == 5


async def test_only_the_operator_token_opens_it(operator: Stack, tmp_path: Path) -> None:
    await plant(operator)
    as_merchant = await operator.client.get(f"{BASE}/runs")  # the client's merchant key
    assert as_merchant.status_code == 401
    assert as_merchant.json()["code"] == "operator_token_required"
    closing = await operator.client.post(
        f"{BASE}/discrepancies/1/resolve", json={"note": "x"}, headers={"Idempotency-Key": "m"}
    )
    assert closing.status_code == 401
    assert len(await all_pages(operator, "/discrepancies", 10, status="open")) == 5
    schema = (await operator.client.get("/openapi.json")).json()
    assert not any(path.startswith("/v1/admin") for path in schema["paths"])


async def test_without_a_token_the_operator_api_does_not_exist(
    payments_url: str, tmp_path: Path
) -> None:
    async with running_stack(payments_url, tmp_path) as stack:
        response = await stack.client.get(f"{BASE}/runs", headers=OPERATOR)
    assert response.status_code == 404


# -- runs started through the API ---------------------------------------------------------------


@pytest.fixture
async def two_operated(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        payments_url, tmp_path, acquirers=("primary", "secondary"), admin_token=TOKEN
    ) as running:
        yield running


async def orphan(stack: Stack, acquirer: str = "primary") -> dict[str, Any]:
    """An authorization approved at the acquirer for a payment OncePay never made."""
    body = {
        "reference": "pay_00000000000000000000ghost_a1",
        "order_id": "pay_00000000000000000000ghost",
        "amount": 700,
        "currency": "EUR",
        "payment_method": "pm_card_ok",
    }
    response = await stack.simulators[acquirer].post("/v1/authorizations", json=body)
    assert response.status_code == 201, response.text
    found: dict[str, Any] = response.json()
    return found


async def test_a_run_started_through_the_api(two_operated: Stack) -> None:
    stack = two_operated
    for amount in (500, 900):
        assert (await stack.pay(amount=amount)).status_code == 201
    ghost = await orphan(stack)
    today = datetime.now(UTC).date().isoformat()
    body = {"acquirer": "primary", "day": today, "grace_days": 0}
    first = await post(stack, "/runs", body, key="run-1")
    assert first.status_code == 201, first.text
    run = first.json()
    assert (run["object"], run["acquirer"], run["day"], run["new_run"]) == (
        "reconciliation_run",
        "primary",
        today,
        True,
    )
    assert (run["lines"], run["matched"], run["settled"]) == (2, 2, 2)
    assert [d["kind"] for d in run["discrepancies"]] == ["orphaned_authorization"]
    assert run["discrepancies"][0]["reference"] == ghost["reference"]
    assert run["actions"]["taken"] == 1
    voids = [op for op in await stack.operations(ghost["order_id"]) if op["type"] == "void"]
    assert len(voids) == 1

    replay = await post(stack, "/runs", body, key="run-1")
    assert replay.json() == run
    assert replay.headers.get("idempotent-replayed") == "true"
    again = await post(stack, "/runs", body, key="run-2")  # a new request: the day again
    assert again.status_code == 201, again.text
    assert (again.json()["new_run"], again.json()["settled"], again.json()["opened"]) == (
        False,
        0,
        0,
    )
    assert again.json()["actions"]["taken"] == 0  # the earlier run's void is not counted again
    voids = [op for op in await stack.operations(ghost["order_id"]) if op["type"] == "void"]
    assert len(voids) == 1

    listed = await all_pages(stack, "/runs", 10, acquirer="primary")
    assert [r["id"] for r in listed] == [run["id"]]
    closed = (await get(stack, "/discrepancies", reference=ghost["reference"])).json()["data"]
    assert [d["status"] for d in closed] == ["resolved"]  # the void did it; its note says so
    assert closed[0]["note"]
    secondary = await post(stack, "/runs", {"acquirer": "secondary"}, key="run-3")
    assert secondary.status_code == 201, secondary.text
    assert secondary.json()["discrepancies"] == []
    assert await stack.ledger_violations() == []


async def test_a_bad_run_request_is_a_4xx_problem(operator: Stack) -> None:
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    refused = {
        "not configured": await post(operator, "/runs", {"acquirer": "secondary"}, key="a"),
        "unknown acquirer": await post(operator, "/runs", {"acquirer": "tertiary"}, key="b"),
        "future day": await post(operator, "/runs", {"day": tomorrow}, key="c"),
        "bad day": await post(operator, "/runs", {"day": "2026-1-1"}, key="d"),
        "compact day": await post(operator, "/runs", {"day": "20261201"}, key="d2"),
        "negative grace": await post(operator, "/runs", {"grace_days": -1}, key="e"),
        "grace a string": await post(operator, "/runs", {"grace_days": "3"}, key="f"),
        "unknown field": await post(operator, "/runs", {"acquirer": "primary", "x": 1}, key="g"),
        "no key": await post(operator, "/runs", {}, key=None),
    }
    for case, response in refused.items():
        assert 400 <= response.status_code < 500, (case, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
    assert await all_pages(operator, "/runs", 10) == []
