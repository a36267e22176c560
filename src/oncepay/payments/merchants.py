"""Merchants and their API keys: creating, listing, revoking and rolling keys (each change
audited), restricted keys' scopes, and authenticating a request by its key.

A key is valid while it is not revoked and, once rolled, until the end of its overlap. Each
process remembers a key it checked for :data:`KEY_CACHE_SECONDS`, so a revoked key stops working
everywhere within that time (the docs promise 30 s); the process that revoked it forgets it at
once. A key's last use is written when its cache entry is refreshed and the stored time is more
than :data:`LAST_USED_EVERY` old: at most once a minute per key, never a write per request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.context import Services
from oncepay.payments.errors import (
    AuthenticationFailed,
    InvalidRequest,
    PermissionDenied,
    ResourceMissing,
)
from oncepay.payments.records import Merchant
from oncepay.payments.storage.schema import api_key_audit, api_keys, merchants
from oncepay.storage.db import Database, read, write
from oncepay.storage.ids import new_id

__all__ = [
    "KEY_CACHE_SECONDS",
    "MAX_OVERLAP",
    "RESOURCES",
    "Caller",
    "Merchant",
    "add_api_key",
    "authenticate",
    "create_key",
    "create_key_in",
    "create_merchant",
    "create_merchant_in",
    "find_merchant",
    "forget",
    "get_merchant",
    "issue_test_key",
    "key_audit",
    "key_owner",
    "list_keys",
    "list_merchants",
    "parse_scopes",
    "require_scope",
    "revoke_key",
    "revoke_key_in",
    "roll_key",
    "roll_key_in",
    "scope_for",
]

log = logging.getLogger("oncepay.payments")

# Live keys start with sk_test_ while the acquirers are simulated; 24 random bytes (192 bits)
# make guessing hopeless, which is also why one SHA-256 (not a slow KDF) is the right hash.
KEY_PREFIX = "sk_test_"
KEY_BYTES = 24
# A process remembers a key it checked this long. The docs promise that a revoked key stops
# working within 30 s in every process; half of that leaves room for a slow look-up, and a busy
# key still costs one database read per process every 15 s, not one per request.
KEY_CACHE_SECONDS = 15.0
# A key's last use is kept to the minute: a write per key per minute, not one per request.
LAST_USED_EVERY = 60.0
# A rolled key works on for at most a week: enough to deploy the new key everywhere (Stripe
# offers the same ceiling), short enough that a leaked key does not linger.
MAX_OVERLAP = 7 * 24 * 3600.0
MAX_NAME = 100
TEST_MERCHANT = "Test merchant"

# The scope vocabulary (docs/payments-api.md, "API keys"): ``<resource>:<access>``, access
# ``read`` (GET, HEAD), ``write`` (everything else; it includes read) or ``*``; resource ``*``
# is every resource (``*:read``: a read-only key).
RESOURCES = ("payments", "refunds", "events", "webhook_endpoints", "insight")
# Reference data every key may read, restricted or not: it says nothing about the merchant.
READABLE_BY_EVERY_KEY = frozenset({"currencies"})
ACCESS = ("read", "write", "*")
# Which resource a route belongs to: the last path segment that names one (so
# /v1/payments/{id}/refunds is refunds, /v1/payments/{id}/capture is payments).
_SEGMENTS = {
    "payments": "payments",
    "refunds": "refunds",
    "events": "events",
    "webhook_endpoints": "webhook_endpoints",
    "webhook_deliveries": "webhook_endpoints",
    "deliveries": "webhook_endpoints",
    "redeliver": "webhook_endpoints",
    "insight": "insight",
}

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Caller(Merchant):
    """The merchant a request authenticated as, and by which key."""

    key_id: str = ""
    scopes: frozenset[str] | None = None  # None: an unrestricted key
    expires_at: float | None = None


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


# -- merchants -----------------------------------------------------------------------------------


async def create_merchant(
    db: Database, name: str, *, actor: str = "cli", clock: Clock = time.time
) -> tuple[Merchant, str]:
    """A new merchant and its first API key (returned once; only its hash is kept)."""
    now = clock()
    async with write(db) as conn:
        merchant = await create_merchant_in(conn, name, actor=actor, now=now)
        _, api_key = await _add_key(conn, merchant.id, actor=actor, now=now)
    return merchant, api_key


async def create_merchant_in(
    conn: AsyncConnection, name: str, *, actor: str, now: float
) -> Merchant:
    """A new merchant, without a key (its creation is audited with its first key's)."""
    _check_name(name)
    merchant = Merchant(new_id("mer"), name)
    await conn.execute(merchants.insert().values(id=merchant.id, name=name, created_at=now))
    return merchant


async def add_api_key(db: Database, merchant_id: str, *, actor: str = "cli") -> str:
    async with write(db) as conn:
        return (await _add_key(conn, merchant_id, actor=actor, now=time.time()))[1]


async def find_merchant(db: Database, name: str) -> Merchant | None:
    """The oldest merchant of that name, if any."""
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(merchants.c.id, merchants.c.name)
                .where(merchants.c.name == name)
                .order_by(merchants.c.created_at)
            )
        ).first()
    return Merchant(row.id, row.name) if row else None


