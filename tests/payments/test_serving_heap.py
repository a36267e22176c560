"""``oncepay serve`` keeps the garbage collector off what start-up left alive (``gc.freeze``)
and makes its young collections rarer; an app built with ``create_app`` leaves the collector
as it was (api/app.py, ``serving_app``). Each case runs in a child process, so this process's
collector stays as pytest set it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from oncepay._heap import YOUNG_COLLECTIONS
from oncepay.cli import app as cli

SCRIPT = """
import asyncio, gc, json, sys
import httpx
from oncepay.payments.api.app import create_app, serving_app
from oncepay.payments.merchants import issue_test_key
from oncepay.payments.settings import Settings
from oncepay.payments.storage.migrations import migrated

async def main():
    async with migrated(sys.argv[1]) as db:
        _, key = await issue_test_key(db)
    before = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}
    app = serving_app() if sys.argv[2] == "serving" else create_app(Settings())
    async with app.router.lifespan_context(app):
        started = {"frozen": gc.get_freeze_count(), "threshold": gc.get_threshold()}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": "Bearer " + key, "Idempotency-Key": "k"}
            body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
            answer = await client.post("/v1/payments", json=body, headers=headers)
            assert answer.status_code == 201, answer.text
    print(json.dumps({"before": before, "started": started}))

asyncio.run(main())
"""


def _run(tmp_path: Path, factory: str) -> dict[str, Any]:
    url = f"sqlite:///{tmp_path}/p.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ONCEPAY_", "OTEL_"))}
    env |= {
        "ONCEPAY_DATABASE_URL": url,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{tmp_path}/a.db",
        "ONCEPAY_RUN_WORKER": "false",
        "ONCEPAY_ACCESS_LOG": "false",
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, url, factory],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_serving_app_freezes_what_start_up_left_and_collects_young_objects_less_often(
    tmp_path: Path,
) -> None:
    seen = _run(tmp_path, "serving")
    assert seen["before"]["frozen"] == 0
    # The modules, the app and the services: many thousands of objects, out of every collection.
    assert seen["started"]["frozen"] > 10_000
    assert seen["started"]["threshold"][0] == YOUNG_COLLECTIONS
    assert seen["started"]["threshold"][1:] == seen["before"]["threshold"][1:]


def test_an_app_from_create_app_leaves_the_collector_as_it_was(tmp_path: Path) -> None:
    seen = _run(tmp_path, "plain")
    assert seen["started"] == seen["before"]


def test_oncepay_serve_runs_the_serving_factory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: ran.append((args, kwargs)))
    for name in list(os.environ):
        if name.startswith("ONCEPAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    # serve exports its settings as ONCEPAY_* for uvicorn's worker processes: undone after.
    saved = dict(os.environ)
    try:
        result = CliRunner().invoke(
            cli, ["serve", "--database-url", f"sqlite:///{tmp_path}/p.db", "--port", "8999"]
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert result.exit_code == 0, result.output
    [(args, kwargs)] = ran
    assert args == ("oncepay.payments.api.app:serving_app",)
    assert kwargs["factory"] is True


RECONCILING = """
import gc, json, sys
from oncepay import _heap
from oncepay.reconciliation import pipeline

if sys.argv[1] == "settled":
    _heap.settle()
before = gc.get_freeze_count()
with pipeline._long_lived():  # a reconciliation run: its books frozen, then everything handed back
    during = gc.get_freeze_count()
print(json.dumps({"before": before, "during": during, "after": gc.get_freeze_count(),
                  "threshold": gc.get_threshold()[0]}))
"""


@pytest.mark.parametrize("settled", [True, False], ids=["served", "not-served"])
def test_a_reconciliation_run_leaves_a_served_process_settled(settled: bool) -> None:
    """A run unfreezes every frozen object when it ends (``gc.unfreeze``): the serving
    process's start-up objects are frozen again then, and only in a serving process."""
    done = subprocess.run(
        [sys.executable, "-c", RECONCILING, "settled" if settled else "plain"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["during"] >= seen["before"]
    if settled:
        assert seen["before"] > 10_000
        assert seen["after"] > 10_000
        assert seen["threshold"] == YOUNG_COLLECTIONS
    else:
        assert (seen["before"], seen["after"]) == (0, 0)
        assert seen["threshold"] == 700
