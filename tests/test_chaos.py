"""The exactly-once audit under faults, short: ``oncepay chaos`` as a user runs it, on SQLite
and on PostgreSQL (with a Redis tier), every fault kind injected, orphaned authorizations
injected at both acquirers and every day reconciled afterwards; the audit must find no
violation. A second test shows the audit is not toothless: it reports a planted double
authorization, an orphan payment and a lie to a client."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from oncepay.chaos.audit import Evidence, audit
from tests.payments.stack import drop_schema
from tests.payments.test_processes import cli
from tests.servers import POSTGRES_URL, require_postgres, require_redis

FAULT_KINDS = [
    "kill -9 API process",
    "kill -9 worker",
    "primary acquirer outages",
    "answers dropped by the proxy",
]
SHORT_RUN = [
    "--payments",
    "300",
    "--concurrency",
    "16",
    "--kill-interval",
    "1.5",
    "--outage-interval",
    "3",
    "--outage-seconds",
    "1",
    "--redis-interval",
    "2",
]


def run_chaos(tmp_path: Path, *extra: str) -> dict[str, Any]:
    # A guard against a hang, not a time limit: a short run takes 1-2 minutes here, and its
    # drain may wait up to 600 s by design for recovery to finish under a loaded machine.
    result = cli("chaos", *SHORT_RUN, "--workdir", str(tmp_path), "--json", *extra, timeout=900)
    try:
        report: dict[str, Any] = json.loads(result.stdout)
    except json.JSONDecodeError:
        # No report: the run never got going; what it and its services said is the evidence.
        logs = {log.name: log.read_text()[-1500:] for log in sorted(tmp_path.glob("*.log"))}
        pytest.fail(f"chaos exited {result.returncode} with no report: {result.stderr}\n{logs}")
    assert result.returncode == (1 if report["violation_count"] else 0), result.stderr
    return report


def assert_clean(report: dict[str, Any]) -> None:
    assert report["violation_count"] == 0, report["violations"]
    assert report["logical_payments"] == 300
    for kind in FAULT_KINDS:
        assert report["faults"].get(kind, 0) > 0, (kind, report["faults"])
    assert report["retries"] > 0
    assert {"captured", "failed"} <= set(report["outcomes"])
    # orphans injected at both acquirers, found by reconciling every day, and nothing else
    # (the audit's reconciliation checks above require each voided exactly once)
    assert report["reconciliation"]["orphans injected"] == 6
    assert report["reconciliation"]["discrepancies: orphaned_authorization"] == 6


@pytest.mark.slow
def test_chaos_on_sqlite(tmp_path: Path) -> None:
    assert_clean(run_chaos(tmp_path))


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_chaos_on_postgres_with_a_redis_tier(tmp_path: Path) -> None:
    require_postgres()
    require_redis()  # its binary runs the private server of the run
    url = f"{POSTGRES_URL}?schema=oncepay_chaos_{uuid.uuid4().hex[:8]}"
    try:
        report = run_chaos(tmp_path, "--database-url", url, "--redis")
    finally:
        import asyncio

        asyncio.run(drop_schema(url))
    assert_clean(report)
    assert report["faults"]["Redis flushes"] > 0
    assert report["faults"]["Redis kill -9 and restart"] > 0


@pytest.mark.slow
def test_a_full_primary_outage_keeps_retry_amplification_low(tmp_path: Path) -> None:
    """One 15 s outage of the primary (503 to everything) with three retries allowed per call:
    attempts sent ÷ logical operations stays at most 1.2 during it, the primary takes traffic
    again after the heal, and the audit still finds nothing."""
    full_outage = ["--full-outage", "15", "--full-outage-after", "5", "--acquirer-attempts", "4"]
    calm = ["--outage-interval", "0", "--kill-interval", "0", "--duration", "40"]
    # Only the outage: the blips the other faults add are retried on the secondary as they
    # should be, and would be counted with it.
    calm += ["--error-rate", "0", "--drop-rate", "0", "--timeout-after-commit-rate", "0"]
    report = run_chaos(tmp_path, *full_outage, *calm)
    assert report["violation_count"] == 0, report["violations"]
    figures = report["retry_control"]
    assert figures["outage_logical_operations"] > 0
    assert figures["outage_amplification"] <= 1.2, figures
    assert figures["traffic_returned_seconds"] is not None, figures


def test_the_audit_finds_planted_violations() -> None:
    def payment(pid: str, status: str) -> Any:
        return SimpleNamespace(id=pid, status=status, outcome_unknown=False,
                               amount_captured=0, amount_refunded=0)  # fmt: skip

    def auth(order: str, acquirer: str = "primary") -> dict[str, Any]:
        return {
            "order_id": order,
            "type": "authorization",
            "status": "approved",
            "acquirer": acquirer,
        }

    evidence = Evidence(
        answers={
            "k1": {"id": "pay_1", "status": "captured"},
            "k2": {"id": "pay_2", "status": "captured"},
            "k3": None,
        },
        operations=[auth("pay_1"), auth("pay_1", "secondary"), auth("pay_2")],
        received={"arrived": {"evt_1": 2}, "handled": {"evt_1": 2}},
        payments=[
            payment("pay_1", "captured"),
            payment("pay_2", "failed"),
            payment("pay_9", "processing"),
        ],
        key_to_payment={"k1": "pay_1", "k2": "pay_2"},
        event_ids=["evt_1", "evt_2"],
        ledger=["pay_1: unbalanced"],
    )
    found = audit(evidence)
    assert found["authorized at most once per payment"] == ["pay_1: 2 approved authorizations"]
    assert len(found["every approved payment authorized exactly once"]) == 2
    assert found["one payment per logical payment"] == [
        "pay_9 belongs to no logical payment (a second run?)"
    ]
    assert found["client answers agree with the database"] == [
        "key k2: told captured, the database says failed"
    ]
    assert found["every client got a final answer"] == ["key k3: no final answer"]
    assert len(found["no payment left processing"]) == 1
    assert found["ledger balances and matches every payment"] == ["pay_1: unbalanced"]
    assert "evt_2: never delivered" in found["every event delivered, each handled once"]
    assert "evt_1: handled 2 times" in found["every event delivered, each handled once"]


def test_the_audit_checks_money_at_the_acquirers_too() -> None:
    """An approved operation for no payment, and captures or refunds that do not match the
    payments, are violations even when authorizations look right."""
    payment = SimpleNamespace(id="pay_1", status="captured", outcome_unknown=False,
                              amount_captured=500, amount_refunded=0)  # fmt: skip
    evidence = Evidence(
        answers={"k1": {"id": "pay_1", "status": "captured"}},
        operations=[
            {
                "order_id": "pay_1",
                "type": "authorization",
                "status": "approved",
                "acquirer": "primary",
                "reference": "pay_1_a1",
            },
            {
                "order_id": "pay_ghost",
                "type": "authorization",
                "status": "approved",
                "acquirer": "primary",
                "reference": "pay_ghost_a1",
            },
        ],
        received={"arrived": {}, "handled": {}},
        movements=[
            {"order_id": "pay_1", "type": "capture", "amount": 500},
            {"order_id": "pay_1", "type": "capture", "amount": 500},
        ],
        payments=[payment],
        key_to_payment={"k1": "pay_1"},
    )
    found = audit(evidence)
    assert found["no money moved for a payment that does not exist"] == [
        "primary authorization pay_ghost_a1 for unknown order pay_ghost"
    ]
    assert found["captured and refunded amounts match the acquirers' settlements"] == [
        "pay_1: the acquirers captured 1000, the payment says 500"
    ]
