"""The simulated acquirer: idempotency by reference, fencing look-ups, follow-on operations,
settlement reports, faults and bad input — in-process on SQLite and PostgreSQL, and as real
uvicorn processes for the races."""

from __future__ import annotations

import asyncio
import csv
import io
import multiprocessing
import random
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.simulator import Faults, create_app
from tests.payments.acquirer_helpers import (
    auth_body,
    authorizations_of,
    in_process,
    key,
    postgres_schema_url,
    running_acquirer,
)
from tests.servers import require_postgres

Client = httpx.AsyncClient


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'acquirer.db'}"
        return
    require_postgres()
    with postgres_schema_url() as url:
        yield url


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    async with in_process(create_app(database_url)) as client:
        yield client


async def authorize(client: Client, reference: str, **overrides: Any) -> httpx.Response:
    body = auth_body(reference, **overrides)
    return await client.post("/v1/authorizations", json=body, headers=key(reference))


async def follow_on(
    client: Client, authorization_id: str, kind: str, reference: str, amount: int | None = None
) -> httpx.Response:
    path = {"capture": "capture", "void": "void", "refund": "refunds"}[kind]
    body: dict[str, Any] = {"reference": reference}
    if amount is not None:
        body["amount"] = amount
    url = f"/v1/authorizations/{authorization_id}/{path}"
    return await client.post(url, json=body, headers=key(reference))


async def lookup(client: Client, reference: str) -> httpx.Response:
    return await client.post("/v1/lookups", json={"reference": reference})


# --- authorizations -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status", "decline_code"),
    [
        ("pm_card_ok", "approved", None),
        ("pm_card_declined", "declined", "card_declined"),
        ("pm_card_insufficient_funds", "declined", "insufficient_funds"),
    ],
)
async def test_the_payment_method_decides_the_answer(
    client: Client, method: str, status: str, decline_code: str | None
) -> None:
    response = await authorize(client, "ref-1", payment_method=method)
    assert response.status_code == 201
    answer = response.json()
    assert answer["id"].startswith("auth_")
    assert (answer["status"], answer["decline_code"]) == (status, decline_code)
    assert answer["reference"] == "ref-1"
    assert answer["order_id"] == "order-ref-1"
    assert (answer["amount"], answer["currency"]) == (1000, "EUR")
    assert (answer["captured_amount"], answer["refunded_amount"], answer["voided"]) == (0, 0, False)
    assert answer["created_at"].endswith("Z")


async def test_an_unknown_payment_method_is_refused(client: Client) -> None:
    response = await authorize(client, "ref-1", payment_method="pm_card_stolen")
    assert response.status_code == 400
    assert response.json()["code"] == "unknown_payment_method"
    assert await authorizations_of(client, "order-ref-1") == []


async def test_a_repeat_answers_the_stored_answer_and_creates_nothing(client: Client) -> None:
    first = await authorize(client, "ref-1")
    again = await authorize(client, "ref-1")
    assert again.status_code == first.status_code == 201
    assert again.content == first.content
    assert len(await authorizations_of(client, "order-ref-1")) == 1


async def test_a_repeat_without_the_header_is_still_a_repeat(client: Client) -> None:
    first = await authorize(client, "ref-1")
    again = await client.post("/v1/authorizations", json=auth_body("ref-1"))
    assert again.content == first.content


async def test_the_same_reference_with_another_body_is_refused(client: Client) -> None:
    await authorize(client, "ref-1")
    changed = await authorize(client, "ref-1", amount=999)
    assert changed.status_code == 422
    assert changed.json()["code"] == "idempotency_key_reused"
    [only] = await authorizations_of(client, "order-ref-1")
    assert only["amount"] == 1000


async def test_a_declined_authorization_is_replayed_too(client: Client) -> None:
    first = await authorize(client, "ref-1", payment_method="pm_card_declined")
    again = await authorize(client, "ref-1", payment_method="pm_card_declined")
    assert again.content == first.content
    assert len(await authorizations_of(client, "order-ref-1")) == 1


