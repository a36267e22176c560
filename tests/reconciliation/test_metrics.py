"""Reconciliation's Prometheus metrics at ``/metrics`` (docs/reconciliation.md "Metrics"),
after runs started through the operator API, on SQLite and PostgreSQL: runs by outcome, report
lines, discrepancies opened by kind, the open gauge (down again once one is closed), and the
remediation actions. The registry is the process's, so each figure is read as the change a
run made."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from oncepay.payments.recovery import run_worker
from oncepay.reconciliation.records import Discrepancy, Kind, Outcome
from oncepay.reconciliation.store import save_run
from tests.payments.stack import Stack, database_url, running_stack
from tests.reconciliation.test_operator_api import TOKEN, get, orphan, post
from tests.servers import require_postgres

Sample = tuple[str, tuple[tuple[str, str], ...]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    async with running_stack(url, tmp_path, admin_token=TOKEN) as running:
        yield running


async def scrape(stack: Stack) -> dict[Sample, float]:
    response = await stack.client.get("/metrics")
    assert response.status_code == 200, response.text
    found: dict[Sample, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("oncepay_reconciliation_"):
                found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def key(name: str, **labels: str) -> Sample:
    return name, tuple(sorted(labels.items()))


async def test_metrics_after_runs(stack: Stack) -> None:
    for amount in (500, 900, 1300):
        assert (await stack.pay(amount=amount)).status_code == 201
    await orphan(stack)
    before = await scrape(stack)
    today = datetime.now(UTC).date().isoformat()
    body = {"acquirer": "primary", "day": today, "grace_days": 0}
    assert (await post(stack, "/runs", body, key="m-1")).status_code == 201
    after = await scrape(stack)

    def grew(sample: Sample) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    primary = {"acquirer": "primary"}
    assert grew(key("oncepay_reconciliation_runs_total", outcome="discrepancies", **primary)) == 1
    assert grew(key("oncepay_reconciliation_report_lines_total", **primary)) == 3
    opened = key(
        "oncepay_reconciliation_discrepancies_opened_total",
        kind="orphaned_authorization",
        **primary,
    )
    assert grew(opened) == 1
    assert grew(key("oncepay_reconciliation_actions_total", result="taken", **primary)) == 1
    # the void resolved the orphan's discrepancy: none of that kind is open
    gauge = key(
        "oncepay_reconciliation_discrepancies_open", kind="orphaned_authorization", **primary
    )
    assert after.get(gauge, 0.0) == 0

    again = await post(stack, "/runs", body, key="m-2")
    assert again.status_code == 201, again.text
    last = await scrape(stack)
    unchanged = key("oncepay_reconciliation_runs_total", outcome="unchanged", **primary)
    assert last.get(unchanged, 0.0) - after.get(unchanged, 0.0) == 1
    assert last[opened] == after[opened]  # nothing opened twice
    taken = key("oncepay_reconciliation_actions_total", result="taken", **primary)
    assert last[taken] == after[taken]  # nor voided twice


async def test_the_open_gauge_follows_runs_and_closes(stack: Stack) -> None:
    """A discrepancy a run kept open is counted by the gauge after the next run, and no more
    once an operator accepts it; an empty day is a clean run."""
    found = Discrepancy(Kind.FEE_MISMATCH, "pay_fee_capture", None, "fee 30, schedule 25", "x")
    await save_run(stack.db, "primary", date(2026, 12, 1), Outcome(1, (found,)), now=1.0)
    before = await scrape(stack)
    empty = await post(stack, "/runs", {"acquirer": "primary", "day": "2000-01-01"}, key="e")
    assert empty.status_code == 201, empty.text
    assert empty.json()["discrepancies"] == []
    after = await scrape(stack)
    clean = key("oncepay_reconciliation_runs_total", outcome="clean", acquirer="primary")
    assert after.get(clean, 0.0) - before.get(clean, 0.0) == 1
    gauge = key(
        "oncepay_reconciliation_discrepancies_open", kind="fee_mismatch", acquirer="primary"
    )
    assert after[gauge] == 1

    listed = (await get(stack, "/discrepancies", reference="pay_fee_capture")).json()["data"]
    note = {"note": "the acquirer's December schedule"}
    accepted = await post(stack, f"/discrepancies/{listed[0]['id']}/accept", note, key="a")
    assert accepted.status_code == 200, accepted.text
    assert (await scrape(stack))[gauge] == 0


class _Seen(logging.Handler):
    """Sets ``done`` once the worker logged ``wanted`` runs of reconciliation."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted, self.seen, self.done = wanted, 0, asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("reconciliation "):
            self.seen += 1
            if self.seen >= self.wanted:
                self.done.set()


async def test_the_workers_schedule_is_counted(stack: Stack) -> None:
    """The worker reconciles yesterday and today (the primary acquirer here) on its schedule,
    and each of its runs is counted like the operator API's."""
    assert (await stack.pay(amount=700)).status_code == 201
    await orphan(stack)
    before = await scrape(stack)
    seen = _Seen(2)
    logger = logging.getLogger("oncepay.worker")
    logger.addHandler(seen)
    level = logger.level
    logger.setLevel(logging.INFO)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(stack.services, stop))
    try:
        # a guard against a hang, not a time limit: the first pass starts at once
        await asyncio.wait_for(seen.done.wait(), 120)
    finally:
        stop.set()
        await worker
        logger.removeHandler(seen)
        logger.setLevel(level)
    after = await scrape(stack)

    def grew(sample: Sample) -> float:
        return after.get(sample, 0.0) - before.get(sample, 0.0)

    runs = [s for s in after if s[0] == "oncepay_reconciliation_runs_total"]
    assert sum(grew(s) for s in runs if ("acquirer", "primary") in s[1]) == 2
    assert grew(key("oncepay_reconciliation_report_lines_total", acquirer="primary")) == 1
    opened = key(
        "oncepay_reconciliation_discrepancies_opened_total",
        kind="orphaned_authorization",
        acquirer="primary",
    )
    assert grew(opened) == 1
    assert (
        grew(key("oncepay_reconciliation_actions_total", result="taken", acquirer="primary")) == 1
    )
