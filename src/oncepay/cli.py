"""The ``oncepay`` command: one command, one sub-command per job."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

import typer
from rich.console import Console

from oncepay import __version__
from oncepay.errors import OncePayError
from oncepay.idempotency.stores import store_from_url

app = typer.Typer(
    name="oncepay",
    help="Exactly-once payments: idempotency toolkit and payments service.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

StoreUrl = Annotated[
    str,
    typer.Option("--store", envvar="ONCEPAY_STORE_URL", help="Idempotency store URL."),
]


@app.command()
def version() -> None:
    """Print the OncePay version."""
    print(__version__)


@app.command()
def purge(
    store: StoreUrl = "sqlite:///oncepay.db",
    batch: Annotated[int, typer.Option(min=1, help="Records removed per statement.")] = 1000,
) -> None:
    """Remove expired idempotency records in bounded batches (SQL stores; Redis expires
    records itself)."""
    try:
        total = asyncio.run(_purge(store, batch))
    except OncePayError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    console.print(f"purged {total} expired records")


async def _purge(url: str, batch: int) -> int:
    store = store_from_url(url)
    total = 0
    try:
        while (removed := await store.purge_expired(now=time.time(), limit=batch)) > 0:
            total += removed
            if removed < batch:
                break
    finally:
        await store.aclose()
    return total


def main() -> None:
    app()
