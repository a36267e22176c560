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

from oncepay.cli._common import DatabaseUrl, console, on_database, run_or_exit, settings
from oncepay.cli._env import given_as
from oncepay.errors import ConfigurationError
from oncepay.reconciliation.mapping import MAPPINGS, ColumnMapping, mapping_from_json
from oncepay.reconciliation.matcher import DEFAULT_GRACE_DAYS, EARLIEST_DAY, MAX_GRACE_DAYS

__all__ = ["reconcile", "reconcile_app"]

AcquirerUrl = Annotated[
    str | None,
    typer.Option(
        "--acquirer-url",
        envvar="ONCEPAY_ACQUIRER_URL",
        help="The primary acquirer (default: the embedded simulator on "
        "ONCEPAY_ACQUIRER_DATABASE_URL, as oncepay serve runs it).",
        show_default=False,
    ),
]
SecondaryUrl = Annotated[
    str | None,
    typer.Option(
        "--secondary-acquirer-url",
        envvar="ONCEPAY_SECONDARY_ACQUIRER_URL",
        help="The secondary acquirer.",
        show_default=False,
    ),
]


reconcile_app = typer.Typer(
    help="Match an acquirer's settlement report against OncePay's captures and refunds "
    "(with no command); list the runs and discrepancies kept (runs, discrepancies).",
    no_args_is_help=False,
)


@reconcile_app.callback(invoke_without_command=True)
def reconcile(
    ctx: typer.Context,
    database_url: DatabaseUrl = None,
    acquirer: Annotated[
        str, typer.Option(envvar="ONCEPAY_ACQUIRER", help="primary or secondary.")
    ] = "primary",
    day: Annotated[
        str | None,
        typer.Option(
            "--date",
            envvar="ONCEPAY_DATE",
            help="The UTC day YYYY-MM-DD whose report to fetch (default: today).",
            show_default=False,
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(
            "--report",
            envvar="ONCEPAY_REPORT",
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
            # The second: the worker's reconciliations' setting, so that both agree.
            envvar=["ONCEPAY_GRACE_DAYS", "ONCEPAY_RECONCILE_GRACE_DAYS"],
            min=0,
            max=MAX_GRACE_DAYS,
            help="Days before an unsettled movement is missing.",
        ),
    ] = DEFAULT_GRACE_DAYS,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the SPEC §10 JSON document.")
    ] = False,
    mapping: Annotated[
        str,
        typer.Option(
            envvar="ONCEPAY_MAPPING",
            help=f"Columns of --report: {', '.join(sorted(MAPPINGS))}, or a JSON file of your "
            "own (docs/reconciliation.md).",
        ),
    ] = "oncepay",
    acquirer_url: AcquirerUrl = None,
    secondary_acquirer_url: SecondaryUrl = None,
) -> None:
    """Match an acquirer's settlement report against OncePay's captures and refunds.

    With a command instead: list the runs or the discrepancies kept (oncepay reconcile runs
    --help, oncepay reconcile discrepancies --help)."""
    if ctx.invoked_subcommand is not None:
        return
    if day is not None and report is not None:
        _refuse(
            f"{given_as('day')} and {given_as('report')} exclude each other "
            "(a file says its own day: today)"
        )
    columns = _mapping(mapping)
    config = settings(
        database_url=database_url,
        acquirer_url=acquirer_url,
        secondary_acquirer_url=secondary_acquirer_url,
    )
    as_of = _day(day)
    content = report.read_bytes() if report is not None else None
    result = run_or_exit(_run(config, acquirer, as_of, content, grace_days, columns))
    _print(result, as_json)
    if result.still_open:
        raise typer.Exit(1)


def _mapping(value: str) -> ColumnMapping:
    """A shipped mapping by its name, or one's own from a JSON file."""
    if value in MAPPINGS:
        return MAPPINGS[value]
    path = Path(value)
    if not path.is_file():
        _refuse(
            f"{given_as('mapping')} must be one of {', '.join(sorted(MAPPINGS))} or a JSON file "
            f"of your own (docs/reconciliation.md), not {value!r}"
        )
    try:
        return mapping_from_json(json.loads(path.read_bytes()))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        _refuse(f"{given_as('mapping')} {value}: {exc}")


def _day(value: str | None) -> date:
    """The day to reconcile: today by default, never one to come (its authorizations would all
    look past their validity window and be canceled as stale), nor one before any report."""
    today = datetime.now(UTC).date()
    if value is None:
        return today
    option = given_as("day")
    day = _iso_day(option, value)
    if day > today:
        _refuse(f"{option} {value} is in the future (today is {today}): nothing has settled yet")
    if day < EARLIEST_DAY:
        _refuse(f"{option} {value} is before {EARLIEST_DAY}: no report goes back so far")
    return day


def _refuse(message: str) -> NoReturn:
    from rich.markup import escape

    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


async def _run(
    config: Any,
    acquirer: str,
    day: date,
    report: bytes | None,
    grace_days: int,
    mapping: ColumnMapping,
) -> Any:
    """The pipeline (docs/reconciliation.md): the run kept, settlements posted, orphans voided;
    the services wired as ``oncepay serve`` wires them, so the acquirers are the configured
    ones (``--acquirer`` names one of them)."""
    from oncepay.payments import bootstrap
    from oncepay.reconciliation.pipeline import reconcile

    if acquirer not in {"primary", "secondary"}:
        option = given_as("acquirer")
        raise ConfigurationError(f"{option} must be primary or secondary, not {acquirer!r}")
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
            mapping=mapping,
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


