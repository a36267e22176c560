"""``oncepay worker``: recovery, webhook delivery and the reaper, apart from the API."""

from __future__ import annotations

import asyncio
import logging.config
from typing import Annotated, Any

import typer

from oncepay._logformat import oncepay_logging, resolve
from oncepay.cli._common import (
    LOG_FORMAT_HELP,
    DatabaseUrl,
    console,
    run_or_exit,
    settings,
    where,
)

__all__ = ["worker"]


def worker(
    database_url: DatabaseUrl = None,
    acquirer_url: Annotated[str | None, typer.Option(envvar="ONCEPAY_ACQUIRER_URL")] = None,
    secondary_acquirer_url: Annotated[
        str | None, typer.Option(envvar="ONCEPAY_SECONDARY_ACQUIRER_URL")
    ] = None,
    redis_url: Annotated[str | None, typer.Option(envvar="ONCEPAY_REDIS_URL")] = None,
    once: Annotated[
        bool, typer.Option("--once", envvar="ONCEPAY_ONCE", help="One pass, then exit.")
    ] = False,
    log_format: Annotated[
        str | None, typer.Option(envvar="ONCEPAY_LOG_FORMAT", help=LOG_FORMAT_HELP)
    ] = None,
) -> None:
    """Run the worker: finish abandoned requests, resolve unknown outcomes, deliver webhooks,
    purge expired keys."""
    config = settings(
        database_url=database_url,
        acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url,
        redis_url=redis_url,
        log_format=log_format,
    )
    logging.config.dictConfig(oncepay_logging(resolve(config.log_format)))
    run_or_exit(_worker(config, once=once))


async def _worker(config: Any, *, once: bool) -> None:
    import signal

    from oncepay.payments import bootstrap, tracing
    from oncepay.payments.recovery import reap, recover_once, run_worker

    tracing.setup()  # with OTEL_* variables set: recovery and deliveries in their traces
    services = await bootstrap.start(config)
    if config.trace_sql:
        tracing.instrument_database(services.db)
    console.print(f"database: {where(services.db)}", soft_wrap=True)
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
        tracing.shutdown()
