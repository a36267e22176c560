"""``oncepay ledger``: the double-entry ledger."""

from __future__ import annotations

from typing import Any

import typer

from oncepay.cli._common import DatabaseUrl, console, run_or_exit, settings

__all__ = ["ledger_app"]

ledger_app = typer.Typer(help="The double-entry ledger.", no_args_is_help=True)


@ledger_app.command("check", short_help="Check the ledger, every payment and its settlement.")
def ledger_check(database_url: DatabaseUrl = None) -> None:
    """Verify the ledger's invariants, every payment and its settlement against it, and each
    payout's lines; exit 1 on a violation."""
    config = settings(database_url=database_url)
    violations, count = run_or_exit(_audit(config.database_url))
    for violation in violations:
        console.print(
            f"[red]violation[/red] {violation.subject}: {violation.problem}", soft_wrap=True
        )
    if violations:
        console.print(f"[red]{len(violations)} violations[/red] over {count} payments")
        raise typer.Exit(1)
    console.print(f"[green]ledger balances[/green]: {count} payments, no violations")


async def _audit(url: str) -> tuple[list[Any], int]:
    """The ledger's invariants and every payment's (settlement included), then the settled
    lines and payouts reconciliation posted."""
    from oncepay.payments.ledger import audit
    from oncepay.payments.storage.migrations import migrated
    from oncepay.reconciliation.settlement import check_payouts
    from oncepay.storage.db import read

    async with migrated(url) as db:
        violations, count = await audit(db)
        async with read(db) as conn:
            violations.extend(await check_payouts(conn))
        return violations, count