async def get_merchant(db: Database, merchant_id: str) -> Merchant:
    """The merchant of that id; 404 ``resource_missing`` if there is none."""
    async with read(db) as conn:
        row = await _merchant_row(conn, merchant_id)
    return Merchant(row.id, row.name)


async def _merchant_row(conn: AsyncConnection, merchant_id: str) -> Any:
    row = (
        await conn.execute(
            select(merchants.c.id, merchants.c.name).where(merchants.c.id == merchant_id)
        )
    ).first()
    if row is None:
        raise ResourceMissing(f"no merchant {merchant_id!r}")
    return row


async def list_merchants(
    db: Database, limit: int, starting_after: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """Merchants oldest first, a page of ``limit`` after the merchant ``starting_after``."""
    query = select(merchants).order_by(merchants.c.created_at, merchants.c.id)
    async with read(db) as conn:
        if starting_after is not None:
            cursor = (
                await conn.execute(
                    select(merchants.c.created_at).where(merchants.c.id == starting_after)
                )
            ).scalar()
            if cursor is None:
                raise InvalidRequest(f"starting_after: no merchant {starting_after!r}")
            query = query.where(
                (merchants.c.created_at > cursor)
                | ((merchants.c.created_at == cursor) & (merchants.c.id > starting_after))
            )
        rows = (await conn.execute(query.limit(limit + 1))).all()
    documents = [
        {"object": "merchant", "id": r.id, "name": r.name, "created": int(r.created_at)}
        for r in rows[:limit]
    ]
    return documents, len(rows) > limit


async def issue_test_key(db: Database, name: str = TEST_MERCHANT) -> tuple[Merchant, str]:
    """A fresh API key for the test merchant, created on first use (``oncepay serve`` with the
    embedded acquirer hands one out at every start)."""
    merchant = await find_merchant(db, name)
    if merchant is None:
        return await create_merchant(db, name, actor="serve")
    return merchant, await add_api_key(db, merchant.id, actor="serve")


# -- scopes --------------------------------------------------------------------------------------


def parse_scopes(given: Iterable[str] | None) -> frozenset[str] | None:
    """The scopes of a restricted key, checked against the vocabulary; None: unrestricted."""
    if given is None:
        return None
    scopes = frozenset(s.strip() for s in given if s.strip())
    if not scopes:
        raise InvalidRequest("scopes: name at least one scope, e.g. 'payments:read'")
    for scope in sorted(scopes):
        resource, _, access = scope.partition(":")
        if (resource != "*" and resource not in RESOURCES) or access not in ACCESS:
            raise InvalidRequest(
                f"scopes: {scope!r} is not a scope; use <resource>:<read|write|*> with a "
                f"resource among {', '.join(RESOURCES)} or *"
            )
    return scopes


def scope_for(path: str, method: str) -> tuple[str, str]:
    """The resource and access a request needs, from its route template and method."""
    access = "read" if method in {"GET", "HEAD"} else "write"
    literal = [s for s in path.strip("/").split("/") if s and not s.startswith("{")]
    for segment in reversed(literal):
        if segment in _SEGMENTS:
            return _SEGMENTS[segment], access
    return (literal[-1] if literal else "*"), access


def allows(scopes: frozenset[str] | None, resource: str, access: str) -> bool:
    if scopes is None or (access == "read" and resource in READABLE_BY_EVERY_KEY):
        return True
    accesses = {"read": ("read", "write", "*"), "write": ("write", "*")}[access]
    return any(f"{r}:{a}" in scopes for r in (resource, "*") for a in accesses)


def require_scope(caller: Merchant, path: str, method: str) -> None:
    """403 ``insufficient_scope`` when a restricted key is used outside its scopes."""
    if not isinstance(caller, Caller) or caller.scopes is None:
        return
    resource, access = scope_for(path, method)
    if not allows(caller.scopes, resource, access):
        held = " ".join(sorted(caller.scopes))
        raise PermissionDenied(
            f"this restricted key ({held}) may not {method} {path}: it needs '{resource}:{access}'"
        )


# -- keys ----------------------------------------------------------------------------------------


async def _add_key(
    conn: AsyncConnection,
    merchant_id: str,
    *,
    actor: str,
    now: float,
    name: str | None = None,
    scopes: frozenset[str] | None = None,
    action: str = "created",
    detail: dict[str, Any] | None = None,
) -> tuple[str, str]:
    api_key, key_id = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES), new_id("key")
    await conn.execute(
        api_keys.insert().values(
            id=key_id,
            merchant_id=merchant_id,
            key_hash=hash_key(api_key),
            prefix=api_key[: len(KEY_PREFIX) + 4],
            created_at=now,
            name=name,
            scopes=" ".join(sorted(scopes)) if scopes is not None else None,
        )
    )
    shown = {"name": name, "scopes": sorted(scopes) if scopes is not None else None}
    await _audit(conn, merchant_id, key_id, action, actor, now, {**shown, **(detail or {})})
    return key_id, api_key


