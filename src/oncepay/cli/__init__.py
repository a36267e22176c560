"""The ``oncepay`` command: one command, one sub-command per job, each a thin module over the
domain (``serve``, ``worker``, ``merchants``, ``ledger``, ``purge``, ``gateway``, ``chaos``;
``acquirer`` when the simulator is installed)."""

from __future__ import annotations

import typer

from oncepay import __version__
from oncepay.cli.chaos import chaos
from oncepay.cli.gateway import gateway
from oncepay.cli.insight import insight_app
from oncepay.cli.ledger import ledger_app
from oncepay.cli.merchants import merchants_app
from oncepay.cli.purge import purge
from oncepay.cli.reconcile import reconcile
from oncepay.cli.serve import serve
from oncepay.cli.worker import worker

__all__ = ["app", "main"]

app = typer.Typer(
    name="oncepay",
    help="Exactly-once payments: idempotency toolkit and payments service.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the OncePay version."""
    print(__version__)


app.command()(serve)
app.add_typer(merchants_app, name="merchants")
app.command()(worker)
app.add_typer(ledger_app, name="ledger")
app.command()(purge)
app.command()(gateway)
app.command()(chaos)
app.add_typer(insight_app, name="insight")
app.command()(reconcile)


def _register_acquirer() -> None:
    try:
        from oncepay.simulator.command import acquirer
    except ImportError:  # the service extra is not installed
        return
    app.command("acquirer")(acquirer)


_register_acquirer()


def main() -> None:
    app()
