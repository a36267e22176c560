"""``oncepay chaos``: the whole stack as processes under faults, audited for exactly-once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from oncepay.cli._common import console, run_or_exit

__all__ = ["chaos"]


def chaos(
    payments: Annotated[
        int, typer.Option(envvar="ONCEPAY_PAYMENTS", min=1, help="Logical payments to make.")
    ] = 300,
    concurrency: Annotated[
        int, typer.Option(envvar="ONCEPAY_CONCURRENCY", min=1, help="Concurrent clients.")
    ] = 16,
    duration: Annotated[
        float | None,
        typer.Option(
            envvar="ONCEPAY_DURATION", min=1, help="Run this many seconds instead of a count."
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            # Not ONCEPAY_DATABASE_URL: a fault run must never find the service's own database
            # in the environment it runs in (docs/operations.md, "Settings as variables").
            envvar="ONCEPAY_CHAOS_DATABASE_URL",
            help="The stack's payments database [default: SQLite in --workdir].",
            show_default=False,
        ),
    ] = None,
    redis: Annotated[
        bool,
        typer.Option("--redis", envvar="ONCEPAY_REDIS", help="Add a Redis fast tier (own server)."),
    ] = False,
    seed: Annotated[
        int, typer.Option(envvar="ONCEPAY_SEED", help="Seed of every fault and workload die.")
    ] = 1,
    error_rate: Annotated[
        float, typer.Option(envvar="ONCEPAY_ERROR_RATE", min=0, max=1, help="Acquirer 5xx rate.")
    ] = 0.03,
    timeout_after_commit_rate: Annotated[
        float, typer.Option(envvar="ONCEPAY_TIMEOUT_AFTER_COMMIT_RATE", min=0, max=1)
    ] = 0.02,
    drop_rate: Annotated[
        float, typer.Option(envvar="ONCEPAY_DROP_RATE", min=0, max=1, help="Acquirer drops.")
    ] = 0.02,
    proxy_drop_rate: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_PROXY_DROP_RATE",
            min=0,
            max=1,
            help="Answers dropped after the server finished.",
        ),
    ] = 0.05,
    kill_interval: Annotated[
        float, typer.Option(envvar="ONCEPAY_KILL_INTERVAL", min=0, help="Seconds between kill -9s.")
    ] = 4.0,
    outage_interval: Annotated[
        float,
        typer.Option(envvar="ONCEPAY_OUTAGE_INTERVAL", min=0, help="Seconds between outages."),
    ] = 10.0,
    outage_seconds: Annotated[
        float, typer.Option(envvar="ONCEPAY_OUTAGE_SECONDS", min=0, help="How long each lasts.")
    ] = 2.0,
    redis_interval: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_REDIS_INTERVAL", min=0.1, help="Seconds between Redis faults."
        ),
    ] = 5.0,
    full_outage: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_FULL_OUTAGE",
            min=0,
            help="One full primary outage this long (s), not periodic ones.",
        ),
    ] = 0.0,
    full_outage_after: Annotated[
        float,
        typer.Option(
            envvar="ONCEPAY_FULL_OUTAGE_AFTER",
            min=0,
            help="Seconds into the run the full outage starts.",
        ),
    ] = 10.0,
    retry_control: Annotated[
        str,
        typer.Option(
            envvar="ONCEPAY_RETRY_CONTROL",
            help="Acquirer retry control: adaptive or fixed (docs/acquirer.md).",
        ),
    ] = "adaptive",
    acquirer_attempts: Annotated[
        int,
        typer.Option(
            envvar="ONCEPAY_ACQUIRER_ATTEMPTS",
            min=1,
            help="Attempts per acquirer call (fixed: all of them).",
        ),
    ] = 2,
    workdir: Annotated[
        Path | None, typer.Option(envvar="ONCEPAY_WORKDIR", help="Folder for databases and logs.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the whole stack as processes under faults, then audit exactly-once; exit 1 on any
    violation."""
    import json

    from oncepay.chaos.run import ChaosConfig, render, run_chaos

    if retry_control not in ("adaptive", "fixed"):
        raise typer.BadParameter("adaptive or fixed", param_hint="--retry-control")

    config = ChaosConfig(
        payments=payments,
        concurrency=concurrency,
        duration=duration,
        database_url=database_url,
        redis=redis,
        seed=seed,
        error_rate=error_rate,
        timeout_after_commit_rate=timeout_after_commit_rate,
        drop_rate=drop_rate,
        proxy_drop_rate=proxy_drop_rate,
        kill_interval=kill_interval,
        outage_interval=outage_interval,
        outage_seconds=outage_seconds,
        redis_interval=redis_interval,
        full_outage=full_outage,
        full_outage_after=full_outage_after,
        retry_control=retry_control,
        acquirer_attempts=acquirer_attempts,
        workdir=workdir,
    )
    report = run_or_exit(run_chaos(config, console))
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        render(report, console)
    if report.violation_count:
        raise typer.Exit(1)
