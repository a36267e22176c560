"""The live path end to end (issue 16): a real ``oncepay serve`` with ``--usage-log``, a real
client that mints a fresh Idempotency-Key for each retry of the same payment, and a clean one;
the misbehaving merchant's finding appears at ``GET /v1/insight/findings`` (polled with a
deadline of 60 s: the assertion is that it appears), with its event and its metric, and the
clean merchant has none.

And the key-usage log never blocks or fails a payments request: a writer stuck behind a stalled
disk (a full buffer) and a dead disk, through the API."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.insight.usage_log import UsageLog
from oncepay.payments.metrics import exposition
from tests.payments.stack import Stack, database_url, drop_schema, running_stack
from tests.processes import PYTHONPATH, ROOT, free_port, oncepay_args, running
from tests.servers import require_postgres

# How long a misbehaving client may go unreported (issue 16): the test polls until then.
REPORTED_WITHIN = 60.0


def merchant(db: str, name: str) -> dict[str, Any]:
    created = subprocess.run(
        oncepay_args("merchants", "create", name, "--database-url", db),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found: dict[str, Any] = json.loads(created.stdout)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ],
)
def test_a_client_minting_a_key_per_retry_is_reported_live(tmp_path: Path, backend: str) -> None:
    if backend == "postgres":
        require_postgres()
    db = database_url(backend, tmp_path)
    try:
        reported_live(tmp_path, db)
    finally:
        if backend == "postgres":
            asyncio.run(drop_schema(db))


def reported_live(tmp_path: Path, db: str) -> None:
    drifting, clean = merchant(db, "Drifting shop"), merchant(db, "Clean shop")
    port = free_port()
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path / 'a.db'}",
        "ONCEPAY_WORKER_INTERVAL": "0.2",
    }
    args = oncepay_args(
        "serve", "--port", str(port), "--usage-log", str(tmp_path / "u.jsonl"), "--quiet"
    )
    base = f"http://127.0.0.1:{port}"

    def as_merchant(who: dict[str, Any], key: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {who['api_key']}"}
        return headers if key is None else {**headers, "Idempotency-Key": key}

    with running(args, port, env), httpx.Client(base_url=base, timeout=30) as http:
        for n in range(12):  # the clean client: a retry reuses the first attempt's key
            body = {"amount": 500 + n, "currency": "EUR", "payment_method": "pm_card_ok"}
            for _ in range(2):
                sent = http.post("/v1/payments", json=body, headers=as_merchant(clean, f"c{n}"))
                assert sent.status_code == 201, sent.text
        for n in range(12):  # the bug: every retry of the same payment gets a fresh key
            body = {"amount": 1000 + n, "currency": "EUR", "payment_method": "pm_card_ok"}
            for attempt in range(2):
                key = f"d{n}-attempt{attempt}"
                sent = http.post("/v1/payments", json=body, headers=as_merchant(drifting, key))
                assert sent.status_code == 201, sent.text

        deadline = time.monotonic() + REPORTED_WITHIN
        found: list[dict[str, Any]] = []
        while not found and time.monotonic() < deadline:
            answer = http.get("/v1/insight/findings", headers=as_merchant(drifting))
            assert answer.status_code == 200, answer.text
            found = answer.json()["data"]
            if not found:
                time.sleep(0.2)  # polling a condition with a deadline
        assert found, f"no finding within {REPORTED_WITHIN} s"
        (finding,) = found
        assert finding["kind"] == "key_per_retry"
        assert finding["tenant"] == drifting["id"]
        assert finding["status"] == "open"
        assert finding["events"] >= 8
        assert "fresh idempotency key" in finding["detail"]

        theirs = http.get("/v1/insight/findings", headers=as_merchant(clean)).json()["data"]
        assert theirs == []
        events = http.get(
            "/v1/events?type=insight.finding_opened", headers=as_merchant(drifting)
        ).json()["data"]
        assert [e["data"]["object"]["id"] for e in events] == [finding["id"]]
        metrics = http.get("/metrics").text
        assert 'oncepay_insight_findings_opened_total{kind="key_per_retry"} 1.0' in metrics
        assert 'oncepay_usage_log_records_total{outcome="written"}' in metrics


# -- the log never blocks nor fails a request ----------------------------------------------------


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
async def logged(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    folder = tmp_path / "logs"
    folder.mkdir()
    async with running_stack(url, tmp_path, usage_log=str(folder / "u.jsonl")) as stack:
        yield stack


class StalledDisk:
    """A file whose writes block until the test lets them go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, data: bytes) -> int:
        self.entered.set()
        assert self.release.wait(30), "the test never released the writer"
        return len(data)

    def flush(self) -> None:
        pass


def value(name: str) -> float:
    found = [line for line in exposition().decode().splitlines() if line.startswith(name + " ")]
    return float(found[0].split()[-1]) if found else 0.0


async def test_a_full_buffer_drops_records_and_every_request_still_succeeds(
    logged: Stack,
) -> None:
    disk = StalledDisk()
    stalled = UsageLog(disk, capacity=2, interval=0.001)  # type: ignore[arg-type]
    original = logged.services.gate.usage_log
    logged.services.gate.usage_log = stalled
    try:
        first = await logged.pay()
        assert first.status_code == 201, first.text
        assert disk.entered.wait(30)  # the writer is stuck in write() with that record
        answers = [await logged.pay() for _ in range(6)]  # 2 buffered, 4 dropped
        assert [a.status_code for a in answers] == [201] * 6
        assert stalled.dropped == 4
    finally:
        disk.release.set()
        stalled.close()
        logged.services.gate.usage_log = original
    assert stalled.written == 3


async def test_a_dead_disk_is_counted_and_every_request_still_succeeds(logged: Stack) -> None:
    usage_log = logged.services.gate.usage_log
    assert isinstance(usage_log, UsageLog)
    assert usage_log.path is not None
    failed = value("oncepay_usage_log_failed_writes_total")
    dropped = value('oncepay_usage_log_records_total{outcome="dropped"}')
    shutil.rmtree(usage_log.path.parent)  # the log's disk is gone
    answers = [await logged.pay() for _ in range(3)]
    assert [a.status_code for a in answers] == [201] * 3
    usage_log.flush()  # the writer's next batch, now
    assert usage_log.write_errors >= 1
    assert value("oncepay_usage_log_failed_writes_total") >= failed + 1
    assert value('oncepay_usage_log_records_total{outcome="dropped"}') >= dropped + 3
    usage_log.path.parent.mkdir()  # back: the next batch is written
    assert (await logged.pay()).status_code == 201
    usage_log.flush()
    assert usage_log.path.exists()