async def test_the_order_defaults_to_the_reference(client: Client) -> None:
    body = auth_body("ref-1")
    del body["order_id"]
    response = await client.post("/v1/authorizations", json=body)
    assert response.json()["order_id"] == "ref-1"


# --- fencing look-ups ---------------------------------------------------------------------


async def test_a_look_up_answers_the_stored_answer(client: Client) -> None:
    authorized = await authorize(client, "ref-1")
    found = await lookup(client, "ref-1")
    assert found.status_code == 200
    assert found.json() == authorized.json()


async def test_a_look_up_fences_an_unknown_reference(client: Client) -> None:
    missing = await lookup(client, "ref-1")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    assert missing.json()["fenced"] is True
    late = await authorize(client, "ref-1")
    assert late.status_code == 409
    assert late.json()["code"] == "reference_fenced"
    assert await authorizations_of(client, "order-ref-1") == []
    assert (await lookup(client, "ref-1")).status_code == 404, "a fence stays a fence"


async def test_a_fenced_reference_cannot_capture_either(client: Client) -> None:
    authorization_id = (await authorize(client, "ref-1")).json()["id"]
    assert (await lookup(client, "cap-1")).status_code == 404
    late = await follow_on(client, authorization_id, "capture", "cap-1", 500)
    assert (late.status_code, late.json()["code"]) == (409, "reference_fenced")
    assert (await follow_on(client, authorization_id, "capture", "cap-2", 500)).status_code == 201


async def test_a_look_up_finds_follow_on_operations(client: Client) -> None:
    authorization_id = (await authorize(client, "ref-1")).json()["id"]
    captured = await follow_on(client, authorization_id, "capture", "cap-1", 600)
    found = await lookup(client, "cap-1")
    assert found.status_code == 200
    assert found.json() == captured.json()
    assert found.json()["object"] == "capture"
    assert found.json()["authorization_id"] == authorization_id


# --- capture, void, refund ----------------------------------------------------------------


async def approved(client: Client, reference: str = "ref-1", **overrides: Any) -> str:
    response = await authorize(client, reference, **overrides)
    assert response.status_code == 201
    authorization_id: str = response.json()["id"]
    return authorization_id


async def test_capture_then_partial_refunds_up_to_the_captured_amount(client: Client) -> None:
    auth = await approved(client)
    captured = await follow_on(client, auth, "capture", "cap-1", 800)
    assert captured.status_code == 201
    assert captured.json()["authorization"]["captured_amount"] == 800
    assert (await follow_on(client, auth, "refund", "re-1", 500)).status_code == 201
    too_much = await follow_on(client, auth, "refund", "re-2", 301)
    assert (too_much.status_code, too_much.json()["code"]) == (409, "amount_exceeds_refundable")
    rest = await follow_on(client, auth, "refund", "re-3", 300)
    assert rest.json()["authorization"]["refunded_amount"] == 800


async def test_follow_on_operations_are_idempotent_by_reference(client: Client) -> None:
    auth = await approved(client)
    first = await follow_on(client, auth, "capture", "cap-1", 800)
    again = await follow_on(client, auth, "capture", "cap-1", 800)
    assert again.content == first.content
    refund = await follow_on(client, auth, "refund", "re-1", 800)
    assert (await follow_on(client, auth, "refund", "re-1", 800)).content == refund.content
    changed = await follow_on(client, auth, "refund", "re-1", 700)
    assert changed.status_code == 422
    assert refund.json()["authorization"]["refunded_amount"] == 800
    beyond = await follow_on(client, auth, "refund", "re-2", 1)
    assert beyond.json()["code"] == "amount_exceeds_refundable", "the repeats moved nothing"


async def test_a_follow_on_answers_the_authorization_as_it_now_is(client: Client) -> None:
    """The authorization in a follow-on's answer is the stored row read back: booleans as JSON
    booleans and amounts as numbers on either database (SQLite stores ``voided`` as 0/1)."""
    first = (await authorize(client, "ref-1")).json()
    captured = (await follow_on(client, first["id"], "capture", "cap-1", 800)).json()
    assert captured["authorization"] == first | {"captured_amount": 800}
    assert captured["authorization"]["voided"] is False
    other = (await authorize(client, "ref-2")).json()
    voided = (await follow_on(client, other["id"], "void", "void-1")).json()
    assert voided["authorization"] == other | {"voided": True}
    assert voided["authorization"]["voided"] is True


