"""Learned TTLs in the payments service (settings ``adaptive_ttl``), on SQLite and PostgreSQL:
off by default (every key 24 h, said in ``Idempotency-Key-Expires``); on, a merchant's keys
are kept as long as its clients retry, from a file or the worker's live analysis
(``services.ttl_policy.update``), the header says so, what is saved is in /metrics, and a
request still unfinished keeps its key past the learned TTL."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from typer.testing import CliRunner

from oncepay.cli import app
from oncepay.errors import ConfigurationError
from oncepay.insight.findings import TtlAdvice
from oncepay.payments import recovery
from oncepay.payments.metrics import REGISTRY
from oncepay.payments.recovery import keep_unfinished, reap, recover_once
from oncepay.payments.settings import Settings
from oncepay.storage.db import read
from tests.payments.stack import BACKOFF, TEST_LEASE, Stack, running_stack

DAY = 24 * 3600.0
PAYMENTS = "POST /v1/payments"
REFUNDS = "POST /v1/payments/{id}/refunds"


def http_date(at: float) -> str:
    return formatdate(int(at), usegmt=True)


def key_seconds(kind: str) -> float:
    value = REGISTRY.get_sample_value("oncepay_adaptive_ttl_key_seconds_total", {"ttl": kind})
    return value or 0.0


@pytest.fixture
async def adaptive(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, adaptive_ttl=True) as running:
        yield running


async def only_payment(stack: Stack) -> str:
    async with read(stack.db) as conn:
        [(payment_id,)] = (await conn.execute(text("SELECT id FROM payments"))).all()
    return str(payment_id)


def learn(stack: Stack, route: str, ttl: int, basis: int = 200) -> None:
    """What the worker's live analysis does with the analyzer's advice."""
    assert stack.services.ttl_policy is not None
    stack.services.ttl_policy.update([TtlAdvice(stack.merchant.id, route, ttl, basis)])


async def test_off_by_default_every_key_is_kept_24_hours_and_the_header_says_so(
    stack: Stack,
) -> None:
    assert stack.services.ttl_policy is None
    assert stack.services.gate.ttl_policy is None
    first = await stack.pay(key="order-1")
    assert first.headers["idempotency-key-expires"] == http_date(stack.clock.now + DAY)
    stack.clock.advance(3600)
    replay = await stack.pay(key="order-1")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["idempotency-key-expires"] == first.headers["idempotency-key-expires"]


async def test_nothing_learned_yet_keeps_key_ttl(adaptive: Stack) -> None:
    first = await adaptive.pay()
    assert first.headers["idempotency-key-expires"] == http_date(adaptive.clock.now + DAY)


async def test_a_learned_ttl_keeps_the_key_that_long_and_no_longer(adaptive: Stack) -> None:
    stack = adaptive
    learn(stack, PAYMENTS, 600)
    learned_before, fixed_before = key_seconds("learned"), key_seconds("fixed")
    first = await stack.pay(key="order-1")
    assert first.status_code == 201
    assert first.headers["idempotency-key-expires"] == http_date(stack.clock.now + 600)
    stack.clock.advance(599)
    replay = await stack.pay(key="order-1")
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.headers["idempotency-key-expires"] == first.headers["idempotency-key-expires"]
    stack.clock.advance(2)  # past the learned 600 s: the key names a new request now
    again = await stack.pay(key="order-1")
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]
    assert key_seconds("learned") - learned_before == 2 * 600
    assert key_seconds("fixed") - fixed_before == 2 * DAY
    metrics = (await stack.client.get("/metrics")).text
    assert 'oncepay_adaptive_ttl_key_seconds_total{ttl="learned"}' in metrics
    savings = stack.services.ttl_policy.savings() if stack.services.ttl_policy else None
    assert savings is not None
    assert savings.records == 2


async def test_a_learned_ttl_is_per_route_template_and_held_to_the_bounds(adaptive: Stack) -> None:
    stack = adaptive
    learn(stack, REFUNDS, 60)  # under adaptive_ttl_min (300 s): held to it
    payment = (await stack.pay()).json()
    assert payment["status"] == "captured"
    refund = await stack.post(f"/v1/payments/{payment['id']}/refunds", {"amount": 100})
    assert refund.status_code == 201, refund.text
    assert refund.headers["idempotency-key-expires"] == http_date(stack.clock.now + 300)
    other = await stack.pay()  # POST /v1/payments learned nothing: key_ttl
    assert other.headers["idempotency-key-expires"] == http_date(stack.clock.now + DAY)


async def test_an_unfinished_request_keeps_its_key_past_the_learned_ttl(adaptive: Stack) -> None:
    """unfinished_retention is untouched: a payment whose acquirer outcome is unknown is
    resumed by the retry, never started anew, however short the learned TTL."""
    stack = adaptive
    learn(stack, PAYMENTS, 600)
    await stack.faults(timeout_after_commit_rate=1.0, stall_seconds=5)
    assert (await stack.pay(key="order-42")).status_code == 503
    first = await only_payment(stack)
    stack.clock.advance(BACKOFF[0] + 1)
    assert dict((await recover_once(stack.services, now=stack.clock())).results) == {"unknown": 1}
    stack.clock.advance(3 * 600)  # far past the learned TTL
    await keep_unfinished(stack.services, now=stack.clock())
    assert await reap(stack.services, now=stack.clock()) == 0
    await stack.faults()
    stack.clock.advance(BACKOFF[-1] + 60)
    assert dict((await recover_once(stack.services, now=stack.clock())).results) == {"finished": 1}
    retry = await stack.pay(key="order-42")
    assert retry.status_code == 201
    assert retry.json()["id"] == first
    assert await stack.count("payments") == 1


async def test_a_file_of_learned_ttls_is_read_at_start(payments_url: str, tmp_path: Path) -> None:
    path = tmp_path / "ttl.json"
    entries = [{"tenant": "m_1", "route": PAYMENTS, "ttl_seconds": 900, "basis": 120}]
    path.write_text(json.dumps({"findings": [], "ttl": entries}))
    async with running_stack(
        payments_url, tmp_path, adaptive_ttl=True, adaptive_ttl_file=str(path)
    ) as stack:
        assert stack.services.ttl_policy is not None
        assert stack.services.ttl_policy.learned() == {("m_1", PAYMENTS): 900}


async def test_a_file_that_cannot_be_used_stops_the_start(
    payments_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "ttl.json"
    path.write_text("[]")
    with pytest.raises(ConfigurationError, match='no "ttl" list'):
        async with running_stack(
            payments_url, tmp_path, adaptive_ttl=True, adaptive_ttl_file=str(path)
        ):
            pass


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"adaptive_ttl": True, "adaptive_ttl_min": TEST_LEASE}, "lease < adaptive_ttl_min"),
        ({"adaptive_ttl_min": 900, "adaptive_ttl_max": 600}, "min <= adaptive_ttl_max"),
        ({"adaptive_ttl_file": "ttl.json"}, "adaptive_ttl is off"),
    ],
)  # fmt: skip
def test_settings_that_would_let_a_key_lapse_mid_request_are_refused(
    settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(lease=TEST_LEASE, **settings)


async def test_the_worker_reads_a_changed_file_again(
    payments_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ttl.json"

    def write(ttl: int) -> None:
        entries = [{"tenant": "m_1", "route": PAYMENTS, "ttl_seconds": ttl, "basis": 120}]
        part = tmp_path / "ttl.part"
        part.write_text(json.dumps({"findings": [], "ttl": entries}))
        os.replace(part, path)

    write(900)
    monkeypatch.setattr(recovery, "TTL_FILE_CHECK", 0.01)
    async with running_stack(
        payments_url, tmp_path, adaptive_ttl=True, adaptive_ttl_file=str(path)
    ) as stack:
        policy = stack.services.ttl_policy
        assert policy is not None
        assert policy.learned() == {("m_1", PAYMENTS): 900}
        stop = asyncio.Event()
        worker = asyncio.create_task(recovery.run_worker(stack.services, stop))
        try:
            write(1800)
            for _ in range(1000):  # until the worker's next check has read it
                if policy.learned() == {("m_1", PAYMENTS): 1800}:
                    break
                await asyncio.sleep(0.01)
            assert policy.learned() == {("m_1", PAYMENTS): 1800}
        finally:
            stop.set()
            await worker


def test_serve_refuses_a_ttl_file_it_cannot_use_before_serving(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    database = f"sqlite:///{tmp_path / 'payments.db'}"
    args = ["serve", "--adaptive-ttl-file", str(missing), "--database-url", database]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"adaptive TTL file {missing}: cannot read it" in result.output
    assert not (tmp_path / "payments.db").exists()  # refused before anything was opened
