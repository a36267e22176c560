"""The ``oncepay`` command: one command, one sub-command per job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

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


DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="sqlite:///path.db or postgresql://… [env ONCEPAY_DATABASE_URL; "
        "default sqlite:///oncepay.db]",
        show_default=False,
    ),
]


def _settings(**overrides: Any) -> Any:
    """Settings from ONCEPAY_* variables, with the options actually given on top."""
    from pydantic import ValidationError

    from oncepay.payments.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="[env ONCEPAY_HOST; default 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="[env ONCEPAY_PORT; default 8000]")] = None,
    database_url: DatabaseUrl = None,
    acquirer_url: Annotated[
        str | None,
        typer.Option(
            help="Primary acquirer; none: the simulated one, embedded. [env ONCEPAY_ACQUIRER_URL]"
        ),
    ] = None,
    secondary_acquirer_url: Annotated[
        str | None, typer.Option(help="Failover acquirer. [env ONCEPAY_SECONDARY_ACQUIRER_URL]")
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(help="Redis fast tier in front of the SQL keys. [env ONCEPAY_REDIS_URL]"),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="API processes (use PostgreSQL for more than one).")
    ] = None,
    worker: Annotated[
        bool | None,
        typer.Option("--worker/--no-worker", help="Run recovery in the API process too."),
    ] = None,
) -> None:
    """Run the payments service: the API, with recovery, on SQLite unless told otherwise."""
    import uvicorn

    settings = _settings(
        host=host, port=port, database_url=database_url, acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url, workers=workers, run_worker=worker,
        redis_url=redis_url,
    )  # fmt: skip
    banner = _run_or_exit(_prepare(settings))
    console.print(banner, soft_wrap=True)
    os.environ.update(
        {f"ONCEPAY_{k.upper()}": _env(v) for k, v in settings.model_dump().items() if v is not None}
    )
    with shared_metrics(settings.workers):
        uvicorn.run(
            "oncepay.payments.api.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level="warning",
        )


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[str | None]:
    """With several API processes, one ``PROMETHEUS_MULTIPROC_DIR`` for all of them (made for
    this run, removed after it) so that ``/metrics`` answers for the service, not for whichever
    process took the scrape. One given by the environment is used as it is, and kept."""
    if workers < 2 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        yield os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        return
    directory = tempfile.mkdtemp(prefix="oncepay-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    try:
        yield directory
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        shutil.rmtree(directory, ignore_errors=True)


def _env(value: object) -> str:
    import json

    return json.dumps(value) if isinstance(value, list | dict) else str(value)


async def _prepare(settings: Any) -> str:
    """Migrate, and in test mode (the embedded acquirer) hand out a fresh test API key."""
    from oncepay.payments.merchants import add_api_key, create_merchant, find_merchant
    from oncepay.payments.storage.db import Database
    from oncepay.payments.storage.migrations import migrate

    db = Database.from_url(settings.database_url)
    try:
        await migrate(db)
        url = f"http://{settings.host}:{settings.port}"
        lines = [f"[bold]OncePay payments API[/bold] on {url} (database {settings.database_url})"]
        if settings.embedded_acquirer:
            merchant = await find_merchant(db, TEST_MERCHANT)
            if merchant is None:
                merchant, api_key = await create_merchant(db, TEST_MERCHANT)
            else:
                api_key = await add_api_key(db, merchant.id)
            lines += [
                "acquirer: the simulated one, embedded "
                f"(database {settings.acquirer_database_url})",
                f"test API key for {merchant.name} ({merchant.id}):",
                f"  [green]{api_key}[/green]",
                f"try: curl {url}/v1/payments -H 'Authorization: Bearer {api_key}' "
                "-H 'Idempotency-Key: first-payment' -H 'Content-Type: application/json' "
                '-d \'{"amount": 1000, "currency": "USD", '
                '"payment_method": "pm_card_ok"}\'',
            ]
        return "\n".join(lines)
    finally:
        await db.aclose()


TEST_MERCHANT = "Test merchant"

merchants_app = typer.Typer(help="Merchants and their API keys.", no_args_is_help=True)
app.add_typer(merchants_app, name="merchants")


@merchants_app.command("create")
def merchants_create(name: str, database_url: DatabaseUrl = None) -> None:
    """Create a merchant; prints JSON with its id and API key (shown once, stored hashed)."""
    import json

    if not name.strip():
        console.print("[red]error:[/red] a merchant needs a name")
        raise typer.Exit(2)

    from oncepay.payments.merchants import create_merchant
    from oncepay.payments.storage.db import Database
    from oncepay.payments.storage.migrations import migrate

    settings = _settings(database_url=database_url)

    async def create() -> tuple[Any, str]:
        db = Database.from_url(settings.database_url)
        try:
            await migrate(db)
            return await create_merchant(db, name)
        finally:
            await db.aclose()

    merchant, api_key = _run_or_exit(create())
    print(json.dumps({"id": merchant.id, "name": merchant.name, "api_key": api_key}))


@app.command()
def worker(
    database_url: DatabaseUrl = None,
    acquirer_url: Annotated[str | None, typer.Option(help="[env ONCEPAY_ACQUIRER_URL]")] = None,
    secondary_acquirer_url: Annotated[str | None, typer.Option()] = None,
    redis_url: Annotated[str | None, typer.Option(help="[env ONCEPAY_REDIS_URL]")] = None,
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """Run the worker: finish abandoned requests, resolve unknown outcomes, deliver webhooks,
    purge expired keys."""
    settings = _settings(
        database_url=database_url,
        acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url,
        redis_url=redis_url,
    )
    _run_or_exit(_worker(settings, once=once))


async def _worker(settings: Any, *, once: bool) -> None:
    import signal

    from oncepay.payments import bootstrap
    from oncepay.payments.recovery import reap, recover_once, run_worker

    services = await bootstrap.start(settings)
    try:
        if once:
            report = await recover_once(services)
            purged = await reap(services)
            console.print(f"recovered: {dict(report.results)}; purged {purged} expired keys")
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        console.print("[bold]OncePay worker[/bold] running; Ctrl-C stops it")
        await run_worker(services, stop)
    finally:
        await services.aclose()


ledger_app = typer.Typer(help="The double-entry ledger.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")


@ledger_app.command("check")
def ledger_check(database_url: DatabaseUrl = None) -> None:
    """Verify the ledger's invariants and every payment against it; exit 1 on a violation."""
    from oncepay.payments.ledger import Violation, check
    from oncepay.payments.storage.db import Database, read

    settings = _settings(database_url=database_url)

    async def run() -> tuple[list[Violation], int]:
        from sqlalchemy import func, select

        from oncepay.payments.storage.migrations import migrate
        from oncepay.payments.storage.schema import payments

        db = Database.from_url(settings.database_url)
        try:
            await migrate(db)
            async with read(db) as conn:
                count = (await conn.execute(select(func.count()).select_from(payments))).scalar()
                return await check(conn), int(count or 0)
        finally:
            await db.aclose()

    violations, count = _run_or_exit(run())
    for violation in violations:
        console.print(
            f"[red]violation[/red] {violation.subject}: {violation.problem}", soft_wrap=True
        )
    if violations:
        console.print(f"[red]{len(violations)} violations[/red] over {count} payments")
        raise typer.Exit(1)
    console.print(f"[green]ledger balances[/green]: {count} payments, no violations")