async def test_capture_at_most_the_authorized_amount_and_only_once(client: Client) -> None:
    auth = await approved(client)
    over = await follow_on(client, auth, "capture", "cap-1", 1001)
    assert (over.status_code, over.json()["code"]) == (400, "amount_exceeds_authorized")
    assert (await follow_on(client, auth, "capture", "cap-2", 1000)).status_code == 201
    twice = await follow_on(client, auth, "capture", "cap-3", 1)
    assert (twice.status_code, twice.json()["code"]) == (409, "already_captured")


async def test_no_capture_after_a_void_and_no_void_after_a_capture(client: Client) -> None:
    voided = await approved(client, "ref-1")
    assert (await follow_on(client, voided, "void", "void-1")).json()["authorization"]["voided"]
    late = await follow_on(client, voided, "capture", "cap-1", 100)
    assert (late.status_code, late.json()["code"]) == (409, "authorization_voided")
    again = await follow_on(client, voided, "void", "void-2")
    assert again.json()["code"] == "authorization_voided"
    captured = await approved(client, "ref-2")
    await follow_on(client, captured, "capture", "cap-2", 100)
    no_void = await follow_on(client, captured, "void", "void-3")
    assert (no_void.status_code, no_void.json()["code"]) == (409, "already_captured")


async def test_no_refund_before_a_capture(client: Client) -> None:
    auth = await approved(client)
    early = await follow_on(client, auth, "refund", "re-1", 100)
    assert (early.status_code, early.json()["code"]) == (409, "not_captured")


async def test_nothing_follows_a_declined_authorization(client: Client) -> None:
    auth = await approved(client, payment_method="pm_card_declined")
    for kind in ("capture", "void", "refund"):
        amount = None if kind == "void" else 100
        refused = await follow_on(client, auth, kind, f"{kind}-1", amount)
        assert (refused.status_code, refused.json()["code"]) == (409, "authorization_declined")


async def test_an_unknown_authorization_is_404(client: Client) -> None:
    missing = await follow_on(client, "auth_nope", "capture", "cap-1", 100)
    assert (missing.status_code, missing.json()["code"]) == (404, "authorization_not_found")


async def test_an_authorization_with_capture_is_captured_at_once(client: Client) -> None:
    answer = (await authorize(client, "ref-1", capture=True)).json()
    assert answer["captured_amount"] == 1000
    refund = await follow_on(client, answer["id"], "refund", "re-1", 1000)
    assert refund.status_code == 201


# --- settlement ---------------------------------------------------------------------------