Day = Annotated[
    str | None,
    typer.Option(help="YYYY-MM-DD (UTC): runs of this day or later / earlier.", show_default=False),
]
Limit = Annotated[int, typer.Option(min=1, max=1000, help="At most this many, newest first.")]
Json = Annotated[bool, typer.Option("--json", help="The operator API's list document.")]


@reconcile_app.command("runs")
def list_runs(
    database_url: DatabaseUrl = None,
    acquirer: Annotated[str | None, typer.Option(help="primary or secondary.")] = None,
    day_from: Day = None,
    day_to: Day = None,
    limit: Limit = 20,
    starting_after: Annotated[
        str | None,
        typer.Option(
            help="A run's id: the runs older than it (the next page).", show_default=False
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """The reconciliation runs kept, newest first: the day, the lines read, matched, and the
    discrepancies each found (as GET /v1/admin/reconciliation/runs)."""
    from oncepay.reconciliation.queries import RunFilter, run_page

    where = RunFilter(_listing_acquirer(acquirer), *_listing_days(day_from, day_to))
    found = _page(database_url, run_page, where, limit, starting_after)
    if found is None:
        _refuse(f"--starting-after: no run {starting_after!r}")
    rows, more = found
    if as_json:
        _echo_list("reconciliation_run", rows, more)
        return
    for row in rows:
        when = datetime.fromtimestamp(row["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(
            f"{row['id']}\t{row['acquirer']}\t{row['day']}\tlines {row['lines']}\t"
            f"matched {row['matched']}\tdiscrepancies {row['discrepancies']}\tat {when}"
        )
    typer.echo(f"{len(rows)} run(s){_more(rows, more)}")


@reconcile_app.command("discrepancies")
def list_discrepancies(
    database_url: DatabaseUrl = None,
    status: Annotated[
        str | None, typer.Option(help="open, resolved or accepted (default: all).")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="e.g. amount_mismatch.")] = None,
    acquirer: Annotated[str | None, typer.Option(help="primary or secondary.")] = None,
    payment_id: Annotated[str | None, typer.Option(help="The payment it names.")] = None,
    reference: Annotated[str | None, typer.Option(help="The reference it names.")] = None,
    day_from: Day = None,
    day_to: Day = None,
    limit: Limit = 50,
    starting_after: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="A discrepancy's id: the ones older than it (the next page).",
            show_default=False,
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """The discrepancies kept, newest first, with their status (open until a person resolves
    or accepts one: the operator API or the dashboard), as GET
    /v1/admin/reconciliation/discrepancies. Exits 1 when any listed is open."""
    from oncepay.reconciliation.queries import STATUSES, DiscrepancyFilter, discrepancy_page
    from oncepay.reconciliation.records import Kind

    if status is not None and status not in STATUSES:
        _refuse(f"--status must be one of {', '.join(STATUSES)}, not {status!r}")
    if kind is not None and kind not in {k.value for k in Kind}:
        _refuse(f"--kind must be one of {', '.join(sorted(k.value for k in Kind))}, not {kind!r}")
    where = DiscrepancyFilter(
        kind,
        status,
        _listing_acquirer(acquirer),
        payment_id,
        reference,
        *_listing_days(day_from, day_to),
    )
    rows, more = _page(database_url, discrepancy_page, where, limit, starting_after)
    if as_json:
        _echo_list("reconciliation_discrepancy", rows, more)
    else:
        for row in rows:
            typer.echo(
                f"{row['id']}\t{row['status']}\t{row['kind']}\t{row['reference']}\t"
                f"{row['payment_id'] or '-'}\t{row['day'] or '-'}\t{row['detail']}"
            )
        typer.echo(f"{len(rows)} discrepanc{'y' if len(rows) == 1 else 'ies'}"
                   f"{_more(rows, more)}")  # fmt: skip
    if any(row["status"] == "open" for row in rows):
        raise typer.Exit(1)


def _iso_day(option: str, value: str) -> date:
    """``value`` as a day written YYYY-MM-DD (``date.fromisoformat`` alone takes 20261207)."""
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        _refuse(f"{option} {value!r} is not a day YYYY-MM-DD")
    try:
        return date.fromisoformat(value)
    except ValueError:
        _refuse(f"{option} {value!r} is not a day YYYY-MM-DD")


def _listing_days(day_from: str | None, day_to: str | None) -> tuple[date | None, date | None]:
    first = None if day_from is None else _iso_day("--day-from", day_from)
    last = None if day_to is None else _iso_day("--day-to", day_to)
    if first is not None and last is not None and first > last:
        _refuse(f"--day-from {first} is after --day-to {last}")
    return first, last


def _listing_acquirer(value: str | None) -> str | None:
    if value is not None and value not in {"primary", "secondary"}:
        _refuse(f"--acquirer must be primary or secondary, not {value!r}")
    return value


def _page(database_url: str | None, page: Any, where: Any, limit: int, starting_after: Any) -> Any:
    """One page of ``page`` (newest first, after ``starting_after``) over the payments
    database: no acquirer, no worker."""

    async def one(db: Any) -> Any:
        return await page(db, where, limit, starting_after)

    return on_database(database_url, one)


def _more(rows: list[dict[str, Any]], more: bool) -> str:
    return f", more: --starting-after {rows[-1]['id']}" if more else ""


def _echo_list(kind: str, rows: list[dict[str, Any]], more: bool) -> None:
    """``rows`` as the operator API's list document of ``kind`` objects."""
    data = [{"object": kind, **row} for row in rows]
    typer.echo(json.dumps({"object": "list", "data": data, "has_more": more}))
