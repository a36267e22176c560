"""``oncepay merchants``: merchants and their API keys."""

from __future__ import annotations

import json
from typing import Any

import typer

from oncepay.cli._common import DatabaseUrl, console, run_or_exit, settings

__all__ = ["merchants_app"]

merchants_app = typer.Typer(help="Merchants and their API keys.", no_args_is_help=True)


@merchants_app.command("create")
def merchants_create(name: str, database_url: DatabaseUrl = None) -> None:
    """Create a merchant; prints JSON with its id and API key (shown once, stored hashed)."""
    if not name.strip():
        console.print("[red]error:[/red] a merchant needs a name")
        raise typer.Exit(2)
    config = settings(database_url=database_url)
    merchant, api_key = run_or_exit(_create(config.database_url, name))
    print(json.dumps({"id": merchant.id, "name": merchant.name, "api_key": api_key}))


async def _create(url: str, name: str) -> tuple[Any, str]:
    from oncepay.payments.merchants import create_merchant
    from oncepay.payments.storage.migrations import migrated

    async with migrated(url) as db:
        return await create_merchant(db, name)