async def _audit(
    conn: AsyncConnection,
    merchant_id: str,
    key_id: str,
    action: str,
    actor: str,
    now: float,
    detail: dict[str, Any],
) -> None:
    await conn.execute(
        api_key_audit.insert().values(
            merchant_id=merchant_id,
            key_id=key_id,
            action=action,
            actor=actor,
            detail=json.dumps(detail, sort_keys=True),
            created_at=now,
        )
    )


async def create_key(
    db: Database,
    merchant_id: str,
    *,
    actor: str,
    name: str | None = None,
    scopes: Iterable[str] | None = None,
    clock: Clock = time.time,
) -> tuple[dict[str, Any], str]:
    """A new key for the merchant (restricted to ``scopes`` when given): its document, and the
    secret, shown this once."""
    async with write(db) as conn:
        return await create_key_in(
            conn, merchant_id, actor=actor, name=name, scopes=scopes, now=clock()
        )


async def create_key_in(
    conn: AsyncConnection,
    merchant_id: str,
    *,
    actor: str,
    now: float,
    name: str | None = None,
    scopes: Iterable[str] | None = None,
) -> tuple[dict[str, Any], str]:
    checked, label = parse_scopes(scopes), _name(name)
    await _merchant_row(conn, merchant_id)
    key_id, secret = await _add_key(
        conn, merchant_id, actor=actor, now=now, name=label, scopes=checked
    )
    return key_document(await _key_row(conn, key_id), now), secret


async def list_keys(
    db: Database, merchant_id: str, *, clock: Clock = time.time
) -> list[dict[str, Any]]:
    """Every key of the merchant, newest first, revoked and expired ones included."""
    async with read(db) as conn:
        await _merchant_row(conn, merchant_id)
        rows = (
            await conn.execute(
                select(api_keys)
                .where(api_keys.c.merchant_id == merchant_id)
                .order_by(api_keys.c.created_at.desc(), api_keys.c.id)
            )
        ).all()
    now = clock()
    return [key_document(row, now) for row in rows]


