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
def serve() -> None:
    """Run the payments service (arrives with the payments issue)."""
    console.print(
        "[yellow]The payments service is not built yet.[/yellow] Use the toolkit today: "
        "`oncepay gateway --upstream URL`, or the middleware (docs/middleware.md)."
    )
    raise typer.Exit(1)


@app.command()
def purge(
    store: StoreUrl = "sqlite:///oncepay.db",
    batch: Annotated[int, typer.Option(min=1, help="Records removed per statement.")] = 1000,
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
    total = 0
    try:
        while (removed := await store.purge_expired(now=time.time(), limit=batch)) > 0:
            total += removed
            if removed < batch:
                break
    finally:
        await store.aclose()
    return total


@app.command()
def gateway(
    upstream: Annotated[
        str, typer.Option(envvar="ONCEPAY_UPSTREAM", help="Base URL of the service behind.")
    ],
    store: StoreUrl = "sqlite:///oncepay-gateway.db",
    host: Annotated[str, typer.Option(envvar="ONCEPAY_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ONCEPAY_PORT", min=1, max=65535)] = 8000,
    workers: Annotated[int, typer.Option(envvar="ONCEPAY_WORKERS", min=1)] = 1,
    timeout: Annotated[
        float, typer.Option(envvar="ONCEPAY_UPSTREAM_TIMEOUT", min=0.1, help="Upstream timeout, s.")
    ] = 30.0,
    optional_key: Annotated[
        bool, typer.Option("--optional-key", help="Pass requests without a key through.")
    ] = False,
    wait: Annotated[
        float, typer.Option(envvar="ONCEPAY_WAIT", min=0, help="Hold duplicates up to N s.")
    ] = 0.0,
) -> None:
    """Run the idempotency gateway: a reverse proxy that makes UPSTREAM idempotent."""
    import os
    from urllib.parse import urlsplit

    import uvicorn

    if urlsplit(upstream).scheme not in {"http", "https"} or not urlsplit(upstream).netloc:
        console.print(f"[red]error:[/red] --upstream must be an http(s) URL, not {upstream!r}")
        raise typer.Exit(2)
    store_from_url(store)  # fail fast on a bad URL, before any worker starts
    os.environ.update(
        ONCEPAY_UPSTREAM=upstream,
        ONCEPAY_STORE_URL=store,
        ONCEPAY_UPSTREAM_TIMEOUT=str(timeout),
        ONCEPAY_KEY_REQUIRED="false" if optional_key else "true",
        ONCEPAY_WAIT=str(wait),
    )
    uvicorn.run(
        "oncepay.http.gateway:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
    )


def main() -> None:
    app()
