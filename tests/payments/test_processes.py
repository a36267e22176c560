"""The service as real processes: ``oncepay serve`` on a fresh folder, the CLI, a ``kill -9``
of an API process mid-payment finished by ``oncepay worker``, and two API processes on one
PostgreSQL sharing the refunds of one payment."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.payments.stack import drop_schema
from tests.processes import (
    PYTHONPATH,
    ROOT,
    free_port,
    oncepay_args,
    read_banner,
    running,
    wait_for_port,
)
from tests.servers import POSTGRES_URL, require_postgres

pytestmark = pytest.mark.slow

PAYMENT = {"amount": 1200, "currency": "USD", "payment_method": "pm_card_ok"}
# Starting a Python process that imports FastAPI and SQLAlchemy takes one to three seconds
# here; thirty leaves room for a loaded CI machine.
START = 30.0


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 120) -> Any:  # fmt: skip
    return subprocess.run(
        oncepay_args(*args),
        cwd=cwd or ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_serve_on_a_fresh_folder_prints_a_working_key(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        oncepay_args("serve", "--port", str(port)),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, process, START)  # type: ignore[arg-type]
        _, key = read_banner(process)
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "first"}
        url = f"http://127.0.0.1:{port}/v1/payments"
        first = httpx.post(url, json=PAYMENT, headers=headers)
        again = httpx.post(url, json=PAYMENT, headers=headers)
        assert first.status_code == 201, first.text
        assert first.json()["status"] == "captured"
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    finally:
        process.terminate()
        process.wait(15)
        if process.stdout is not None:
            process.stdout.close()
    assert (tmp_path / "oncepay.db").exists()
    assert (tmp_path / "oncepay-acquirer.db").exists()


def test_merchants_create_and_ledger_check(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    created = cli("merchants", "create", "Corner shop", "--database-url", url)
    assert created.returncode == 0, created.stderr
    merchant = json.loads(created.stdout)
    assert merchant["id"].startswith("mer_")
    assert merchant["api_key"].startswith("sk_test_")
    with sqlite3.connect(tmp_path / "p.db") as conn:
        stored = [row[0] for row in conn.execute("SELECT key_hash FROM api_keys")]
    assert merchant["api_key"] not in stored  # hashed, never kept as given
    clean = cli("ledger", "check", "--database-url", url)
    assert clean.returncode == 0, clean.stderr
    assert "no violations" in clean.stderr
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute(
            "INSERT INTO payments (id, merchant_id, amount, currency, payment_method, "
            "capture_method, metadata, status, amount_captured, amount_refunded, acquirer, "
            "attempt, outcome_unknown, recovery_attempts, escalated, created_at, updated_at) "
            "VALUES ('pay_000000000000000000000000', ?, 500, 'USD', 'pm_card_ok', 'automatic', "
            "'{}', 'captured', 500, 0, 'primary', 1, 0, 0, 0, 0, 0)",
            (merchant["id"],),
        )
    broken = cli("ledger", "check", "--database-url", url)
    assert broken.returncode == 1
    assert "merchant_payable 0, expected 500" in broken.stderr


def test_ledger_entries_cannot_be_changed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    assert cli("merchants", "create", "Shop", "--database-url", url).returncode == 0
    with sqlite3.connect(tmp_path / "p.db") as conn:
        conn.execute(
            "INSERT INTO ledger_transactions (id, merchant_id, payment_id, kind, created_at) "
            "VALUES ('txn_1', 'm', 'p', 'test', 0)"
        )
        conn.execute(
            "INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, "
            "currency, amount) VALUES ('txn_1', 'm', 'p', 'merchant_payable', 'USD', 5)"
        )
    for statement in ("UPDATE ledger_entries SET amount = 6", "DELETE FROM ledger_entries"):
        with sqlite3.connect(tmp_path / "p.db") as conn, pytest.raises(sqlite3.IntegrityError):
            conn.execute(statement)


def test_bad_database_url_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("ledger", "check", "--database-url", "mysql://nope")
    assert result.returncode == 2
    assert "unsupported database URL" in result.stderr


def _operations(acquirer: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = httpx.get(f"{acquirer}/admin/operations").json()["operations"]
    return found


def test_kill_9_mid_payment_then_worker_finishes(tmp_path: Path) -> None:
    """The API process dies while the acquirer holds a committed authorization whose answer has
    not arrived; the worker, after the lease lapses, asks the acquirer first and finishes."""
    db = f"sqlite:///{tmp_path / 'p.db'}"
    acquirer_port, api_port = free_port(), free_port()
    acquirer = f"http://127.0.0.1:{acquirer_port}"
    merchant = json.loads(cli("merchants", "create", "Shop", "--database-url", db).stdout)
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_URL": acquirer,
        "ONCEPAY_LEASE": "2",  # the dead request's key frees itself two seconds later
        "ONCEPAY_ACQUIRER_TIMEOUT": "20",  # the API waits for the stalled answer...
        "ONCEPAY_RUN_WORKER": "false",
    }
    acquirer_args = oncepay_args(
        "acquirer", "--port", str(acquirer_port), "--database-url",
        f"sqlite:///{tmp_path / 'a.db'}", "--timeout-after-commit-rate", "1",
        "--stall-seconds", "60",
    )  # fmt: skip
    headers = {"Authorization": f"Bearer {merchant['api_key']}", "Idempotency-Key": "k9"}
    with running(acquirer_args, acquirer_port):
        api_args = oncepay_args("serve", "--port", str(api_port))
        with running(api_args, api_port, env) as api:
            url = f"http://127.0.0.1:{api_port}/v1/payments"
            with httpx.Client(timeout=60) as client:
                pending = _in_thread(lambda: client.post(url, json=PAYMENT, headers=headers))
                deadline = time.monotonic() + START
                while not _operations(acquirer):  # ...until the acquirer has committed
                    assert time.monotonic() < deadline, "the authorization never arrived"
                    time.sleep(0.05)
                os.kill(api.pid, signal.SIGKILL)  # ...and then dies
                with pytest.raises(httpx.TransportError):
                    pending.result(timeout=30)
        httpx.put(f"{acquirer}/admin/faults", json={}).raise_for_status()
        deadline = time.monotonic() + START
        while True:
            finished = cli("worker", "--once", env=env)
            assert finished.returncode == 0, finished.stderr
            if "'finished': 1" in finished.stderr:
                break
            assert time.monotonic() < deadline, finished.stderr
            time.sleep(0.25)  # the lease (2 s) has not lapsed yet: ask again shortly
        with running(api_args, api_port, env):
            replay = httpx.post(
                f"http://127.0.0.1:{api_port}/v1/payments", json=PAYMENT, headers=headers
            )
        authorizations = [op for op in _operations(acquirer) if op["type"] == "authorization"]
    assert replay.status_code == 201, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["status"] == "captured"
    assert len(authorizations) == 1
    assert cli("ledger", "check", env=env).returncode == 0


def _in_thread(call: Any) -> Any:
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(1)
    future = executor.submit(call)
    executor.shutdown(wait=False)
    return future


@pytest.mark.postgres
def test_two_api_processes_share_one_payment_safely(tmp_path: Path) -> None:
    require_postgres()
    db = f"{POSTGRES_URL}?schema=oncepay_proc_{uuid.uuid4().hex[:8]}"
    acquirer_port, api_port = free_port(), free_port()
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_URL": f"http://127.0.0.1:{acquirer_port}",
        "ONCEPAY_WORKERS": "2",
    }
    try:
        merchant = json.loads(cli("merchants", "create", "Shop", env=env).stdout)
        acquirer_args = oncepay_args(
            "acquirer",
            "--port",
            str(acquirer_port),
            "--database-url",
            f"sqlite:///{tmp_path / 'a.db'}",
        )
        with (
            running(acquirer_args, acquirer_port),
            running(oncepay_args("serve", "--port", str(api_port)), api_port, env),
        ):
            results = asyncio.run(_refund_storm(api_port, merchant["api_key"]))
        assert results["refunded"] == 600
        assert results["created"] == 6
        assert cli("ledger", "check", env=env).returncode == 0
    finally:
        asyncio.run(drop_schema(db))


async def _refund_storm(port: int, api_key: str) -> dict[str, Any]:
    auth = {"Authorization": f"Bearer {api_key}"}
    base = f"http://127.0.0.1:{port}"
    # A fresh connection per request, so the kernel spreads them over both processes.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, headers=auth, limits=limits) as client:
        payment = await client.post("/v1/payments", json={**PAYMENT, "amount": 600},
                                    headers={"Idempotency-Key": "p"})  # fmt: skip
        pid = payment.json()["id"]

        async def refund(i: int) -> httpx.Response:
            # A transient 409 (the key's first attempt, the worker or another refund still
            # holds it) is retried with the same key, as the OncePay client does, until a final
            # answer. The deadline only guards against a hang: sixteen refunds queue on one
            # payment, and a fresh-clone CI run needed more than the 5 s this loop once allowed.
            deadline = time.monotonic() + 120
            while True:
                answer = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 100},
                                           headers={"Idempotency-Key": f"r{i}"})  # fmt: skip
                if answer.status_code != 409 or time.monotonic() > deadline:
                    return answer
                if answer.json().get("code") == "invalid_state_transition":
                    return answer  # final, and stored under the key (SPEC §5's state table)
                await asyncio.sleep(0.1)

        responses = await asyncio.gather(*(refund(i) for i in range(16)))
        final = (await client.get(f"/v1/payments/{pid}")).json()
    # A refund the payment has no money left for is refused: 400 while other refunds are still
    # in flight (the money is reserved), 409 invalid_state_transition once the payment is
    # `refunded` (no transition out of it). Which one depends on when the request came, not on
    # which process took it.
    refused = {(r.status_code, r.json()["code"]) for r in responses if r.status_code != 201}
    assert refused <= {(400, "amount_too_large"), (409, "invalid_state_transition")}, [
        r.text for r in responses
    ]
    return {
        "created": sum(r.status_code == 201 for r in responses),
        "refunded": final["amount_refunded"],
    }


@pytest.mark.postgres
def test_metrics_of_two_api_processes_are_summed(tmp_path: Path) -> None:
    """Behind one port a scrape reaches either process: each one must answer for both."""
    require_postgres()
    db = f"{POSTGRES_URL}?schema=oncepay_proc_{uuid.uuid4().hex[:8]}"
    api_port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_WORKERS": "2",
        "ONCEPAY_RUN_WORKER": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    try:
        with running(oncepay_args("serve", "--port", str(api_port)), api_port, env):
            sent, scrapes = asyncio.run(_health_then_scrapes(api_port, metrics_dir, scrapes=8))
        per_process = _per_process(metrics_dir)
        assert len([n for n in per_process if n]) == 2, per_process  # both served requests...
        assert sum(per_process) == sent
        assert scrapes == [sent] * 8  # ...and every scrape, whichever took it, counts them all
    finally:
        asyncio.run(drop_schema(db))


def _health_count(counter_file: Path) -> int:
    """The /health requests one process counted: its file alone, read as prometheus does."""
    import shutil
    import tempfile

    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    with tempfile.TemporaryDirectory() as alone:
        shutil.copy(counter_file, Path(alone) / counter_file.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=alone)  # type: ignore[no-untyped-call]
        value = registry.get_sample_value(
            "oncepay_http_requests_total", {"route": "/health", "method": "GET", "status": "200"}
        )
    return int(value or 0)


def _per_process(metrics_dir: Path) -> list[int]:
    return [_health_count(f) for f in metrics_dir.glob("counter_*.db")]


async def _health_then_scrapes(
    port: int, metrics_dir: Path, *, scrapes: int
) -> tuple[int, list[int]]:
    """Requests until both processes have served some (the second may still be starting when
    the port first answers), then ``scrapes`` scrapes: (requests sent, each scrape's count)."""
    # A fresh connection per request, so the kernel spreads them over both processes.
    limits = httpx.Limits(max_keepalive_connections=0)
    sent = 0
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:
        while True:
            answers = await asyncio.gather(*(client.get("/health") for _ in range(20)))
            assert {a.status_code for a in answers} == {200}
            sent += len(answers)
            counts = await asyncio.to_thread(_per_process, metrics_dir)
            if len([n for n in counts if n]) >= 2:
                break
            assert sent < 5000, f"one process served all {sent} requests: {counts}"
        pattern = re.compile(
            r'^oncepay_http_requests_total\{method="GET",route="/health",status="200"\} (\S+)$',
            re.MULTILINE,
        )
        counted = []
        for _ in range(scrapes):
            text = (await client.get("/metrics")).text
            match = pattern.search(text)
            assert match, text
            counted.append(int(float(match.group(1))))
    return sent, counted
