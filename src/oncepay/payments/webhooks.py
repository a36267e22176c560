"""Webhooks (SPEC §6): endpoints, the fan-out of events into deliveries, and the delivery worker.

**Outbox.** :func:`fan_out` runs inside the transaction that writes an event, so a delivery row
exists exactly when its event committed, for every enabled endpoint subscribed to its type.

**Delivery** is at least once. A worker claims due deliveries in one statement — on PostgreSQL
``FOR UPDATE SKIP LOCKED``, so several workers never take the same one; on SQLite the claim runs
under the database's single write lock — marking each ``delivering`` with a lock that lapses
and a token. It posts the event signed per Standard Webhooks (``webhook-id`` is the event id,
the same on every attempt; ``webhook-timestamp``; ``webhook-signature``, by the
``standardwebhooks`` package, with the previous secret too during a rotation) and records the
attempt only if its token still holds. A worker that dies between sending and recording leaves
the lock to lapse; the delivery is then sent again with the same ``webhook-id``, which the
receiver helper (``oncepay.webhooks``) de-duplicates.

**Outcomes.** 2xx: succeeded. 410: the endpoint is disabled and its pending deliveries
canceled. Anything else (or no answer): retried after the next step of the schedule
(``Settings.webhook_schedule``, about three days in all), with
±10% jitter; when the schedule is spent the delivery is ``dead`` (dead-lettered) and stays
visible through the API, where it can be redelivered.

**Public addresses only** (unless ``Settings.webhook_allow_private``): a merchant's URL is
fetched from inside our network, so one naming 127.0.0.1, 10.0.0.0/8 or the cloud metadata
address 169.254.169.254 would turn the worker into a proxy onto internal services (SSRF). A
URL whose host is such an address, or ``localhost``, is refused when it is registered (400).
A host name is resolved before every attempt; if any of its addresses is not public the attempt
fails without a byte sent, and otherwise the request goes to the checked address itself (with
the original ``Host`` header and TLS server name), so a name that resolves differently a moment
later (DNS rebinding) cannot redirect it.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import random
import secrets
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.http._cookies import NoCookies
from oncepay.payments.context import Services
from oncepay.payments.db import read, write
from oncepay.payments.errors import InvalidRequest
from oncepay.payments.ids import new_id
from oncepay.payments.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_LATENCY
from oncepay.payments.schema import (
    events,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from oncepay.webhooks import sign

__all__ = [
    "DeliveryReport",
    "deliver_due",
    "delivery_client",
    "fan_out",
    "new_secret",
    "validate_url",
]

log = logging.getLogger("oncepay.webhooks")

JITTER = 0.1  # ±10%, so endpoints that failed together do not all retry in the same second
# One attempt may take this long; a receiver should answer in a second or two and queue work.
DELIVERY_TIMEOUT = 10.0
# A claimed delivery's lock: outlasts one attempt with room to record it, so a live worker
# never loses it; a dead worker's deliveries go out again this long after it died.
LOCK_SECONDS = 3 * DELIVERY_TIMEOUT
CLAIM_BATCH = 50
# Deliveries of one pass are sent this many at a time: one slow endpoint delays its own
# deliveries, not everyone else's.
SEND_CONCURRENCY = 10
# During a rotation the old secret keeps signing this long by default: a day to deploy the new.
DEFAULT_OVERLAP = 24 * 3600.0
MAX_URL = 2048
ERROR_LIMIT = 500  # characters of an error kept per attempt


def new_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and 24 random bytes in base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: IPAddress) -> bool:
    """Whether webhooks may be sent to ``address``: a global unicast address, not loopback,
    private (RFC 1918, fc00::/7), link-local (169.254/16: cloud metadata), shared (100.64/10),
    multicast, reserved or unspecified. IPv4 inside IPv6 (``::ffff:10.0.0.1``) counts as the
    IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:
            address = inner
    return address.is_global and not (
        address.is_multicast or address.is_reserved or address.is_unspecified
    )