async def test_the_settlement_report_lists_the_days_captures_and_refunds(
    database_url: str,
) -> None:
    day = datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp()
    clock = [day]
    app = create_app(database_url, clock=lambda: clock[0])
    async with in_process(app) as client:
        auth = await approved(client, "ref-1")
        await follow_on(client, auth, "capture", "cap-1", 700)
        await approved(client, "ref-2", capture=True, currency="USD")
        await approved(client, "ref-3")  # authorized only: nothing settles
        clock[0] = day + 2  # the next UTC day
        await follow_on(client, auth, "refund", "re-1", 200)

        report = (await client.get("/v1/settlements", params={"date": "2024-02-29"})).json()
        rows = await client.get("/v1/settlements?date=2024-02-29&format=csv")
        next_day = (await client.get("/v1/settlements?date=2024-03-01&format=json")).json()

    assert report["date"] == "2024-02-29"
    entries = report["entries"]
    assert [(e["reference"], e["type"], e["amount"], e["currency"]) for e in entries] == [
        ("cap-1", "capture", 700, "EUR"),
        ("ref-2", "capture", 1000, "USD"),
    ]
    assert entries[0]["authorization_id"] == auth
    assert entries[0]["order_id"] == "order-ref-1"
    assert entries[0]["created_at"].startswith("2024-02-29T23:59:59")
    assert rows.headers["content-type"].startswith("text/csv")
    parsed = list(csv.DictReader(io.StringIO(rows.text)))
    assert rows.text.splitlines()[0] == (
        "reference,type,amount,currency,fee,net,settled_at,payout_id,"
        "authorization_id,order_id,created_at"
    )
    assert [(r["reference"], r["amount"]) for r in parsed] == [("cap-1", "700"), ("ref-2", "1000")]
    assert [(e["reference"], e["type"]) for e in next_day["entries"]] == [("re-1", "refund")]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("", "invalid_date"),
        ("date=2024-13-01", "invalid_date"),
        ("date=29.02.2024", "invalid_date"),
        ("date=2024-02-30", "invalid_date"),
        ("date=2024-02-01&format=xml", "invalid_format"),
    ],
)
async def test_a_bad_settlement_query_is_400(client: Client, query: str, code: str) -> None:
    response = await client.get(f"/v1/settlements?{query}")
    assert (response.status_code, response.json()["code"]) == (400, code)


# --- bad input ----------------------------------------------------------------------------

BAD_AUTHORIZATIONS: list[Any] = [
    b"{",
    b"[]",
    b'"text"',
    b"",
    {"reference": "r"},
    auth_body("r", amount=0),
    auth_body("r", amount=-5),
    auth_body("r", amount=10.5),
    auth_body("r", amount="100"),
    auth_body("r", amount=True),
    auth_body("r", amount=10**13),
    auth_body("r", currency="eur"),
    auth_body("r", currency="EURO"),
    auth_body("r", currency=None),
    auth_body("r", capture="yes"),
    auth_body("r", payment_method=""),
    auth_body(""),
    auth_body("r" * 256),
    auth_body("with space"),
    auth_body("r", surprise=1),
]


@pytest.mark.parametrize("body", BAD_AUTHORIZATIONS)
async def test_a_malformed_authorization_is_400_problem(client: Client, body: Any) -> None:
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    response = await client.post(
        "/v1/authorizations", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    problem = response.json()
    assert response.headers["content-type"] == "application/problem+json"
    assert problem["code"] == "invalid_request"
    assert problem["detail"]


async def test_an_oversized_body_is_413(client: Client) -> None:
    body = auth_body("ref-1", order_id="x" * 100_000)
    response = await client.post("/v1/authorizations", json=body)
    assert (response.status_code, response.json()["code"]) == (413, "request_too_large")


async def test_the_header_must_name_the_bodys_reference(client: Client) -> None:
    response = await client.post(
        "/v1/authorizations", json=auth_body("ref-1"), headers=key("ref-2")
    )
    assert (response.status_code, response.json()["code"]) == (400, "reference_mismatch")


@pytest.mark.parametrize(
    "body",
    [
        {"reference": "c", "amount": 0},
        {"reference": "c"},
        {"amount": 5},
        {"reference": "c", "amount": "5"},
    ],
)
async def test_a_malformed_capture_is_400_problem(client: Client, body: dict[str, Any]) -> None:
    auth = await approved(client)
    response = await client.post(f"/v1/authorizations/{auth}/capture", json=body)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/authorizations", 405),
        ("POST", "/v1/authorizations/a/b/c", 404),
        ("POST", "/v1/lookups", 400),
        ("PUT", "/admin/faults", 400),
    ],
)
async def test_unknown_routes_and_empty_bodies_are_problems(
    client: Client, method: str, path: str, status: int
) -> None:
    response = await client.request(method, path)
    assert response.status_code == status
    assert response.json()["code"]


# --- faults -------------------------------------------------------------------------------


