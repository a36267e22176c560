"""An orphaned authorization is voided exactly once, proven with real processes: ``oncepay
reconcile`` killed with SIGKILL while its void is committed at the acquirer but unanswered
(the next run resumes it once the key's lease lapses), and two ``oncepay reconcile`` at once
(the second finds the void in progress and leaves it). The acquirer is a real ``oncepay
acquirer`` process; the payments database SQLite or PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.payments.acquirer_helpers import auth_body, key, running_acquirer
from tests.payments.stack import database_url, drop_schema
from tests.processes import PYTHONPATH, ROOT, oncepay_args
from tests.servers import require_postgres

pytestmark = pytest.mark.slow

# Starting a Python process that imports the service takes one to three seconds here; a
# minute leaves room for a loaded CI machine.
DEADLINE = 60.0
# The stalled void's answer: longer than a second run takes to start and finish, so that run
# certainly meets the first one's claim (the order is forced, not hoped for).
STALL = 25.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def payments_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    yield url
    import asyncio

    asyncio.run(drop_schema(url))


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        oncepay_args(*args),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def reconcile_process(env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        oncepay_args("reconcile", "--grace-days", "0", "--json"),
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def voids(acquirer: str, order_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{acquirer}/admin/operations", params={"order_id": order_id})
    return [op for op in answer.json()["operations"] if op["type"] == "void"]


def plant_orphan(acquirer: str, payment_id: str) -> None:
    reference = f"{payment_id}_a1"
    body = auth_body(reference, order_id=payment_id)
    answer = httpx.post(f"{acquirer}/v1/authorizations", json=body, headers=key(reference))
    assert answer.status_code == 201, answer.text


def stall_voids(acquirer: str) -> None:
    faults = {"timeout_after_commit_rate": 1, "stall_seconds": STALL, "operations": ["void"]}
    httpx.put(f"{acquirer}/admin/faults", json=faults).raise_for_status()


def wait_for_void(acquirer: str, order_id: str, process: subprocess.Popen[str]) -> None:
    """Until the acquirer has committed the void (its answer is stalled)."""
    deadline = time.monotonic() + DEADLINE
    while not voids(acquirer, order_id):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the void never reached the acquirer"
        time.sleep(0.05)  # polling a condition with a deadline


def environment(payments_url: str, acquirer: str, lease: float = 2) -> dict[str, str]:
    return {
        "ONCEPAY_DATABASE_URL": payments_url,
        "ONCEPAY_ACQUIRER_URL": acquirer,
        "ONCEPAY_LEASE": str(lease),  # a dead run's key frees itself this much later
        "ONCEPAY_ACQUIRER_TIMEOUT": str(STALL + 30),  # the void waits out the stall
        "ONCEPAY_ACQUIRER_ATTEMPTS": "1",
    }


def orphan_document(result: subprocess.CompletedProcess[str], order_id: str) -> None:
    """One orphan, planted under ``order_id``: no payment of OncePay's, so its payment_id is
    null and the acquirer's order id is in the detail."""
    found = json.loads(result.stdout)["discrepancies"]
    assert [(d["kind"], d["payment_id"]) for d in found] == [("orphaned_authorization", None)]
    assert f"its order id: {order_id}" in found[0]["detail"]


def test_a_run_killed_mid_void_is_resumed_and_voids_once(payments_url: str, tmp_path: Path) -> None:
    with running_acquirer(f"sqlite:///{tmp_path / 'acquirer.db'}") as acquirer:
        env = environment(payments_url, acquirer)
        assert cli("merchants", "create", "Shop", env=env).returncode == 0
        plant_orphan(acquirer, "pay_lost")
        stall_voids(acquirer)
        first = reconcile_process(env)
        try:
            wait_for_void(acquirer, "pay_lost", first)
            os.kill(first.pid, signal.SIGKILL)  # the void committed, its answer never came
        finally:
            first.communicate(timeout=30)
        httpx.put(f"{acquirer}/admin/faults", json={}).raise_for_status()
        deadline = time.monotonic() + DEADLINE
        while True:
            again = cli("reconcile", "--grace-days", "0", "--json", env=env)
            assert again.returncode in (0, 1), again.stderr
            if again.returncode == 0:  # the void resumed and recorded: the orphan resolved
                break
            assert time.monotonic() < deadline, again.stdout
            time.sleep(0.25)  # the dead run's lease (2 s) has not lapsed yet
        orphan_document(again, "pay_lost")
        assert len(voids(acquirer, "pay_lost")) == 1
        last = cli("reconcile", "--grace-days", "0", "--json", env=env)
        assert last.returncode == 0, last.stdout
        assert len(voids(acquirer, "pay_lost")) == 1
        assert cli("ledger", "check", env=env).returncode == 0


def test_two_runs_at_once_void_once(payments_url: str, tmp_path: Path) -> None:
    with running_acquirer(f"sqlite:///{tmp_path / 'acquirer.db'}") as acquirer:
        env = environment(payments_url, acquirer, lease=STALL + 30)  # a live run keeps its key
        assert cli("merchants", "create", "Shop", env=env).returncode == 0
        plant_orphan(acquirer, "pay_race")
        stall_voids(acquirer)
        first = reconcile_process(env)
        try:
            wait_for_void(acquirer, "pay_race", first)
            # the first run holds the void's key while its answer is stalled
            second = cli("reconcile", "--grace-days", "0", "--json", env=env)
            # in progress elsewhere: still open (and said so, not an error)
            assert (second.returncode, second.stderr) == (1, ""), second.stderr
            orphan_document(second, "pay_race")
            assert first.poll() is None  # the order was as forced
        finally:
            _, err = first.communicate(timeout=STALL + 60)
        assert first.returncode == 0, err
        assert len(voids(acquirer, "pay_race")) == 1
        third = cli("reconcile", "--grace-days", "0", "--json", env=env)
        assert third.returncode == 0, third.stdout
        assert len(voids(acquirer, "pay_race")) == 1
