"""The operator API of merchants and their API keys (docs/operations.md, "API keys"), behind
the operator token: merchants listed and created, keys listed, created (restricted to scopes
or not), revoked and rolled with an overlap, and the keys' audit trail.

Every POST takes an ``Idempotency-Key`` scoped to the operator. A secret is shown once: the
answer that creates it carries it, and a replay of that request answers the same document with
``secret`` null, since the stored answer must not keep what the database keeps only hashed."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.idempotency.records import StoredResponse
from oncepay.payments import merchants as keys
from oncepay.payments.api.deps import (
    DEFAULT_LIMIT,
    POST,
    PROBLEMS,
    Limit,
    ServicesDep,
    idempotent_local,
    resource_router,
)
from oncepay.payments.context import Services
from oncepay.payments.records import Merchant
from oncepay.payments.reply import Reply

__all__ = ["router"]

router = resource_router("/v1/admin/merchants", operator=True)

# The operator's requests are keyed in a scope of their own: no merchant id looks like this.
OPERATOR = Merchant("operator", "operator")
ACTOR = "operator"

Name = Annotated[str, StringConstraints(min_length=1, max_length=keys.MAX_NAME)]
Cursor = Annotated[str | None, Query(min_length=1, max_length=255)]


class MerchantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Name | None = None
    scopes: Annotated[
        list[Annotated[str, StringConstraints(max_length=64)]] | None,
        Field(
            max_length=32,
            description="A restricted key's scopes, e.g. ['payments:read', 'refunds:write']; "
            "omitted: every scope.",
        ),
    ] = None


class KeyRoll(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    overlap: Annotated[
        int,
        Field(ge=0, le=int(keys.MAX_OVERLAP), description="Seconds the old key works on."),
    ] = 0


@dataclass(frozen=True, slots=True)
class SecretReply(Reply):
    """An answer that shows a secret once: stored for replay with ``secret`` null."""

    def stored(self) -> StoredResponse:
        document = json.loads(self.body)
        document["secret"] = None
        kept = tuple((k, v) for k, v in self.headers if k != "retry-after")
        return StoredResponse(self.status, kept, json.dumps(document).encode())


def _shown_once(status: int, document: dict[str, Any]) -> SecretReply:
    return SecretReply(status, json.dumps(document, separators=(",", ":")).encode())


# -- merchants -----------------------------------------------------------------------------------


@router.get("", responses=PROBLEMS)
async def list_merchants(
    services: ServicesDep, limit: Limit = DEFAULT_LIMIT, starting_after: Cursor = None
) -> dict[str, Any]:
    """Merchants, oldest first."""
    rows, more = await keys.list_merchants(services.db, limit, starting_after)
    return {"object": "list", "data": rows, "has_more": more}


@router.post("", status_code=201, **POST)
async def create_merchant(
    body: MerchantCreate, request: Request, services: ServicesDep
) -> Response:
    """A merchant and its first API key (`secret`, shown once)."""

    async def work(conn: AsyncConnection) -> Reply:
        merchant = await keys.create_merchant_in(
            conn, body.name, actor=ACTOR, now=services.engine.clock()
        )
        document, secret = await keys.create_key_in(
            conn, merchant.id, actor=ACTOR, now=services.engine.clock()
        )
        return _shown_once(
            201,
            {
                "object": "merchant",
                "id": merchant.id,
                "name": merchant.name,
                "api_key": document,
                "secret": secret,
            },
        )

    return await idempotent_local(request, services, OPERATOR, work)


# -- keys ----------------------------------------------------------------------------------------


@router.get("/{merchant_id}/keys", responses=PROBLEMS)
async def list_keys(merchant_id: str, services: ServicesDep) -> dict[str, Any]:
    """Every key of the merchant, newest first: prefix (never the secret), scopes, status,
    created, expires (a rolled key), revoked, last used (to the minute)."""
    found = await keys.list_keys(services.db, merchant_id)
    return {"object": "list", "data": found, "has_more": False}


@router.get("/{merchant_id}/keys/audit", responses=PROBLEMS)
async def key_audit(
    merchant_id: str, services: ServicesDep, limit: Limit = DEFAULT_LIMIT
) -> dict[str, Any]:
    """The merchant's key changes, newest first: who (cli, operator, serve), what, when."""
    await keys.get_merchant(services.db, merchant_id)
    rows = await keys.key_audit(services.db, merchant_id, limit)
    return {"object": "list", "data": rows, "has_more": len(rows) == limit}


@router.post("/{merchant_id}/keys", status_code=201, **POST)
async def create_key(
    merchant_id: str, body: KeyCreate, request: Request, services: ServicesDep
) -> Response:
    """A new key, restricted to `scopes` when given; its `secret` is shown this once."""

    async def work(conn: AsyncConnection) -> Reply:
        document, secret = await keys.create_key_in(
            conn,
            merchant_id,
            actor=ACTOR,
            name=body.name,
            scopes=body.scopes,
            now=services.engine.clock(),
        )
        return _shown_once(201, {**document, "secret": secret})

    return await idempotent_local(request, services, OPERATOR, work)


@router.post("/{merchant_id}/keys/{key_id}/revoke", **POST)
async def revoke_key(
    merchant_id: str, key_id: str, request: Request, services: ServicesDep
) -> Response:
    """Revoke a key: refused at once by this process, by every process within 30 s."""

    revoked: list[str] = []

    async def work(conn: AsyncConnection) -> Reply:
        document, key_hash = await keys.revoke_key_in(
            conn, merchant_id, key_id, actor=ACTOR, now=services.engine.clock()
        )
        revoked.append(key_hash)
        return Reply.json(200, document)

    return await _forgetting(revoked, services, idempotent_local(request, services, OPERATOR, work))


@router.post("/{merchant_id}/keys/{key_id}/roll", status_code=201, **POST)
async def roll_key(
    merchant_id: str,
    key_id: str,
    request: Request,
    services: ServicesDep,
    body: KeyRoll | None = None,
) -> Response:
    """A new key replacing this one (same name and scopes); the old key works on for
    `overlap` seconds (default 0: it stops now). The new `secret` is shown this once."""
    overlap = body.overlap if body is not None else 0

    rolled: list[str] = []

    async def work(conn: AsyncConnection) -> Reply:
        new, secret, old, old_hash = await keys.roll_key_in(
            conn, merchant_id, key_id, actor=ACTOR, overlap=overlap, now=services.engine.clock()
        )
        rolled.append(old_hash)
        return _shown_once(201, {**new, "secret": secret, "rolled": old})

    return await _forgetting(rolled, services, idempotent_local(request, services, OPERATOR, work))


async def _forgetting(
    hashes: list[str], services: Services, answering: Awaitable[Response]
) -> Response:
    """The answer; then this process forgets the keys changed (it re-reads them at their next
    use), once the change has committed: the other processes do within KEY_CACHE_SECONDS."""
    response = await answering
    for key_hash in hashes:
        keys.forget(services, key_hash)
    return response
