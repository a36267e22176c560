"""``oncepay purge``: expired idempotency records out of any store (the worker's reaper does
the same for the payments service, by the same function)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer

from oncepay.cli._common import StoreUrl, console
from oncepay.errors import OncePayError
from oncepay.idempotency.purge import purge_expired
from oncepay.idempotency.stores import store_from_url

__all__ = ["purge"]


def purge(
    store: StoreUrl = "sqlite:///oncepay.db",
    batch: Annotated[
        int, typer.Option(envvar="ONCEPAY_BATCH", min=1, help="Records removed per statement.")
    ] = 1000,
) -> None:
    """Remove expired idempotency records in bounded batches (Redis expires its own)."""
    try:
        total = asyncio.run(_purge(store, batch))
    except OncePayError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    console.print(f"purged {total} expired records")


async def _purge(url: str, batch: int) -> int:
    store = store_from_url(url)
    try:
        return await purge_expired(store, now=time.time(), batch=batch)
    finally:
        await store.aclose()
