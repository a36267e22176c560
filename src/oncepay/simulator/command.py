"""``oncepay acquirer``: run the simulated acquirer under uvicorn, faults set by flags.

Every option is also an environment variable ``ONCEPAY_ACQUIRER_<NAME>``, then ``ONCEPAY_<NAME>``
(SPEC §7's name): the acquirer's own name first, so that in an environment shared with
``oncepay serve`` its ``ONCEPAY_ACQUIRER_PORT`` wins over the service's ``ONCEPAY_PORT``
(docs/operations.md, "Settings as variables"). Faults can be changed while it runs with
``PUT /admin/faults`` (docs/acquirer.md).
"""

from __future__ import annotations

from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from oncepay._logformat import LogFormat, resolve, uvicorn_logging
from oncepay.errors import ConfigurationError
from oncepay.simulator.app import DEFAULT_DATABASE_URL, create_app
from oncepay.simulator.faults import Faults

__all__ = ["DEFAULT_PORT", "acquirer"]

DEFAULT_PORT = 8100  # beside `oncepay serve` on 8000
# Stopping waits this long for requests in flight: a stalled request is a fault by design and
# would otherwise hold the shutdown for its whole stall; everything else is done in ms.
GRACEFUL_SHUTDOWN_SECONDS = 2

console = Console(stderr=True)


def _env(name: str) -> list[str]:
    return [f"ONCEPAY_ACQUIRER_{name}", f"ONCEPAY_{name}"]


def acquirer(
    port: Annotated[int, typer.Option(envvar=_env("PORT"), min=1, max=65535)] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(envvar=_env("HOST"))] = "127.0.0.1",
    database_url: Annotated[
        str,
        typer.Option(
            # its own variable only: ONCEPAY_DATABASE_URL names the payments database, and a
            # simulated acquirer must keep a database of its own (SPEC §5)
            envvar="ONCEPAY_ACQUIRER_DATABASE_URL",
            help="sqlite:///… or postgresql://…",
        ),
    ] = DEFAULT_DATABASE_URL,
    seed: Annotated[
        int | None, typer.Option(envvar=_env("SEED"), help="Seed of the fault dice.")
    ] = None,
    latency_ms: Annotated[
        float, typer.Option(envvar=_env("LATENCY_MS"), min=0, help="Added to every call.")
    ] = 0.0,
    latency_jitter_ms: Annotated[
        float, typer.Option(envvar=_env("LATENCY_JITTER_MS"), min=0, help="Up to this more.")
    ] = 0.0,
    error_rate: Annotated[
        float,
        typer.Option(envvar=_env("ERROR_RATE"), min=0, max=1, help="503 before doing anything."),
    ] = 0.0,
    timeout_after_commit_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("TIMEOUT_AFTER_COMMIT_RATE"),
            min=0,
            max=1,
            help="Commit, then stall --stall-seconds before answering.",
        ),
    ] = 0.0,
    stall_seconds: Annotated[
        float, typer.Option(envvar=_env("STALL_SECONDS"), min=0)
    ] = Faults().stall_seconds,
    drop_rate: Annotated[
        float,
        typer.Option(
            envvar=_env("DROP_RATE"), min=0, max=1, help="Commit, then drop the connection."
        ),
    ] = 0.0,
    outage: Annotated[
        bool, typer.Option("--outage", envvar=_env("OUTAGE"), help="503 to every API call.")
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            envvar=_env("LOG_FORMAT"),
            help="text, json (a JSON object a line) or auto: json unless stderr is a terminal.",
        ),
    ] = "auto",
) -> None:
    """Run the simulated acquirer: idempotent authorizations, fencing look-ups, settlement
    reports, and faults on request."""
    import uvicorn

    try:
        faults = Faults(
            latency_ms=latency_ms,
            latency_jitter_ms=latency_jitter_ms,
            error_rate=error_rate,
            timeout_after_commit_rate=timeout_after_commit_rate,
            stall_seconds=stall_seconds,
            drop_rate=drop_rate,
            outage=outage,
        )
        app = create_app(database_url, faults, seed)  # a bad URL fails here, before binding
    except (ConfigurationError, ValidationError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from exc
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        log_config=uvicorn_logging(resolve(log_format)),
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )


if __name__ == "__main__":  # python -m oncepay.simulator.command, without the CLI
    typer.run(acquirer)