def _literal(host: str) -> IPAddress | None:
    """The address ``host`` names literally, if it is one: also the legacy IPv4 forms that
    resolvers accept (``127.1``, ``0x7f.1``, ``2130706433``), a classic way round a check that
    knows only the dotted quad."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def validate_url(url: str, *, allow_private: bool = False) -> str:
    """http(s), a host, no credentials, a public address (unless ``allow_private``): anything
    else is a clear 400."""
    if len(url) > MAX_URL:
        raise InvalidRequest(f"url: at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise InvalidRequest(f"url: {exc}") from None
    if parts.scheme not in {"http", "https"}:
        raise InvalidRequest("url: only http and https URLs can receive webhooks")
    if not parts.hostname:
        raise InvalidRequest("url: a host is required")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequest("url: must not contain credentials; authenticate by signature")
    if not url.isascii() or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidRequest(
            "url: must be ASCII without whitespace or control characters "
            "(write an international host in its xn-- form)"
        )
    try:
        httpx.URL(url).host.encode("idna")  # what the sender will do with it, refused now
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InvalidRequest(f"url: {exc}") from None
    if not allow_private:
        host = parts.hostname.rstrip(".").lower()
        address = _literal(host)
        if (
            host == "localhost"
            or host.endswith(".localhost")
            or (address is not None and not is_public(address))
        ):
            raise InvalidRequest(
                f"url: {parts.hostname} is not a public address; webhooks go to public "
                "addresses only (a development server can set ONCEPAY_WEBHOOK_ALLOW_PRIVATE)"
            )
    del port
    return url


def subscribed(endpoint_events: str, event_type: str) -> bool:
    wanted = json.loads(endpoint_events)
    return "*" in wanted or event_type in wanted


# -- the outbox's fan-out ------------------------------------------------------------------------


async def fan_out(
    conn: AsyncConnection, *, merchant_id: str, event_id: str, event_type: str, now: float
) -> int:
    """Queue the event for every enabled endpoint of the merchant that wants its type."""
    endpoints = await _endpoints_in(conn, merchant_id)
    targets = [endpoint_id for endpoint_id, types in endpoints if subscribed(types, event_type)]
    if targets:
        await conn.execute(
            webhook_deliveries.insert(),
            [_delivery(merchant_id, event_id, endpoint_id, now) for endpoint_id in targets],
        )
    return len(targets)


async def _endpoints_in(conn: AsyncConnection, merchant_id: str) -> list[tuple[str, Any]]:
    """The merchant's enabled endpoints, read once per transaction: a payment writes three
    events in one transaction, and every one of them fans out to the same endpoints (an
    endpoint created meanwhile commits before or after the whole transaction, never between
    two of its events)."""
    transaction = conn.sync_connection.get_transaction() if conn.sync_connection else None
    kept = conn.info.get(_ENDPOINTS_KEY)
    if kept is not None and kept[0] is transaction and kept[1] == merchant_id:
        return kept[2]  # type: ignore[no-any-return]
    rows = await conn.execute(
        select(webhook_endpoints.c.id, webhook_endpoints.c.events).where(
            webhook_endpoints.c.merchant_id == merchant_id,
            webhook_endpoints.c.disabled.is_(False),
            webhook_endpoints.c.deleted.is_(False),
        )
    )
    endpoints = [(row.id, row.events) for row in rows]
    conn.info[_ENDPOINTS_KEY] = (transaction, merchant_id, endpoints)
    return endpoints


_ENDPOINTS_KEY = "oncepay.webhook_endpoints"


def _delivery(merchant_id: str, event_id: str, endpoint_id: str, now: float) -> dict[str, Any]:
    return {
        "id": new_id("whd"), "merchant_id": merchant_id, "event_id": event_id,
        "endpoint_id": endpoint_id, "status": "pending", "attempts": 0,
        "next_attempt_at": now, "created_at": now, "updated_at": now,
    }  # fmt: skip


async def redeliver(
    conn: AsyncConnection, *, merchant_id: str, event_id: str, endpoint_id: str | None
) -> list[str]:
    """New deliveries of an event: to one endpoint, or to every enabled subscriber."""
    event = (await conn.execute(select(events).where(events.c.id == event_id))).one()
    query = select(webhook_endpoints).where(
        webhook_endpoints.c.merchant_id == merchant_id,
        webhook_endpoints.c.disabled.is_(False),
        webhook_endpoints.c.deleted.is_(False),
    )
    if endpoint_id is not None:
        query = query.where(webhook_endpoints.c.id == endpoint_id)
    targets = [row.id for row in await conn.execute(query)
               if endpoint_id is not None or subscribed(row.events, event.type)]  # fmt: skip
    if endpoint_id is not None and not targets:
        raise InvalidRequest(f"endpoint: no enabled webhook endpoint {endpoint_id!r}")
    now = time.time()
    rows = [_delivery(merchant_id, event_id, target, now) for target in targets]
    if rows:
        await conn.execute(webhook_deliveries.insert(), rows)
    return [row["id"] for row in rows]


# -- delivery ------------------------------------------------------------------------------------


@dataclass
class DeliveryReport:
    results: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.results.values())


@dataclass(frozen=True, slots=True)
class _Claimed:
    id: str
    event_id: str
    endpoint_id: str
    attempts: int
    token: str


async def claim_due(svc: Services, *, now: float, limit: int = CLAIM_BATCH) -> list[_Claimed]:
    """Take due deliveries (and ones whose worker went away) for this worker, in one statement."""
    d = webhook_deliveries.c
    token = secrets.token_hex(8)
    due = (
        select(d.id)
        .where(or_(and_(d.status == "pending", d.next_attempt_at <= now),
                   and_(d.status == "delivering", d.locked_until <= now)))
        .order_by(d.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )  # fmt: skip
    async with write(svc.db) as conn:
        rows = await conn.execute(
            update(webhook_deliveries)
            .where(d.id.in_(due.scalar_subquery()))
            .values(status="delivering", locked_until=now + LOCK_SECONDS, lock_token=token,
                    updated_at=now)
            .returning(d.id, d.event_id, d.endpoint_id, d.attempts)
        )  # fmt: skip
        return [_Claimed(r.id, r.event_id, r.endpoint_id, r.attempts, token) for r in rows]


class Resolver(Protocol):
    async def __call__(self, host: str, port: int) -> list[str]: ...


class NotPublic(Exception):
    """The URL's host resolves to an address webhooks must not be sent to."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, by the system's resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def public_target(
    url: str, resolver: Resolver = resolve
) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """Where to send a delivery to ``url``: its URL with the host replaced by a checked public
    address, the ``Host`` header to send, and the TLS server name (the request extensions).
    Raises :class:`NotPublic` when any address of the host is not public."""
    target = httpx.URL(url)
    host = target.host
    address = _literal(host)
    if address is not None:
        addresses = [str(address)]
    else:
        port = target.port or (443 if target.scheme == "https" else 80)
        addresses = await resolver(host, port)
        if not addresses:
            raise NotPublic(f"{host} resolves to no address")
    bad = [a for a in addresses if (parsed := _literal(a)) is None or not is_public(parsed)]
    if bad:
        raise NotPublic(f"{host} resolves to {', '.join(bad)}, not a public address")
    return pinned(target, addresses[0])


