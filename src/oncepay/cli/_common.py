"""What the commands share: the console, the common options, settings from the environment
with the options given on top, and running a command's coroutine with clean errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from oncepay.cli._env import given_as
from oncepay.errors import OncePayError

__all__ = [
    "LOG_FORMAT_HELP",
    "DatabaseUrl",
    "StoreUrl",
    "console",
    "on_database",
    "run_or_exit",
    "settings",
]

T = TypeVar("T")

console = Console(stderr=True)

StoreUrl = Annotated[
    str,
    typer.Option(
        "--store",
        envvar=["ONCEPAY_STORE", "ONCEPAY_STORE_URL"],  # the second: its older name
        help="Idempotency store URL.",
    ),
]

LOG_FORMAT_HELP = (
    "text, json (a JSON object a line, with trace ids) or auto: json unless stderr is a "
    "terminal (docs/observability.md). [default auto]"
)

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="ONCEPAY_DATABASE_URL",
        help="sqlite:///path.db or postgresql://… [default sqlite:///oncepay.db]",
        show_default=False,
    ),
]


def settings(**overrides: Any) -> Any:
    """Settings from ONCEPAY_* variables, with the options actually given on top."""
    from pydantic import ValidationError

    from oncepay.payments.settings import Settings

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):  # one line each, named as it was given:
            where = ".".join(str(part) for part in error["loc"])  # an option, or a variable
            if not where:
                option = ""
            elif where in given:  # by the command line, or by the variable Click read
                option = f"{given_as(where)}: "
            else:
                option = f"ONCEPAY_{where.upper()}: "
            message = error["msg"].removeprefix("Value error, ")
            console.print(f"[red]error:[/red] {escape(option + message)}", soft_wrap=True)
        raise typer.Exit(2) from exc


def run_or_exit(coroutine: Any) -> Any:
    """Run a command's coroutine; a bad URL or an unreachable database is one line, exit 2."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(coroutine)
    except OncePayError as exc:  # escaped: a column named refund_metadata[reference] is text
        console.print(f"[red]error:[/red] {escape(exc.detail)}", soft_wrap=True)
        raise typer.Exit(2) from exc
    except (SQLAlchemyError, OSError) as exc:
        reason = getattr(exc, "orig", None) or exc
        console.print(f"[red]error:[/red] the database cannot be used: {reason}", soft_wrap=True)
        raise typer.Exit(2) from exc


def where(database: Any) -> str:
    """The database a command uses, said so that nobody mistakes it: a SQLite file by its
    absolute path, a server URL without its password. ``database`` is a URL or a Database."""
    from pathlib import Path

    from sqlalchemy.engine import make_url

    url = make_url(str(getattr(database, "url", database)))
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return "sqlite (in memory)"
        return f"sqlite:///{Path(url.database).resolve()}"
    return url.render_as_string(hide_password=True)


def on_database(database_url: str | None, command: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``command`` on the migrated payments database, having said on stderr which database
    it is (a command run from the wrong folder shows it at once)."""
    url = settings(database_url=database_url).database_url

    async def run() -> T:
        from oncepay.payments.storage.migrations import migrated

        async with migrated(url) as db:
            return await command(db)

    console.print(f"database: {where(url)}", soft_wrap=True, highlight=False)
    result: T = run_or_exit(run())
    return result