async def test_faults_are_read_and_replaced_at_run_time(client: Client) -> None:
    assert (await client.get("/admin/faults")).json() == Faults().model_dump(mode="json")
    new = {"error_rate": 0.5, "latency_ms": 5, "operations": ["authorize"]}
    put = await client.put("/admin/faults", json=new)
    assert put.status_code == 200
    assert put.json()["error_rate"] == 0.5
    assert put.json()["operations"] == ["authorize"]
    current = (await client.get("/admin/faults")).json()
    assert (current["error_rate"], current["latency_ms"], current["drop_rate"]) == (0.5, 5, 0)


@pytest.mark.parametrize(
    "faults", [{"error_rate": 2}, {"latency_ms": -1}, {"operations": ["fly"]}, {"nope": 1}]
)
async def test_impossible_faults_are_refused(client: Client, faults: dict[str, Any]) -> None:
    response = await client.put("/admin/faults", json=faults)
    assert (response.status_code, response.json()["code"]) == (400, "invalid_request")


async def test_an_outage_answers_503_to_everything_but_admin_and_health(
    database_url: str,
) -> None:
    async with in_process(create_app(database_url, Faults(outage=True))) as client:
        assert (await authorize(client, "ref-1")).status_code == 503
        assert (await lookup(client, "ref-1")).status_code == 503
        assert (await client.get("/v1/settlements?date=2024-01-01")).status_code == 503
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/admin/operations")).json() == {"operations": []}
        await client.put("/admin/faults", json={})
        assert (await authorize(client, "ref-1")).status_code == 201


async def test_injected_errors_come_before_anything_is_done(database_url: str) -> None:
    async with in_process(create_app(database_url, Faults(error_rate=1.0))) as client:
        failed = await authorize(client, "ref-1")
        assert (failed.status_code, failed.json()["code"]) == (503, "injected_error")
        assert await authorizations_of(client, "order-ref-1") == []


async def test_latency_is_added(database_url: str) -> None:
    async with in_process(create_app(database_url, Faults(latency_ms=200))) as client:
        await authorize(client, "warm-up")  # schema creation is not the latency under test
        started = time.perf_counter()
        await authorize(client, "ref-1")
        assert time.perf_counter() - started >= 0.2


async def test_faults_can_be_limited_to_some_operations(database_url: str) -> None:
    faults = Faults(error_rate=1.0, operations=frozenset({"capture"}))
    async with in_process(create_app(database_url, faults)) as client:
        auth = await approved(client)
        assert (await follow_on(client, auth, "capture", "cap-1", 5)).status_code == 503
        assert (await lookup(client, "ref-1")).status_code == 200


async def test_a_seed_makes_the_faults_reproducible(tmp_path: Path) -> None:
    async def statuses(name: str, seed: int) -> list[int]:
        app = create_app(f"sqlite:///{tmp_path / name}", Faults(error_rate=0.5), seed)
        async with in_process(app) as client:
            return [(await authorize(client, f"ref-{i}")).status_code for i in range(30)]

    first, again = await statuses("a.db", 7), await statuses("b.db", 7)
    assert first == again
    assert set(first) == {201, 503}


async def test_a_drop_commits_then_breaks_the_connection(database_url: str) -> None:
    async with in_process(create_app(database_url, Faults(drop_rate=1.0))) as client:
        with pytest.raises(Exception, match="connection dropped"):
            await authorize(client, "ref-1")
        assert len(await authorizations_of(client, "order-ref-1")) == 1


async def test_a_stall_commits_then_does_not_answer_in_time(database_url: str) -> None:
    faults = Faults(timeout_after_commit_rate=1.0, stall_seconds=60)
    async with in_process(create_app(database_url, faults)) as client:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await authorize(client, "ref-1")
        assert len(await authorizations_of(client, "order-ref-1")) == 1


# --- real processes -----------------------------------------------------------------------


REFERENCES = 20
TASKS_PER_REFERENCE = 10