def pinned(target: httpx.URL, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """``target`` sent to ``address``: the URL with that host, the ``Host`` header of the
    original, and for https the original name as TLS server name, which the certificate is
    verified against."""
    host = target.host
    netloc = host if target.port is None else f"{host}:{target.port}"
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return target.copy_with(host=address), {"host": netloc}, extensions


def delivery_client() -> httpx.AsyncClient:
    """The worker's HTTP client for deliveries. It never follows a redirect: a public URL could
    otherwise bounce a delivery to an internal address, past every check above. It keeps no
    cookies: one client serves every merchant, and a cookie one endpoint set must never reach
    another (nor come back to the endpoint that set it: a delivery carries nothing but the
    event)."""
    return httpx.AsyncClient(follow_redirects=False, cookies=NoCookies())


async def deliver_due(
    svc: Services,
    client: httpx.AsyncClient,
    *,
    now: float | None = None,
    limit: int = CLAIM_BATCH,
) -> DeliveryReport:
    """One pass: claim what is due (at most ``limit``), send each (a few at a time), record
    each outcome. ``now`` is the pass's clock for what is due; each attempt is signed, locked
    and scheduled by the clock at the moment it is sent."""
    report = DeliveryReport()
    now = time.time() if now is None else now
    gate = asyncio.Semaphore(SEND_CONCURRENCY)

    async def one(claimed: _Claimed) -> None:
        async with gate:
            report.results[await _deliver(svc, client, claimed, now)] += 1

    await asyncio.gather(*(one(c) for c in await claim_due(svc, now=now, limit=limit)))
    return report


async def _deliver(svc: Services, client: httpx.AsyncClient, claimed: _Claimed, now: float) -> str:
    async with read(svc.db) as conn:
        event = (await conn.execute(select(events).where(events.c.id == claimed.event_id))).one()
        endpoint = (
            await conn.execute(
                select(webhook_endpoints).where(webhook_endpoints.c.id == claimed.endpoint_id)
            )
        ).one()
    if endpoint.disabled or endpoint.deleted:
        return await _finish(svc, claimed, now, status="canceled", error="endpoint disabled")
    sent_at = max(now, time.time())
    if not await _renew(svc, claimed, sent_at):
        return "lost"  # the lock lapsed while this delivery waited its turn: another has it
    payload = event_payload(event)
    started = time.perf_counter()
    try:
        headers = signed_headers(endpoint, event.id, payload, sent_at)
        target: httpx.URL | str = endpoint.url
        extensions: dict[str, Any] = {}
        if not svc.settings.webhook_allow_private:
            target, host, extensions = await public_target(endpoint.url)
            headers.update(host)
        response = await client.post(target, content=payload, headers=headers,
                                     timeout=DELIVERY_TIMEOUT, extensions=extensions)  # fmt: skip
        code, error = response.status_code, None
    except Exception as exc:  # any failure to send is a failed attempt, never a stuck worker
        code, error = None, f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
    latency = (time.perf_counter() - started) * 1000
    WEBHOOK_LATENCY.observe(latency / 1000)
    return await _record(svc, claimed, max(now, time.time()), code, error, latency)


async def _renew(svc: Services, claimed: _Claimed, at: float) -> bool:
    """Extend this worker's lock to cover the attempt about to be made."""
    async with write(svc.db) as conn:
        result = await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == claimed.id,
                   webhook_deliveries.c.lock_token == claimed.token,
                   webhook_deliveries.c.status == "delivering")
            .values(locked_until=at + LOCK_SECONDS)
        )  # fmt: skip
        return bool(result.rowcount)


