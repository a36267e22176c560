"""The live path (docs/insight.md): the worker tails the key-usage log, feeds the detectors and
stores findings — one per anomaly, extended while it goes on, never duplicated by a restart or
by several workers at once — each with its ``insight.finding_opened`` event in the same
transaction; merchants read their own at ``GET /v1/insight/findings``, operators everyone's.
On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from oncepay.insight.findings import Finding
from oncepay.insight.live import LiveInsight, LogTail
from oncepay.insight.records import Usage, to_line
from oncepay.insight.store import findings as findings_table
from oncepay.insight.store import record
from oncepay.insight.usage_log import UsageLog
from oncepay.payments.events import finding_opened
from oncepay.payments.merchants import create_merchant
from oncepay.payments.metrics import exposition
from oncepay.payments.recovery import insight_job
from oncepay.payments.storage.schema import events
from oncepay.storage.db import read
from tests.insight.traffic import T0, normal, usage
from tests.payments.stack import Stack, database_url, running_stack
from tests.servers import require_postgres

TOKEN = "op-token-0123456789abcdef"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    log = tmp_path / "usage.jsonl"
    async with running_stack(url, tmp_path, usage_log=str(log), admin_token=TOKEN) as running:
        yield running


def drifting(tenant: str, start: float, pairs: int, prefix: str = "") -> list[Usage]:
    """A client that sends each payment again two seconds later under a fresh key."""
    out = []
    for i in range(pairs):
        at = start + i * 30.0
        fingerprint = f"fp-{prefix}{i}"
        out.append(usage(at, f"{prefix}a{i}", tenant=tenant, fingerprint=fingerprint))
        out.append(usage(at + 2.0, f"{prefix}b{i}", tenant=tenant, fingerprint=fingerprint))
    return out


def append(path: Path, records: list[Usage]) -> None:
    with path.open("a") as file:
        file.writelines(to_line(u) for u in records)


def log_of(stack: Stack) -> Path:
    assert stack.services.settings.usage_log is not None
    return Path(stack.services.settings.usage_log)


async def stored(stack: Stack) -> list[dict[str, object]]:
    async with read(stack.db) as conn:
        rows = await conn.execute(select(findings_table).order_by(findings_table.c.seq))
        return [dict(row._mapping) for row in rows]


async def opened_events(stack: Stack) -> list[dict[str, object]]:
    async with read(stack.db) as conn:
        rows = await conn.execute(select(events).where(events.c.type == "insight.finding_opened"))
        return [dict(row._mapping) for row in rows]


# -- the tail ------------------------------------------------------------------------------------


def test_the_tail_reads_whole_lines_as_they_are_appended(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    tail = LogTail(path)
    assert tail.read() == b""  # no log yet
    path.write_bytes(b"one\ntw")
    assert tail.read() == b"one\n"
    assert tail.read() == b""  # "tw" is still being written
    with path.open("ab") as file:
        file.write(b"o\nthree\n")
    assert tail.read() == b"two\nthree\n"
    tail.close()


def test_the_tail_follows_a_rotated_log_and_a_truncated_one(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b"a\n")
    tail = LogTail(path)
    assert tail.read() == b"a\n"
    with path.open("ab") as file:
        file.write(b"b\n")
    os.rename(path, tmp_path / "usage.jsonl.1")  # rotated: the old file's last lines first
    path.write_bytes(b"c\n")
    assert tail.read() == b"b\n"
    assert tail.read() == b"c\n"
    path.write_bytes(b"")  # truncated (copytruncate), then written again
    assert tail.read() == b""
    path.write_bytes(b"d\n")
    assert tail.read() == b"d\n"
    tail.close()


def test_a_backlog_is_read_in_slices(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(100)))
    tail = LogTail(path, chunk=64)
    seen = b""
    while True:
        seen += tail.read()
        if not tail.more:
            break
    seen += tail.read()
    assert seen.count(b"\n") == 100
    tail.close()


# -- findings stored ---------------------------------------------------------------------------


async def test_a_drifting_client_becomes_one_open_finding_with_its_event(stack: Stack) -> None:
    tenant = stack.merchant.id
    planted = drifting(tenant, T0, pairs=15)
    append(log_of(stack), planted)
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    step = await live.step(now=planted[-1].at)
    assert step.records == 30
    assert [(f.tenant, f.kind) for f in step.opened] == [(tenant, "key_per_retry")]
    (row,) = await stored(stack)
    assert (row["merchant_id"], row["kind"], row["status"]) == (tenant, "key_per_retry", "open")
    assert row["events"] == 15
    evidence = json.loads(str(row["evidence"]))
    assert evidence["example_keys"][0] == "b0"
    (event,) = await opened_events(stack)
    assert event["merchant_id"] == tenant
    assert event["object_id"] == row["id"]
    assert json.loads(str(event["data"]))["kind"] == "key_per_retry"
    live.close()


async def test_a_continuing_anomaly_extends_its_finding_and_a_restart_finds_it_again(
    stack: Stack,
) -> None:
    tenant = stack.merchant.id
    path = log_of(stack)
    planted = drifting(tenant, T0, pairs=30)
    append(path, planted[:30])
    live = LiveInsight(path, stack.db, announce=finding_opened)
    await live.step(now=planted[29].at)
    append(path, planted[30:])
    step = await live.step(now=planted[-1].at)
    assert step.opened == []  # the same anomaly, going on
    (row,) = await stored(stack)
    assert row["events"] == 30
    assert row["last_at"] == planted[-1].at
    restarted = LiveInsight(path, stack.db, announce=finding_opened)  # reads it all again
    assert (await restarted.step(now=planted[-1].at)).opened == []
    assert len(await stored(stack)) == 1
    assert len(await opened_events(stack)) == 1
    live.close()
    restarted.close()


async def test_a_later_anomaly_closes_the_first_and_opens_a_second(stack: Stack) -> None:
    tenant = stack.merchant.id
    usual = list(normal(random.Random(1), tenant=tenant, hours=12))
    first = drifting(tenant, T0 + 3600, pairs=15)
    later = drifting(tenant, T0 + 8 * 3600, pairs=15, prefix="z")
    append(log_of(stack), sorted(usual + first + later, key=lambda u: u.at))
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    step = await live.step(now=later[-1].at)
    assert len(step.opened) == 2
    rows = await stored(stack)
    assert [r["status"] for r in rows] == ["closed", "open"]
    assert len(await opened_events(stack)) == 2
    live.close()


async def test_several_workers_at_once_store_one_finding_and_one_event(stack: Stack) -> None:
    """Eight workers record the same new finding at the same moment (on PostgreSQL, eight
    connections racing to insert): one row, one event; the others extend it."""
    tenant = stack.merchant.id
    finding = Finding(tenant, "no_backoff", T0, T0 + 600, 40, "40 retries ...")
    results = await asyncio.gather(
        *(record(stack.db, finding, {}, announce=finding_opened, now=T0) for _ in range(8))
    )
    assert sum(r.opened for r in results) == 1
    assert len({r.id for r in results}) == 1
    assert len(await stored(stack)) == 1
    assert len(await opened_events(stack)) == 1


async def test_several_live_workers_on_one_log_store_each_finding_once(stack: Stack) -> None:
    tenant = stack.merchant.id
    planted = drifting(tenant, T0, pairs=20)
    append(log_of(stack), planted)
    workers = [LiveInsight(log_of(stack), stack.db, announce=finding_opened) for _ in range(3)]
    try:
        steps = await asyncio.gather(*(w.step(now=planted[-1].at) for w in workers))
        assert sum(len(s.opened) for s in steps) == 1
        assert len(await stored(stack)) == 1
        assert len(await opened_events(stack)) == 1
    finally:  # a failure must not leak the log's file into the next test's warnings
        for worker in workers:
            worker.close()


async def test_a_tenant_that_is_no_merchant_gets_a_finding_and_no_event(stack: Stack) -> None:
    planted = drifting("gateway-tenant", T0, pairs=15)
    append(log_of(stack), planted)
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    assert len((await live.step(now=planted[-1].at)).opened) == 1
    assert len(await stored(stack)) == 1
    assert await opened_events(stack) == []
    live.close()


# -- the API -------------------------------------------------------------------------------------


async def test_a_merchant_lists_its_own_findings_only(stack: Stack) -> None:
    tenant = stack.merchant.id
    other, other_key = await create_merchant(stack.db, "Another shop")
    planted = drifting(tenant, T0, pairs=15) + drifting(other.id, T0 + 7200, pairs=12, prefix="o")
    append(log_of(stack), sorted(planted, key=lambda u: u.at))
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    await live.step(now=T0 + 7200 + 400)
    live.close()

    mine = await stack.client.get("/v1/insight/findings")
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["object"] == "list"
    assert body["url"] == "/v1/insight/findings"
    (finding,) = body["data"]
    assert finding["object"] == "insight_finding"
    assert finding["tenant"] == tenant
    assert finding["kind"] == "key_per_retry"
    assert finding["events"] == 15
    assert "fresh idempotency key" in finding["detail"]

    headers = {"Authorization": f"Bearer {other_key}"}
    theirs = (await stack.client.get("/v1/insight/findings", headers=headers)).json()["data"]
    assert [f["tenant"] for f in theirs] == [other.id]
    assert theirs[0]["id"] != finding["id"]

    none = await stack.client.get("/v1/insight/findings?kind=replay_storm")
    assert none.json()["data"] == []
    # Its evidence stopped more than an hour (of the log) before the worker's step: closed.
    assert finding["status"] == "closed"
    assert (await stack.client.get("/v1/insight/findings?status=open")).json()["data"] == []
    assert len((await stack.client.get("/v1/insight/findings?status=closed")).json()["data"]) == 1
    bad = await stack.client.get("/v1/insight/findings?kind=teleported")
    assert bad.status_code == 400
    assert bad.headers["content-type"].startswith("application/problem+json")
    unknown = await stack.client.get("/v1/insight/findings?colour=red")
    assert unknown.status_code == 400


async def test_pages_follow_the_cursor(stack: Stack) -> None:
    tenant = stack.merchant.id
    planted: list[Usage] = []
    for n in range(3):  # three anomalies, six hours apart: three findings
        planted += drifting(tenant, T0 + (1 + n * 6) * 3600, pairs=12, prefix=f"p{n}")
    usual = list(normal(random.Random(2), tenant=tenant, hours=18))
    planted = sorted(usual + planted, key=lambda u: u.at)
    append(log_of(stack), planted)
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    await live.step(now=planted[-1].at)
    live.close()
    first = (await stack.client.get("/v1/insight/findings?limit=2")).json()
    assert len(first["data"]) == 2
    assert first["has_more"] is True
    cursor = first["data"][-1]["id"]
    rest = (await stack.client.get(f"/v1/insight/findings?limit=2&starting_after={cursor}")).json()
    assert len(rest["data"]) == 1
    assert rest["has_more"] is False
    assert first["data"][0]["first_at"] > rest["data"][0]["first_at"]  # newest first


async def test_operators_see_every_tenants_findings(stack: Stack) -> None:
    other, _ = await create_merchant(stack.db, "Another shop")
    planted = drifting(stack.merchant.id, T0, 15) + drifting(other.id, T0 + 60, 15, "o")
    append(log_of(stack), sorted(planted, key=lambda u: u.at))
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    await live.step(now=T0 + 600)
    live.close()
    operator = {"Authorization": f"Bearer {TOKEN}"}
    every = await stack.client.get("/v1/admin/insight/findings", headers=operator)
    assert every.status_code == 200, every.text
    assert {f["tenant"] for f in every.json()["data"]} == {stack.merchant.id, other.id}
    one = await stack.client.get(
        f"/v1/admin/insight/findings?tenant={other.id}&limit=1", headers=operator
    )
    assert [f["tenant"] for f in one.json()["data"]] == [other.id]
    as_merchant = await stack.client.get("/v1/admin/insight/findings")
    assert as_merchant.status_code == 401


# -- the worker's job and /metrics ---------------------------------------------------------------


async def test_the_worker_job_counts_findings_records_and_the_logs_own_counts(
    stack: Stack,
) -> None:
    tenant = stack.merchant.id
    response = await stack.pay()  # a decision the service's own usage log records
    assert response.status_code == 201, response.text
    usage_log = stack.services.gate.usage_log
    assert isinstance(usage_log, UsageLog)
    usage_log.flush()
    planted = drifting(tenant, T0, pairs=15)
    append(log_of(stack), planted)
    job = insight_job(stack.services)
    assert job is not None
    before = exposition().decode()
    assert await job() is False
    job.close()
    text = exposition().decode()

    def value(name: str, page: str) -> float:
        found = [line for line in page.splitlines() if line.startswith(name + " ")]
        return float(found[0].split()[-1]) if found else 0.0

    kind = 'oncepay_insight_findings_opened_total{kind="key_per_retry"}'
    assert value(kind, text) == value(kind, before) + 1
    records = "oncepay_insight_records_analyzed_total"
    assert value(records, text) == value(records, before) + 31
    written = 'oncepay_usage_log_records_total{outcome="written"}'
    assert value(written, text) >= 1
    assert "oncepay_usage_log_failed_writes_total" in text
    async with httpx.AsyncClient(
        transport=stack.client._transport, base_url="http://payments"
    ) as client:
        scraped = (await client.get("/metrics")).text
    assert "oncepay_insight_findings_opened_total" in scraped


async def test_the_worker_hands_learned_ttls_to_the_gates_policy(tmp_path: Path) -> None:
    """With learned TTLs on and no file as their source, the live analysis is the source."""
    log = tmp_path / "usage.jsonl"
    url = database_url("sqlite", tmp_path)
    async with running_stack(url, tmp_path, usage_log=str(log), adaptive_ttl=True) as stack:
        tenant = stack.merchant.id
        retried: list[Usage] = []
        for n in range(40):  # each payment retried 5 s later with its key: a replay
            retried.append(usage(T0 + n * 60, f"k{n}", tenant=tenant))
            retried.append(usage(T0 + n * 60 + 5, f"k{n}", "replayed", tenant=tenant))
        append(log, retried)
        policy = stack.services.ttl_policy
        assert policy is not None
        assert policy.learned() == {}
        job = insight_job(stack.services)
        assert job is not None
        await job()
        job.close()
        assert policy.learned() == {(tenant, "POST /v1/payments"): 300.0}  # the minimum


async def test_a_finding_the_database_refused_is_stored_at_the_next_step(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from oncepay.insight import live as live_module

    planted = drifting(stack.merchant.id, T0, pairs=15)
    append(log_of(stack), planted)
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)

    async def unavailable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("the database is away")

    monkeypatch.setattr(live_module, "record", unavailable)
    with pytest.raises(ConnectionError):
        await live.step(now=planted[-1].at)
    monkeypatch.setattr(live_module, "record", record)
    step = await live.step(now=planted[-1].at)  # no new line: the finding is retried anyway
    assert step.records == 0
    assert [f.kind for f in step.opened] == ["key_per_retry"]
    live.close()


async def test_a_slow_anomaly_read_as_the_log_grows_is_one_finding(stack: Stack) -> None:
    """A key back after expiry every two hours or so for 30 hours of a week (docs/insight.md,
    slow anomalies), read a day at a time: found once it stands out, then extended."""
    tenant = stack.merchant.id
    rng = random.Random(2)
    loop = []
    for n in range(15):
        at = T0 + 80 * 3600 + n * 7200 + rng.uniform(0, 1800)
        loop += [
            usage(at - 30 * 3600, f"loop-{n}", tenant=tenant),
            usage(at, f"loop-{n}", tenant=tenant),
        ]
    week = sorted([*normal(rng, tenant=tenant, hours=7 * 24), *loop], key=lambda u: u.at)
    live = LiveInsight(log_of(stack), stack.db, announce=finding_opened)
    for day in range(7):
        append(log_of(stack), [u for u in week if day * 86400 <= u.at - T0 < (day + 1) * 86400])
        step = await live.step(now=T0 + (day + 1) * 86400)
        while step.more:
            step = await live.step(now=T0 + (day + 1) * 86400)
    rows = await stored(stack)
    assert [(r["kind"], r["events"]) for r in rows] == [("retry_after_expiry", 15)]
    assert len(await opened_events(stack)) == 1
    live.close()