async def revoke_key(
    db: Database, merchant_id: str, key_id: str, *, actor: str, clock: Clock = time.time
) -> tuple[dict[str, Any], str]:
    """Revoke a key now: its document, and its hash (for the caller's cache to forget it).
    Revoking a revoked key changes nothing and answers the same document."""
    async with write(db) as conn:
        return await revoke_key_in(conn, merchant_id, key_id, actor=actor, now=clock())


async def revoke_key_in(
    conn: AsyncConnection, merchant_id: str, key_id: str, *, actor: str, now: float
) -> tuple[dict[str, Any], str]:
    row = await _merchant_key(conn, merchant_id, key_id)
    if row.revoked_at is None:
        await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=now))
        await _audit(conn, merchant_id, key_id, "revoked", actor, now, {})
        row = await _key_row(conn, key_id)
    return key_document(row, now), str(row.key_hash)


async def roll_key(
    db: Database,
    merchant_id: str,
    key_id: str,
    *,
    actor: str,
    overlap: float = 0.0,
    clock: Clock = time.time,
) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """Replace a key by a new one with the same name and scopes; the old key works on for
    ``overlap`` seconds (0: it stops now). Returns the new key's document and secret, and the
    old key's document and hash."""
    async with write(db) as conn:
        return await roll_key_in(
            conn, merchant_id, key_id, actor=actor, overlap=overlap, now=clock()
        )


async def roll_key_in(
    conn: AsyncConnection,
    merchant_id: str,
    key_id: str,
    *,
    actor: str,
    overlap: float,
    now: float,
) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    if not 0 <= overlap <= MAX_OVERLAP:
        raise InvalidRequest(f"overlap: between 0 and {int(MAX_OVERLAP)} seconds (a week)")
    old = await _merchant_key(conn, merchant_id, key_id)
    if _status(old, now) in {"revoked", "expired"}:
        raise InvalidRequest(f"key {key_id} is {_status(old, now)}: create a new key instead")
    ends = now + overlap
    if old.expires_at is not None:
        ends = min(ends, old.expires_at)  # rolling again never lengthens the overlap
    await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(expires_at=ends))
    scopes = frozenset(old.scopes.split()) if old.scopes is not None else None
    new_key, secret = await _add_key(
        conn,
        merchant_id,
        actor=actor,
        now=now,
        name=old.name,
        scopes=scopes,
        detail={"rolled_from": key_id},
    )
    await _audit(
        conn,
        merchant_id,
        key_id,
        "rolled",
        actor,
        now,
        {"replaced_by": new_key, "overlap": overlap, "expires_at": ends},
    )
    new_row, old_row = await _key_row(conn, new_key), await _key_row(conn, key_id)
    return key_document(new_row, now), secret, key_document(old_row, now), str(old.key_hash)


async def key_owner(db: Database, key_id: str) -> str:
    """The id of the merchant a key belongs to; 404 ``resource_missing`` if no such key."""
    async with read(db) as conn:
        owner = (
            await conn.execute(select(api_keys.c.merchant_id).where(api_keys.c.id == key_id))
        ).scalar()
    if owner is None:
        raise ResourceMissing(f"no API key {key_id!r}")
    return str(owner)


async def key_audit(db: Database, merchant_id: str, limit: int = 100) -> list[dict[str, Any]]:
    """The merchant's key changes, newest first."""
    async with read(db) as conn:
        rows = (
            await conn.execute(
                select(api_key_audit)
                .where(api_key_audit.c.merchant_id == merchant_id)
                .order_by(api_key_audit.c.seq.desc())
                .limit(limit)
            )
        ).all()
    return [
        {
            "object": "api_key_audit",
            "key": r.key_id,
            "action": r.action,
            "actor": r.actor,
            "detail": json.loads(r.detail),
            "created": int(r.created_at),
        }
        for r in rows
    ]


def key_document(row: Any, now: float) -> dict[str, Any]:
    """A key as shown: its prefix (never the secret), scopes, status and times."""
    return {
        "object": "api_key",
        "id": row.id,
        "merchant": row.merchant_id,
        "name": row.name,
        "prefix": row.prefix,
        "scopes": sorted(row.scopes.split()) if row.scopes is not None else None,
        "status": _status(row, now),
        "created": int(row.created_at),
        "expires": _seconds(row.expires_at),
        "revoked": _seconds(row.revoked_at),
        "last_used": _seconds(row.last_used_at),
    }


