"""``oncepay purge``: expired records out of a store, a batch at a time, by the one function the
payments worker's reaper uses too (``oncepay.idempotency.purge.purge_expired``)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from typer.testing import CliRunner

from oncepay.cli import app
from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.stores.sqlite import SQLiteStore

DONE = StoredResponse(201, (), b"{}")


async def _fill(url: str, *, expired: int, live: int) -> None:
    store = SQLiteStore.from_url(url)
    now = time.time()
    try:
        for n in range(expired + live):
            # The expired ones were made long ago with a one-second TTL.
            at, ttl = (0.0, 1.0) if n < expired else (now, 3600.0)
            claim = await store.claim("s", f"k{n}", "fp", now=at, lease=1.0, ttl=ttl)
            await store.complete("s", f"k{n}", claim.record.fence, DONE, now=at)
    finally:
        await store.aclose()


async def _keys(url: str) -> list[str]:
    store = SQLiteStore.from_url(url)
    try:
        return [key for key in ("k0", "k1", "k2", "k3") if await store.get("s", key)]
    finally:
        await store.aclose()


def test_purge_removes_the_expired_records_in_batches_and_keeps_the_live(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'keys.db'}"
    asyncio.run(_fill(url, expired=3, live=1))

    result = CliRunner().invoke(app, ["purge", "--store", url, "--batch", "2"])

    assert result.exit_code == 0, result.output
    assert "purged 3 expired records" in result.output
    assert asyncio.run(_keys(url)) == ["k3"]
