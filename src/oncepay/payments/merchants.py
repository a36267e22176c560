"""Merchants and their API keys: creating them, and authenticating a request by its key."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments.context import Services
from oncepay.payments.errors import AuthenticationFailed
from oncepay.payments.records import Merchant
from oncepay.payments.storage.schema import api_keys, merchants
from oncepay.storage.db import Database, read, write
from oncepay.storage.ids import new_id

__all__ = [
    "Merchant",
    "add_api_key",
    "authenticate",
    "create_merchant",
    "find_merchant",
    "issue_test_key",
]

# Live keys start with sk_test_ while the acquirers are simulated; 24 random bytes (192 bits)
# make guessing hopeless, which is also why one SHA-256 (not a slow KDF) is the right hash.
KEY_PREFIX = "sk_test_"
KEY_BYTES = 24
# A process remembers a key it checked this long: a revoked key stops working within this
# time everywhere, and a busy merchant's requests skip one database read each.
KEY_CACHE_SECONDS = 30.0
TEST_MERCHANT = "Test merchant"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


async def create_merchant(db: Database, name: str) -> tuple[Merchant, str]:
    """A new merchant and its first API key (returned once; only its hash is kept)."""
    merchant = Merchant(new_id("mer"), name)
    async with write(db) as conn:
        await conn.execute(
            merchants.insert().values(id=merchant.id, name=name, created_at=time.time())
        )
        api_key = await _add_key(conn, merchant.id)
    return merchant, api_key


async def add_api_key(db: Database, merchant_id: str) -> str:
    async with write(db) as conn:
        return await _add_key(conn, merchant_id)


async def _add_key(conn: AsyncConnection, merchant_id: str) -> str:
    api_key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    await conn.execute(
        api_keys.insert().values(
            id=new_id("key"),
            merchant_id=merchant_id,
            key_hash=hash_key(api_key),
            prefix=api_key[: len(KEY_PREFIX) + 4],
            created_at=time.time(),
        )
    )
    return api_key


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


async def issue_test_key(db: Database, name: str = TEST_MERCHANT) -> tuple[Merchant, str]:
    """A fresh API key for the test merchant, created on first use (``oncepay serve`` with the
    embedded acquirer hands one out at every start)."""
    merchant = await find_merchant(db, name)
    if merchant is None:
        return await create_merchant(db, name)
    return merchant, await add_api_key(db, merchant.id)


async def authenticate(svc: Services, authorization: str | None) -> Merchant:
    """The merchant whose API key ``authorization`` carries (``Bearer <key>``)."""
    if not authorization:
        raise AuthenticationFailed("send your API key as 'Authorization: Bearer sk_test_…'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("use 'Authorization: Bearer <api key>'", code="invalid_api_key")
    digest, now = hash_key(token.strip()), time.monotonic()
    cached = svc.known_keys.get(digest)
    if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
        return cached[0]
    svc.known_keys.pop(digest, None)
    merchant = await _lookup_key(svc.db, digest)
    svc.known_keys[digest] = (merchant, now)
    return merchant


async def _lookup_key(db: Database, digest: str) -> Merchant:
    async with read(db) as conn:
        row = (
            await conn.execute(
                select(merchants.c.id, merchants.c.name)
                .join(api_keys, api_keys.c.merchant_id == merchants.c.id)
                .where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
            )
        ).first()
    if row is None:
        raise AuthenticationFailed("this API key is not valid", code="invalid_api_key")
    return Merchant(row.id, row.name)
