"""``oncepay merchants``: merchants and their API keys (create, list, revoke, roll, audit).

Every command says on stderr which database it uses, so a command run from the wrong folder
shows it at once; what it prints on stdout is JSON (or a table for ``list`` without
``--json``). Every change to a key is audited with the actor ``cli``."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import typer

from oncepay.cli._common import DatabaseUrl, console, on_database

__all__ = ["merchants_app"]

merchants_app = typer.Typer(
    help="Merchants and their API keys.", no_args_is_help=True, rich_markup_mode=None
)
keys_app = typer.Typer(
    help="A merchant's API keys: list, create, revoke, roll, audit.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
merchants_app.add_typer(keys_app, name="keys", short_help="A merchant's API keys.")

ACTOR = "cli"

Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
MerchantArg = Annotated[str, typer.Argument(help="The merchant: its id (mer_…) or its name.")]
KeyArg = Annotated[str, typer.Argument(help="The key's id (key_…), as `keys list` shows it.")]


@merchants_app.command("create", short_help="Create a merchant and its first API key.")
def merchants_create(name: str, database_url: DatabaseUrl = None) -> None:
    """Create a merchant; prints JSON with its id and API key (shown once, stored hashed)."""
    if not name.strip():
        console.print("[red]error:[/red] a merchant needs a name")
        raise typer.Exit(2)

    async def create(db: Any) -> tuple[Any, str]:
        from oncepay.payments.merchants import create_merchant

        return await create_merchant(db, name, actor=ACTOR)

    merchant, api_key = on_database(database_url, create)
    print(json.dumps({"id": merchant.id, "name": merchant.name, "api_key": api_key}))


@merchants_app.command("list", short_help="List the merchants.")
def merchants_list(database_url: DatabaseUrl = None, as_json: Json = False) -> None:
    """List the merchants, oldest first."""

    async def listing(db: Any) -> list[dict[str, Any]]:
        from oncepay.payments.merchants import list_merchants

        found: list[dict[str, Any]] = []
        after = None
        while True:  # every page: a command prints them all
            rows, more = await list_merchants(db, 100, after)
            found.extend(rows)
            if not more:
                return found
            after = rows[-1]["id"]

    rows = on_database(database_url, listing)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        print(f"{row['id']}  {row['name']}")


@keys_app.command("list", short_help="List a merchant's keys (prefix, scopes, status).")
def keys_list(
    merchant: MerchantArg, database_url: DatabaseUrl = None, as_json: Json = False
) -> None:
    """A merchant's keys, newest first: prefix (never the secret), scopes, status, last use."""

    async def listing(db: Any) -> list[dict[str, Any]]:
        from oncepay.payments.merchants import list_keys

        return await list_keys(db, await _merchant_id(db, merchant))

    rows = on_database(database_url, listing)
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        scopes = " ".join(row["scopes"]) if row["scopes"] is not None else "all scopes"
        used = _when(row["last_used"]) if row["last_used"] else "never used"
        print(f"{row['id']}  {row['prefix']}…  {row['status']:<8}  {scopes}  last used: {used}")


@keys_app.command("create", short_help="Create a key, restricted to scopes or not.")
def keys_create(
    merchant: MerchantArg,
    name: Annotated[str | None, typer.Option(help="A label, e.g. 'checkout server'.")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            help="Restrict the key (repeatable): payments:read, refunds:write, "
            "webhook_endpoints:*, *:read …",
        ),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Same as --scope '*:read'.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a key; prints JSON with the key and its secret (shown once, stored hashed)."""
    scopes = [*(scope or []), *(["*:read"] if read_only else [])] or None

    async def create(db: Any) -> dict[str, Any]:
        from oncepay.payments.merchants import create_key

        owner = await _merchant_id(db, merchant)
        document, secret = await create_key(db, owner, actor=ACTOR, name=name, scopes=scopes)
        return {**document, "secret": secret}

    print(json.dumps(on_database(database_url, create)))


@keys_app.command("revoke", short_help="Revoke a key (refused within 30 s).")
def keys_revoke(key: KeyArg, database_url: DatabaseUrl = None) -> None:
    """Revoke a key now: every API process refuses it within 30 s."""

    async def revoke(db: Any) -> dict[str, Any]:
        from oncepay.payments.merchants import key_owner, revoke_key

        document, _ = await revoke_key(db, await key_owner(db, key), key, actor=ACTOR)
        return document

    print(json.dumps(on_database(database_url, revoke)))


@keys_app.command("roll", short_help="Replace a key; the old one works for --overlap.")
def keys_roll(
    key: KeyArg,
    overlap: Annotated[
        str,
        typer.Option(help="How long the old key works on: 0 (now), 90s, 30m, 12h, 7d at most."),
    ] = "0",
    database_url: DatabaseUrl = None,
) -> None:
    """Replace a key by a new one (same name and scopes); prints JSON with the new secret."""
    seconds = _duration(overlap)

    async def roll(db: Any) -> dict[str, Any]:
        from oncepay.payments.merchants import key_owner, roll_key

        owner = await key_owner(db, key)
        new, secret, old, _ = await roll_key(db, owner, key, actor=ACTOR, overlap=seconds)
        return {**new, "secret": secret, "rolled": old}

    print(json.dumps(on_database(database_url, roll)))


@keys_app.command("audit", short_help="Every change to a merchant's keys.")
def keys_audit(merchant: MerchantArg, database_url: DatabaseUrl = None) -> None:
    """Every change to the merchant's keys, newest first, as JSON lines."""

    async def audit(db: Any) -> list[dict[str, Any]]:
        from oncepay.payments.merchants import key_audit

        return await key_audit(db, await _merchant_id(db, merchant), limit=10_000)

    for row in on_database(database_url, audit):
        print(json.dumps(row))


# -- helpers -------------------------------------------------------------------------------------


async def _merchant_id(db: Any, merchant: str) -> str:
    from oncepay.payments.errors import ResourceMissing
    from oncepay.payments.merchants import find_merchant, get_merchant

    if re.fullmatch(r"mer_[0-9a-f]{24}", merchant):
        return (await get_merchant(db, merchant)).id
    found = await find_merchant(db, merchant)
    if found is None:
        raise ResourceMissing(f"no merchant named {merchant!r} (or give its id, mer_…)")
    return found.id


_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if match is None:
        console.print(f"[red]error:[/red] --overlap {text!r}: use seconds or 90s, 30m, 12h, 7d")
        raise typer.Exit(2)
    return float(int(match.group(1)) * _UNITS[match.group(2)])


def _when(seconds: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")