@pytest.mark.slow
async def test_look_ups_racing_authorizations_have_one_consistent_winner(
    database_url: str,
) -> None:
    """Authorizations and look-ups of the same references at once, over real HTTP: per
    reference, either the authorization won (every authorize answers it, every look-up
    finds it) or the fence did (every authorize is refused, every look-up says fenced)."""
    with running_acquirer(database_url) as url:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await client.get("/admin/operations")  # the schema, before the race
            calls = [
                (kind, f"race-{r}")
                for r in range(REFERENCES)
                for kind in ("authorize", "lookup") * (TASKS_PER_REFERENCE // 2)
            ]
            random.Random(1).shuffle(calls)

            async def call(kind: str, reference: str) -> tuple[str, str, httpx.Response]:
                if kind == "authorize":
                    return kind, reference, await authorize(client, reference)
                return kind, reference, await lookup(client, reference)

            results = await asyncio.gather(*(call(k, r) for k, r in calls))
            operations = (await client.get("/admin/operations")).json()["operations"]

    winners = {"authorization": 0, "fence": 0}
    for r in range(REFERENCES):
        reference = f"race-{r}"
        mine = [(kind, response) for kind, ref, response in results if ref == reference]
        rows = [op for op in operations if op["reference"] == reference]
        assert len(rows) == 1, rows
        winner = rows[0]["type"]
        winners[winner] += 1
        for kind, response in mine:
            if winner == "authorization":
                assert response.status_code == (201 if kind == "authorize" else 200)
                assert response.json()["id"] == rows[0]["authorization_id"]
            else:
                assert response.status_code == (409 if kind == "authorize" else 404)
    assert sum(winners.values()) == REFERENCES


def _first_request_in_child(database_url: str, barrier: Any, reference: str) -> None:
    asyncio.run(_first_request(database_url, barrier, reference))


async def _first_request(database_url: str, barrier: Any, reference: str) -> None:
    barrier.wait(60)  # every process meets a database none has set up
    async with in_process(create_app(database_url)) as client:
        response = await authorize(client, reference)
        assert response.status_code == 201, response.text


@pytest.mark.slow
async def test_processes_starting_on_a_fresh_database_all_create_the_schema(
    database_url: str,
) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    children = [
        ctx.Process(target=_first_request_in_child, args=(database_url, barrier, f"r{i}"))
        for i in range(4)
    ]
    for child in children:
        child.start()
    for child in children:
        await asyncio.to_thread(child.join, 120)
    assert [child.exitcode for child in children] == [0, 0, 0, 0]
    async with in_process(create_app(database_url)) as client:
        operations = (await client.get("/admin/operations")).json()["operations"]
    assert sorted(op["reference"] for op in operations) == ["r0", "r1", "r2", "r3"]


@pytest.mark.postgres
async def test_an_authorization_that_loses_the_race_to_a_fence_is_refused() -> None:
    """Forced interleaving on PostgreSQL: the authorization reads no row for its reference,
    a look-up's fence is inserted but not committed, the authorization's insert waits on it;
    the fence commits, and the authorization answers 409 instead of authorizing."""
    require_postgres()
    import psycopg

    from tests.servers import POSTGRES_URL

    with postgres_schema_url() as url:
        schema = url.rsplit("schema=", 1)[1]
        app = create_app(url)
        async with in_process(app) as client:
            await client.get("/admin/operations")  # creates the schema
            with psycopg.connect(POSTGRES_URL) as fence:
                fence.execute(
                    f'INSERT INTO "{schema}".acquirer_operations (reference, type, status, '
                    "created_at) VALUES ('ref-1', 'fence', 'fenced', 0)"
                )
                pending = asyncio.create_task(authorize(client, "ref-1"))
                await _until_a_backend_waits_on_a_lock(schema)
                fence.commit()
                late = await pending
            assert (late.status_code, late.json()["code"]) == (409, "reference_fenced")
            assert await authorizations_of(client, "order-ref-1") == []


async def _until_a_backend_waits_on_a_lock(schema: str) -> None:
    import psycopg

    from tests.servers import POSTGRES_URL

    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query ILIKE '%acquirer_operations%'"
    )
    deadline = time.monotonic() + 30
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(query).fetchone()
            if row is not None and row[0] > 0:
                return
            await asyncio.sleep(0.01)  # polling a condition with a deadline
    raise AssertionError(f"the authorization never waited on the fence ({schema})")
