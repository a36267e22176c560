"""The ``oncepay`` command: one command, one sub-command per job, each a thin module over the
domain (``serve``, ``worker``, ``merchants``, ``ledger``, ``purge``, ``gateway``, ``chaos``;
``acquirer`` when the simulator is installed)."""

from __future__ import annotations

import typer

from oncepay import __version__
from oncepay.cli._env import Group
from oncepay.cli.chaos import chaos
from oncepay.cli.gateway import gateway
from oncepay.cli.insight import insight_app
from oncepay.cli.ledger import ledger_app
from oncepay.cli.merchants import merchants_app
from oncepay.cli.purge import purge
from oncepay.cli.reconcile import reconcile_app
from oncepay.cli.serve import serve
from oncepay.cli.worker import worker

__all__ = ["app", "main"]

app = typer.Typer(
    cls=Group,  # a bad value from an ONCEPAY_* variable is named as the variable
    name="oncepay",
    help="Exactly-once payments: idempotency toolkit and payments service.",
    no_args_is_help=True,
    add_completion=False,
    # Click's own help layout: rich mode in typer 0.29 prints a type beside every flag
    # ("--help <bool>") and keeps docstrings' line breaks mid-sentence.
    rich_markup_mode=None,
)


@app.command()
def version() -> None:
    """Print the OncePay version."""
    print(__version__)


app.command(short_help="Run the payments service (the API, with recovery).")(serve)
app.add_typer(merchants_app, name="merchants")
app.command(short_help="Run recovery, webhook delivery and key purging.")(worker)
app.add_typer(ledger_app, name="ledger")
app.command(short_help="Remove expired idempotency records.")(purge)
app.command(short_help="Run the idempotency gateway (a reverse proxy).")(gateway)
app.command(short_help="Audit exactly-once under faults (exit 1 on a violation).")(chaos)
app.add_typer(insight_app, name="insight", short_help="Key-usage anomalies and learned TTLs.")
app.add_typer(
    reconcile_app,
    name="reconcile",
    short_help="Match settlement reports against OncePay's books; list runs, discrepancies.",
)


def _register_acquirer() -> None:
    try:
        from oncepay.simulator.command import acquirer
    except ImportError:  # the service extra is not installed
        return
    app.command("acquirer", short_help="Run the simulated acquirer.")(acquirer)


_register_acquirer()


def main() -> None:
    app()