def event_payload(event: Any) -> bytes:
    document = {
        "id": event.id,
        "object": "event",
        "type": event.type,
        "created": int(event.created_at),
        "data": {"object": json.loads(event.data)},
    }
    return json.dumps(document, separators=(",", ":")).encode()


def signed_headers(endpoint: Any, webhook_id: str, payload: bytes, now: float) -> dict[str, str]:
    timestamp = int(now)
    keys = [endpoint.secret]
    if endpoint.previous_secret and (endpoint.previous_secret_expires_at or 0) > now:
        keys.append(endpoint.previous_secret)
    return {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(sign(k, webhook_id, timestamp, payload) for k in keys),
        "user-agent": "OncePay-Webhooks/1",
    }


async def _record(
    svc: Services, claimed: _Claimed, now: float, code: int | None, error: str | None,
    latency: float,
) -> str:  # fmt: skip
    attempt, schedule = claimed.attempts + 1, svc.settings.webhook_schedule
    if code is not None and 200 <= code < 300:
        status, result = "succeeded", "succeeded"
    elif code == 410:
        status, result = "canceled", "gone"
    elif attempt > len(schedule):
        status, result = "dead", "dead"
    else:
        status, result = "pending", "retry"
    WEBHOOK_ATTEMPTS.labels(result).inc()
    step = schedule[min(attempt, len(schedule)) - 1]
    delay = step * random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter, not secrets
    async with write(svc.db) as conn:
        changed = await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == claimed.id,
                   webhook_deliveries.c.lock_token == claimed.token)
            .values(status=status, attempts=attempt, next_attempt_at=now + delay,
                    locked_until=None, lock_token=None, last_status_code=code,
                    last_error=error, updated_at=time.time())
        )  # fmt: skip
        if not changed.rowcount:
            return "lost"  # our lock lapsed and another worker took over: its word counts
        await conn.execute(webhook_attempts.insert().values(
            delivery_id=claimed.id, attempt=attempt, status_code=code, latency_ms=latency,
            error=error, created_at=time.time(),
        ))  # fmt: skip
        if code == 410:
            await _disable(conn, claimed.endpoint_id, "the endpoint answered 410 Gone")
    return result


async def _finish(svc: Services, claimed: _Claimed, now: float, *, status: str, error: str) -> str:
    async with write(svc.db) as conn:
        await conn.execute(
            update(webhook_deliveries)
            .where(webhook_deliveries.c.id == claimed.id,
                   webhook_deliveries.c.lock_token == claimed.token)
            .values(status=status, locked_until=None, lock_token=None, last_error=error,
                    updated_at=now)
        )  # fmt: skip
    return status


async def _disable(conn: AsyncConnection, endpoint_id: str, reason: str) -> None:
    now = time.time()
    await conn.execute(
        update(webhook_endpoints)
        .where(webhook_endpoints.c.id == endpoint_id)
        .values(disabled=True, disabled_reason=reason, updated_at=now)
    )
    await conn.execute(
        update(webhook_deliveries)
        .where(webhook_deliveries.c.endpoint_id == endpoint_id,
               webhook_deliveries.c.status == "pending")
        .values(status="canceled", last_error=reason, updated_at=now)
    )  # fmt: skip