def _run_or_exit(coroutine: Any) -> Any:
    """Run a command's coroutine; a bad URL or an unreachable database is one line, exit 2."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(coroutine)
    except OncePayError as exc:
        console.print(f"[red]error:[/red] {exc.detail}", soft_wrap=True)
        raise typer.Exit(2) from exc
    except (SQLAlchemyError, OSError) as exc:
        reason = getattr(exc, "orig", None) or exc
        console.print(f"[red]error:[/red] the database cannot be used: {reason}", soft_wrap=True)
        raise typer.Exit(2) from exc


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
    scope_header: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_SCOPE_HEADER",
            help="Scope keys by this header (hashed) instead of Authorization.",
        ),
    ] = None,
    scope_cookie: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_SCOPE_COOKIE",
            help="Scope keys by this cookie (hashed); --scope-header is then its fallback.",
        ),
    ] = None,
    fingerprint_secret: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_FINGERPRINT_SECRET",
            help="HMAC key for request fingerprints (prefer the env var: argv is public).",
        ),
    ] = None,
) -> None:
    """Run the idempotency gateway: a reverse proxy that makes UPSTREAM idempotent.

    Keys are scoped by a SHA-256 of Authorization, and requests without one share a single
    'anonymous' scope: behind cookie sign-in, use --scope-cookie (docs/gateway.md)."""
    from urllib.parse import urlsplit

    import uvicorn

    from oncepay.http.gateway import GatewaySettings

    if urlsplit(upstream).scheme not in {"http", "https"} or not urlsplit(upstream).netloc:
        console.print(f"[red]error:[/red] --upstream must be an http(s) URL, not {upstream!r}")
        raise typer.Exit(2)
    settings = GatewaySettings(upstream, scope_header=scope_header, scope_cookie=scope_cookie)
    try:  # fail fast on a bad URL or name, before any worker starts
        store_from_url(store)
        settings.scope()
    except OncePayError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    os.environ.update(
        ONCEPAY_UPSTREAM=upstream,
        ONCEPAY_STORE_URL=store,
        ONCEPAY_UPSTREAM_TIMEOUT=str(timeout),
        ONCEPAY_KEY_REQUIRED="false" if optional_key else "true",
        ONCEPAY_WAIT=str(wait),
        ONCEPAY_SCOPE_HEADER=scope_header or "",
        ONCEPAY_SCOPE_COOKIE=scope_cookie or "",
        ONCEPAY_FINGERPRINT_SECRET=fingerprint_secret or "",
    )
    uvicorn.run(
        "oncepay.http.gateway:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        # The gateway drops the upstream's Date and Server: these are the one of each.
        date_header=True,
        server_header=True,
    )


@app.command()
def chaos(
    payments: Annotated[int, typer.Option(min=1, help="Logical payments to make.")] = 300,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent clients.")] = 16,
    duration: Annotated[
        float | None, typer.Option(min=1, help="Run this many seconds instead of a count.")
    ] = None,
    database_url: DatabaseUrl = None,
    redis: Annotated[
        bool, typer.Option("--redis", help="Add a Redis fast tier (own server).")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of every fault and workload die.")] = 1,
    error_rate: Annotated[float, typer.Option(min=0, max=1, help="Acquirer 5xx rate.")] = 0.03,
    timeout_after_commit_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.02,
    drop_rate: Annotated[float, typer.Option(min=0, max=1, help="Acquirer drops.")] = 0.02,
    proxy_drop_rate: Annotated[
        float, typer.Option(min=0, max=1, help="Answers dropped after the server finished.")
    ] = 0.05,
    kill_interval: Annotated[float, typer.Option(min=0, help="Seconds between kill -9s.")] = 4.0,
    outage_interval: Annotated[float, typer.Option(min=0, help="Seconds between outages.")] = 10.0,
    outage_seconds: Annotated[float, typer.Option(min=0, help="How long each lasts.")] = 2.0,
    redis_interval: Annotated[
        float, typer.Option(min=0.1, help="Seconds between Redis faults.")
    ] = 5.0,
    workdir: Annotated[Path | None, typer.Option(help="Folder for databases and logs.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the whole stack as processes under faults, then audit exactly-once; exit 1 on any
    violation."""
    import json

    from oncepay.chaos.run import ChaosConfig, render, run_chaos

    config = ChaosConfig(
        payments=payments, concurrency=concurrency, duration=duration,
        database_url=database_url, redis=redis, seed=seed, error_rate=error_rate,
        timeout_after_commit_rate=timeout_after_commit_rate, drop_rate=drop_rate,
        proxy_drop_rate=proxy_drop_rate, kill_interval=kill_interval,
        outage_interval=outage_interval, outage_seconds=outage_seconds,
        redis_interval=redis_interval, workdir=workdir,
    )  # fmt: skip
    report = _run_or_exit(run_chaos(config, console))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render(report, console)
    if report.violation_count:
        raise typer.Exit(1)


def _register_acquirer() -> None:
    try:
        from oncepay.simulator.command import acquirer
    except ImportError:  # the service extra is not installed
        return
    app.command("acquirer")(acquirer)


_register_acquirer()


def main() -> None:
    app()