def _seconds(value: float | None) -> int | None:
    return None if value is None else int(value)


def _status(row: Any, now: float) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is None:
        return "active"
    return "expiring" if now < row.expires_at else "expired"


def _name(name: str | None) -> str | None:
    if name is None:
        return None
    _check_name(name)
    return name.strip()


def _check_name(name: str) -> None:
    """A merchant's or a key's name: shown in terminals, logs and the dashboard, so no control
    character (an escape sequence would be the terminal's to run; NUL no database stores)."""
    if not name.strip() or len(name) > MAX_NAME:
        raise InvalidRequest(f"name: 1 to {MAX_NAME} characters, not blank")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidRequest("name: no control characters (tabs, line breaks, escapes, NUL)")


async def _key_row(conn: AsyncConnection, key_id: str) -> Any:
    return (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one()


async def _merchant_key(conn: AsyncConnection, merchant_id: str, key_id: str) -> Any:
    row = (
        await conn.execute(
            select(api_keys).where(api_keys.c.id == key_id, api_keys.c.merchant_id == merchant_id)
        )
    ).first()
    if row is None:
        raise ResourceMissing(f"merchant {merchant_id} has no key {key_id!r}")
    return row


# -- authentication ------------------------------------------------------------------------------


def forget(svc: Services, key_hash: str) -> None:
    """This process stops trusting a key at once (the others within KEY_CACHE_SECONDS)."""
    svc.known_keys.pop(key_hash, None)


async def authenticate(svc: Services, authorization: str | None) -> Caller:
    """The merchant whose API key ``authorization`` carries (``Bearer <key>``), with the key's
    id and scopes. Times come from the engine's clock, so tests move them by hand."""
    if not authorization:
        raise AuthenticationFailed("send your API key as 'Authorization: Bearer sk_test_…'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("use 'Authorization: Bearer <api key>'", code="invalid_api_key")
    digest, now = hash_key(token.strip()), svc.engine.clock()
    cached = svc.known_keys.get(digest)
    if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
        caller = cast(Caller, cached[0])
        if caller.expires_at is None or now < caller.expires_at:
            return caller
    svc.known_keys.pop(digest, None)
    caller = await _lookup_key(svc, digest, now)
    svc.known_keys[digest] = (caller, now)
    return caller


async def _lookup_key(svc: Services, digest: str, now: float) -> Caller:
    async with read(svc.db) as conn:
        row = (
            await conn.execute(
                select(
                    merchants.c.id,
                    merchants.c.name,
                    api_keys.c.id.label("key_id"),
                    api_keys.c.scopes,
                    api_keys.c.expires_at,
                    api_keys.c.last_used_at,
                )
                .join(api_keys, api_keys.c.merchant_id == merchants.c.id)
                .where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
            )
        ).first()
    if row is None:
        raise AuthenticationFailed("this API key is not valid", code="invalid_api_key")
    if row.expires_at is not None and now >= row.expires_at:
        raise AuthenticationFailed(
            "this API key was rolled and its overlap has ended: use its replacement",
            code="api_key_expired",
        )
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_EVERY:
        await _touch(svc.db, row.key_id, now)
    scopes = frozenset(row.scopes.split()) if row.scopes is not None else None
    return Caller(row.id, row.name, row.key_id, scopes, row.expires_at)


async def _touch(db: Database, key_id: str, now: float) -> None:
    """Record the key's use. Only a convenience for the people who manage keys: a failure is
    logged, never a refusal of the request."""
    try:
        async with write(db) as conn:
            await conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.id == key_id,
                    api_keys.c.last_used_at.is_(None)
                    | (api_keys.c.last_used_at <= now - LAST_USED_EVERY),
                )
                .values(last_used_at=now)
            )
    except SQLAlchemyError:
        log.warning("could not record the last use of API key %s", key_id, exc_info=True)
