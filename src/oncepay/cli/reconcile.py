"""``oncepay reconcile``: an acquirer's settlement report against OncePay's books (SPEC §7 and
§10, docs/reconciliation.md), through the pipeline: the run and its discrepancies are kept,
matched lines posted, orphans voided. Prints the outcome (``--json``: the SPEC document) and
exits 1 while discrepancies remain open, 2 when the report, the database or the acquirer
cannot be used (nothing is written then)."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from oncepay.cli._common import DatabaseUrl, console, run_or_exit, settings
from oncepay.errors import ConfigurationError
from oncepay.reconciliation.mapping import MAPPINGS
from oncepay.reconciliation.matcher import DEFAULT_GRACE_DAYS, EARLIEST_DAY, MAX_GRACE_DAYS

__all__ = ["reconcile"]

AcquirerUrl = Annotated[
    str | None,
    typer.Option(
        "--acquirer-url",
        help="The primary acquirer (env ONCEPAY_ACQUIRER_URL; default: the embedded simulator "
        "on ONCEPAY_ACQUIRER_DATABASE_URL, as oncepay serve runs it).",
        show_default=False,
    ),
]
SecondaryUrl = Annotated[
    str | None,
    typer.Option(
        "--secondary-acquirer-url",
        help="The secondary acquirer (env ONCEPAY_SECONDARY_ACQUIRER_URL).",
        show_default=False,
    ),
]


def reconcile(
    database_url: DatabaseUrl = None,
    acquirer: Annotated[str, typer.Option(help="primary or secondary.")] = "primary",
    day: Annotated[
        str | None,
        typer.Option(
            "--date",
            help="The UTC day YYYY-MM-DD whose report to fetch (default: today).",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="A report file instead of the acquirer's (see --mapping).",
            exists=True,
            dir_okay=False,
            readable=True,
        ),
    ] = None,
    grace_days: Annotated[
        int,
        typer.Option(
            "--grace-days",
            min=0,
            max=MAX_GRACE_DAYS,
            help="Days before an unsettled movement is missing.",
        ),
    ] = DEFAULT_GRACE_DAYS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the SPEC §10 JSON document.")
    ] = False,
    mapping: Annotated[
        str, typer.Option(help=f"Columns of --report: {', '.join(sorted(MAPPINGS))}.")
    ] = "oncepay",
    acquirer_url: AcquirerUrl = None,
    secondary_acquirer_url: SecondaryUrl = None,
) -> None:
    """Match an acquirer's settlement report against OncePay's captures and refunds."""
    if day is not None and report is not None:
        _refuse("--date and --report exclude each other (a file says its own day: today)")
    if mapping not in MAPPINGS:
        _refuse(f"--mapping must be one of {', '.join(sorted(MAPPINGS))}")
    config = settings(
        database_url=database_url,
        acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url,
    )
    as_of = _day(day)
    content = report.read_bytes() if report is not None else None
    result = run_or_exit(_run(config, acquirer, as_of, content, grace_days, mapping))
    _print(result, as_json)
    if result.still_open:
        raise typer.Exit(1)


def _day(value: str | None) -> date:
    """The day to reconcile: today by default, never one to come (its authorizations would all
    look past their validity window and be canceled as stale), nor one before any report."""
    today = datetime.now(UTC).date()
    if value is None:
        return today
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):  # fromisoformat takes 20261207
        _refuse(f"--date {value!r} is not a day YYYY-MM-DD")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        _refuse(f"--date {value!r} is not a day YYYY-MM-DD")
    if day > today:
        _refuse(f"--date {value} is in the future (today is {today}): nothing has settled yet")
    if day < EARLIEST_DAY:
        _refuse(f"--date {value} is before {EARLIEST_DAY}: no report goes back so far")
    return day


def _refuse(message: str) -> NoReturn:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


async def _run(
    config: Any, acquirer: str, day: date, report: bytes | None, grace_days: int, mapping: str
) -> Any:
    """The pipeline (docs/reconciliation.md): the run kept, settlements posted, orphans voided;
    the services wired as ``oncepay serve`` wires them, so the acquirers are the configured
    ones (``--acquirer`` names one of them)."""
    from oncepay.payments import bootstrap
    from oncepay.reconciliation.pipeline import reconcile

    if acquirer not in {"primary", "secondary"}:
        raise ConfigurationError(f"--acquirer must be primary or secondary, not {acquirer!r}")
    if acquirer == "secondary" and not config.secondary_acquirer_url:
        raise ConfigurationError("no secondary acquirer configured (--secondary-acquirer-url)")
    services = await bootstrap.start(config)
    try:
        return await reconcile(
            services,
            acquirer,
            day=day,
            report=report,
            grace_days=grace_days,
            mapping=MAPPINGS[mapping],
        )
    finally:
        await services.aclose()


def _print(result: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.as_json()))
        return
    for d in result.discrepancies:
        typer.echo(f"{d.kind.value}\t{d.reference}\t{d.payment_id or '-'}\t{d.detail}")
    typer.echo(
        f"matched {result.matched}, settled {result.settled} now, "
        f"{len(result.discrepancies)} discrepancies ({result.opened} new, "
        f"{result.still_open} open); actions: {result.actions_taken} taken, "
        f"{result.actions_withheld} withheld, {result.actions_pending} pending"
    )
