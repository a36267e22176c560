"""Review of a new payment's phases at once as real processes: ``oncepay serve`` on PostgreSQL
killed (``kill -9``) while its phase 1 statement waits on the idempotency key's unique index
(another transaction's uncommitted insert of the same key), then the key retried on a new
process. The orphaned statement runs on after its client died: when the wait ends it commits
phase 1 (the other insert rolled back) or inserts nothing (it committed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.payments.stack import drop_schema
from tests.payments.test_processes import PAYMENT, START, _operations, cli
from tests.processes import free_port, oncepay_args, running
from tests.servers import POSTGRES_URL, require_postgres

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

_PHASE_1 = "query LIKE 'WITH k AS (INSERT INTO%' AND query LIKE '%' || $1 || '%'"
_WAITING = f"SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND {_PHASE_1}"
# Not waiting is not enough: the statement then inserts and commits, which the test must see
# done before it reads what was left (CI read the payments between the two, once).
_RUNNING = f"SELECT pid FROM pg_stat_activity WHERE state = 'active' AND {_PHASE_1}"


async def _waiting(conn: asyncpg.Connection, schema: str, *, running: bool = False) -> bool:
    await conn.execute("SELECT pg_stat_clear_snapshot()")  # else read once per transaction
    return bool(await conn.fetch(_RUNNING if running else _WAITING, schema))


async def _until(conn: asyncpg.Connection, schema: str, *, waiting: bool) -> None:
    """Until phase 1's statement waits for the key (``waiting``), or has ended."""
    deadline = time.monotonic() + START
    while await _waiting(conn, schema, running=not waiting) is not waiting:
        assert time.monotonic() < deadline, (
            f"phase 1's wait never {'began' if waiting else 'ended'}"
        )
        await asyncio.sleep(0.02)  # polling a condition with a deadline


@pytest.mark.parametrize("other", ["rolled-back", "committed"])
def test_kill_9_while_phase_1s_statement_waits_then_retry(tmp_path: Path, other: str) -> None:
    require_postgres()
    schema = f"oncepay_rev_{uuid.uuid4().hex[:8]}"
    db = f"{POSTGRES_URL}?schema={schema}"
    acquirer_port, api_port = free_port(), free_port()
    acquirer = f"http://127.0.0.1:{acquirer_port}"
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_URL": acquirer,
        "ONCEPAY_LEASE": "2",
        "ONCEPAY_RUN_WORKER": "false",
    }
    try:
        merchant = json.loads(cli("merchants", "create", "Shop", env=env).stdout)
        headers = {"Authorization": f"Bearer {merchant['api_key']}", "Idempotency-Key": "k9"}
        acquirer_args = oncepay_args(
            "acquirer", "--port", str(acquirer_port),
            "--database-url", f"sqlite:///{tmp_path / 'a.db'}",
        )  # fmt: skip
        api_args = oncepay_args("serve", "--port", str(api_port))
        url = f"http://127.0.0.1:{api_port}/v1/payments"

        async def scenario() -> dict[str, Any]:
            holder = await asyncpg.connect(POSTGRES_URL, server_settings={"search_path": schema})
            try:
                with running(api_args, api_port, env) as api:
                    await holder.execute("BEGIN")
                    await holder.execute(
                        "INSERT INTO oncepay_idempotency (scope, idempotency_key, fingerprint, "
                        "state, fence, created_at, lease_expires_at, expires_at) "
                        "VALUES ($1, 'k9', 'other', 'executing', 1, 1, 1, 9999999999)",
                        merchant["id"],
                    )
                    pending = asyncio.create_task(
                        asyncio.to_thread(
                            httpx.post, url, json=PAYMENT, headers=headers, timeout=60
                        )
                    )
                    await _until(holder, schema, waiting=True)
                    os.kill(api.pid, signal.SIGKILL)
                    with pytest.raises(httpx.TransportError):
                        await pending
                if other == "rolled-back":
                    await holder.execute("ROLLBACK")
                else:
                    await holder.execute(
                        "UPDATE oncepay_idempotency SET state = 'released' "
                        "WHERE idempotency_key = 'k9'"
                    )
                    await holder.execute("COMMIT")
                await _until(holder, schema, waiting=False)
                orphaned = [tuple(r) for r in await holder.fetch("SELECT status FROM payments")]
                with running(api_args, api_port, env):
                    deadline = time.monotonic() + START
                    while True:
                        retry = await asyncio.to_thread(
                            httpx.post, url, json=PAYMENT, headers=headers, timeout=30
                        )
                        if retry.status_code != 409:
                            break
                        assert time.monotonic() < deadline, retry.text
                        await asyncio.sleep(0.25)  # the orphan's lease (2 s) has not lapsed
                payments = [tuple(r) for r in await holder.fetch("SELECT id, status FROM payments")]
                return {"orphaned": orphaned, "retry": retry, "payments": payments}
            finally:
                await holder.close()

        with running(acquirer_args, acquirer_port):
            found = asyncio.run(scenario())
            authorizations = [op for op in _operations(acquirer) if op["type"] == "authorization"]
        retry = found["retry"]
        assert retry.status_code == 201, retry.text
        assert retry.json()["status"] == "captured"
        assert found["payments"] == [(retry.json()["id"], "captured")]
        # rolled back: the dead process's statement committed phase 1, the retry resumed it
        assert found["orphaned"] == ([("processing",)] if other == "rolled-back" else [])
        assert len(authorizations) == 1
        assert cli("ledger", "check", env=env).returncode == 0
    finally:
        asyncio.run(drop_schema(db))
