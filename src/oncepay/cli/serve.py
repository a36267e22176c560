"""``oncepay serve``: the payments API (with the recovery worker inside, by default)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import typer

from oncepay._logformat import resolve, uvicorn_logging
from oncepay.cli._common import (
    LOG_FORMAT_HELP,
    DatabaseUrl,
    console,
    run_or_exit,
    settings,
    where,
)
from oncepay.cli._env import on_command_line

__all__ = ["serve", "shared_metrics"]

# uvicorn's choices. "auto" takes uvloop and httptools when they are installed (the service
# extra installs both): 12.1 ms of server CPU a payment against 15.1 ms with asyncio and h11
# (bench/e2e/cpu.py, SQLite, alternating rounds; bench/e2e/PROFILE.md).
Loop = Literal["auto", "asyncio", "uvloop"]
Http = Literal["auto", "h11", "httptools"]


def serve(
    host: Annotated[
        str | None, typer.Option(envvar="ONCEPAY_HOST", help="[default 127.0.0.1]")
    ] = None,
    port: Annotated[int | None, typer.Option(envvar="ONCEPAY_PORT", help="[default 8000]")] = None,
    database_url: DatabaseUrl = None,
    acquirer_url: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_ACQUIRER_URL",
            help="Primary acquirer; none: the simulated one, embedded.",
        ),
    ] = None,
    secondary_acquirer_url: Annotated[
        str | None,
        typer.Option(envvar="ONCEPAY_SECONDARY_ACQUIRER_URL", help="Failover acquirer."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(envvar="ONCEPAY_REDIS_URL", help="Redis fast tier in front of the SQL keys."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            envvar="ONCEPAY_WORKERS", help="API processes (use PostgreSQL for more than one)."
        ),
    ] = None,
    worker: Annotated[
        bool | None,
        typer.Option(
            "--worker/--no-worker",
            envvar=["ONCEPAY_WORKER", "ONCEPAY_RUN_WORKER"],  # the second: the setting's name
            help="Run recovery in the API process too.",
        ),
    ] = None,
    usage_log: Annotated[
        str | None,
        typer.Option(
            envvar="ONCEPAY_USAGE_LOG",
            help="Append each idempotency decision here (JSON Lines, SPEC §9).",
        ),
    ] = None,
    quiet: Annotated[
        bool | None,
        typer.Option(
            "--quiet",
            envvar="ONCEPAY_QUIET",  # unset: the setting ONCEPAY_ACCESS_LOG (its inverse)
            help="No access log line per request on the terminal.",
        ),
    ] = None,
    adaptive_ttl: Annotated[
        bool | None,
        typer.Option(
            "--adaptive-ttl/--no-adaptive-ttl",
            envvar="ONCEPAY_ADAPTIVE_TTL",
            help="Keep each merchant's keys as long as its clients retry (learned TTLs, "
            "docs/insight.md). [default off]",
        ),
    ] = None,
    adaptive_ttl_file: Annotated[
        str | None,
        typer.Option(
            metavar="FILE",
            envvar="ONCEPAY_ADAPTIVE_TTL_FILE",
            help="Learned TTLs from `oncepay insight analyze LOG --json` (implies --adaptive-ttl).",
        ),
    ] = None,
    log_format: Annotated[
        str | None,
        typer.Option(envvar="ONCEPAY_LOG_FORMAT", help=LOG_FORMAT_HELP),
    ] = None,
    loop: Annotated[
        Loop,
        typer.Option(
            envvar="ONCEPAY_LOOP",
            help="Event loop: auto is uvloop when installed (the service extra).",
        ),
    ] = "auto",
    http: Annotated[
        Http,
        typer.Option(
            envvar="ONCEPAY_HTTP",
            help="HTTP parser: auto is httptools when installed (the service extra).",
        ),
    ] = "auto",
) -> None:
    """Run the payments service: the API, with recovery, on SQLite unless told otherwise."""
    import uvicorn

    config = settings(
        host=host,
        port=port,
        database_url=database_url,
        acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url,
        workers=workers,
        run_worker=worker,
        redis_url=redis_url,
        usage_log=usage_log,
        access_log=None if quiet is None else not quiet,
        adaptive_ttl=True if _implied(adaptive_ttl_file, adaptive_ttl) else adaptive_ttl,
        adaptive_ttl_file=adaptive_ttl_file,
        log_format=log_format,
    )
    # auto decided here, once: the worker processes log where this one does.
    config = config.model_copy(update={"log_format": resolve(config.log_format)})
    banner = run_or_exit(_prepare(config))
    console.print(banner, soft_wrap=True)
    os.environ.update(
        {f"ONCEPAY_{k.upper()}": _env(v) for k, v in config.model_dump().items() if v is not None}
    )
    with shared_metrics(config.workers):
        uvicorn.run(
            "oncepay.payments.api.app:serving_app",
            factory=True,
            host=config.host,
            port=config.port,
            workers=config.workers,
            loop=loop,
            http=http,
            log_level="warning",
            log_config=uvicorn_logging(config.log_format, access=config.access_log),
        )


def _implied(adaptive_ttl_file: str | None, adaptive_ttl: bool | None) -> bool:
    """``--adaptive-ttl-file`` implies ``--adaptive-ttl``; ``ONCEPAY_ADAPTIVE_TTL_FILE`` alone
    does not (the settings, which ``oncepay worker`` reads too, want ``ONCEPAY_ADAPTIVE_TTL``)."""
    return bool(adaptive_ttl_file) and adaptive_ttl is None and on_command_line("adaptive_ttl_file")


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
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


async def _prepare(config: Any) -> str:
    """Migrate, and in test mode (the embedded acquirer) hand out a fresh test API key."""
    from oncepay.payments.bootstrap import ttl_policy
    from oncepay.payments.merchants import issue_test_key
    from oncepay.payments.storage.migrations import migrated

    policy = ttl_policy(config)  # a TTL file that cannot be used: exit 2 before serving
    async with migrated(config.database_url) as db:
        url = f"http://{config.host}:{config.port}"
        lines = [f"[bold]OncePay payments API[/bold] on {url}", f"database: {where(db)}"]
        if policy is not None:
            learned = len(policy.learned())
            lines.append(
                f"adaptive TTL: {learned} learned TTLs, held to [{policy.minimum:.0f} s, "
                f"{policy.maximum:.0f} s]; key_ttl ({config.key_ttl:.0f} s) elsewhere"
            )
        if config.embedded_acquirer:
            merchant, api_key = await issue_test_key(db)
            lines += [
                "acquirer: the simulated one, embedded "
                f"(database {where(config.acquirer_database_url)})",
                f"test API key for {merchant.name} ({merchant.id}):",
                f"  [green]{api_key}[/green]",
                f"try: curl {url}/v1/payments -H 'Authorization: Bearer {api_key}' "
                "-H 'Idempotency-Key: first-payment' -H 'Content-Type: application/json' "
                '-d \'{"amount": 1000, "currency": "USD", '
                '"payment_method": "pm_card_ok"}\'',
            ]
        return "\n".join(lines)
