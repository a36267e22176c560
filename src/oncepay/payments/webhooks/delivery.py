"""The delivery worker (SPEC §6).

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
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httpx
from sqlalchemy import Update, and_, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.http._cookies import NoCookies
from oncepay.payments import tracing
from oncepay.payments.context import Services
from oncepay.payments.metrics import WEBHOOK_ATTEMPTS, WEBHOOK_LATENCY
from oncepay.payments.models import event_public
from oncepay.payments.records import EndpointRow, EventRow
from oncepay.payments.storage.schema import (
    events,
    webhook_attempts,
    webhook_deliveries,
    webhook_endpoints,
)
from oncepay.payments.webhooks.addresses import public_target
from oncepay.storage.db import read, write
from oncepay.webhooks import sign

__all__ = [
    "CLAIM_BATCH",
    "DeliveryReport",
    "claim_due",
    "deliver_due",
    "delivery_client",
    "keep_delivering",
]

log = logging.getLogger("oncepay.webhooks")

JITTER = 0.1  # ±10%, so endpoints that failed together do not all retry in the same second
# One attempt may take this long in all, from resolving the host to the answer's last byte
# read: a receiver that answers a byte every few seconds is cut off too (httpx's timeouts are
# per read). A receiver should answer in a second or two and queue its work.
DELIVERY_TIMEOUT = 10.0
# A claimed delivery's lock: outlasts one attempt (bounded above) with room to record it, so a
# live worker never loses it; a dead worker's deliveries go out again this long after it died.
LOCK_SECONDS = 3 * DELIVERY_TIMEOUT
CLAIM_BATCH = 50
# A worker sends this many deliveries at a time, and claims the next one as soon as one is
# done: a slow delivery holds its own slot, not a whole batch.
SEND_CONCURRENCY = 10
# An answer's body is read up to this much (so that its connection can serve the next
# delivery) and otherwise dropped unread: only the status counts.
ANSWER_LIMIT = 64 * 1024
ERROR_LIMIT = 500  # characters of an error kept per attempt


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
    """Take due deliveries (and ones whose worker went away) for this worker, oldest due first,
    at most ``webhook_endpoint_concurrency`` of one endpoint, fewer by what it has in flight
    already: one transaction, the candidates locked as read (on PostgreSQL ``FOR UPDATE SKIP
    LOCKED``, so several workers never take the same one; on SQLite under the database's
    single write lock)."""
    d = webhook_deliveries.c
    token = secrets.token_hex(8)
    cap = svc.settings.webhook_endpoint_concurrency
    in_flight = (
        select(d.endpoint_id, func.count().label("n"))
        .where(d.status == "delivering", d.locked_until > now)
        .group_by(d.endpoint_id)
    )
    counts = in_flight.subquery()
    busy = select(counts.c.endpoint_id).where(counts.c.n >= cap)
    due = (
        select(d.id, d.endpoint_id)
        .where(
            or_(
                and_(d.status == "pending", d.next_attempt_at <= now),
                and_(d.status == "delivering", d.locked_until <= now),
            ),
            d.endpoint_id.not_in(busy),
        )
        .order_by(d.next_attempt_at)
        .limit(limit * 4)  # room to skip an endpoint's backlog beyond its share
        .with_for_update(skip_locked=True)
    )
    async with write(svc.db) as conn:
        rows = (await conn.execute(due)).all()
        flying: Counter[str] = Counter()
        if rows:  # what the endpoints in reach have in flight now (busy ones are left out)
            named = {row.endpoint_id for row in rows}
            counted = in_flight.where(d.endpoint_id.in_(named))
            flying.update({r.endpoint_id: r.n for r in await conn.execute(counted)})
        taken: list[str] = []
        for row in rows:
            if flying[row.endpoint_id] < cap and len(taken) < limit:
                flying[row.endpoint_id] += 1
                taken.append(row.id)
        if not taken:
            return []
        claimed = await conn.execute(
            update(webhook_deliveries)
            .where(d.id.in_(taken))
            .values(
                status="delivering",
                locked_until=now + LOCK_SECONDS,
                lock_token=token,
                updated_at=now,
            )
            .returning(d.id, d.event_id, d.endpoint_id, d.attempts, d.next_attempt_at)
        )
        ordered = sorted(claimed, key=lambda r: r.next_attempt_at)
        return [_Claimed(r.id, r.event_id, r.endpoint_id, r.attempts, token) for r in ordered]


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


async def keep_delivering(
    svc: Services, client: httpx.AsyncClient, stop: asyncio.Event, *, interval: float
) -> None:
    """The worker's delivery loop, until ``stop``: up to :data:`SEND_CONCURRENCY` deliveries in
    flight, a new one claimed as soon as a slot frees (a pass that waited for its slowest send
    held up every other merchant's deliveries behind one slow endpoint); with nothing due, it
    looks again every ``interval`` seconds. Sends still in flight at ``stop`` are canceled:
    their locks lapse and they go out again (at least once, the same ``webhook-id``)."""
    running: set[asyncio.Task[None]] = set()

    async def send(claimed: _Claimed, now: float) -> None:
        try:
            result = await _deliver(svc, client, claimed, now)
            log.debug("webhooks: delivery %s %s", claimed.id, result)
        except Exception:  # the lock lapses and the delivery goes out again
            log.exception("webhooks: delivery %s failed; it is sent again later", claimed.id)

    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            free, claimed = SEND_CONCURRENCY - len(running), []
            if free:
                now = time.time()
                try:
                    claimed = await claim_due(svc, now=now, limit=free)
                except Exception:
                    log.exception("webhooks: claiming due deliveries failed; trying again")
                for one in claimed:
                    task = asyncio.get_running_loop().create_task(send(one, now))
                    running.add(task)
                    task.add_done_callback(running.discard)
            if free and len(claimed) == free:
                await asyncio.sleep(0)  # more may be due: claim again at once if a slot is free
                continue
            # Look again when one of ours is done (a slot freed, and its endpoint has room for
            # one more: a busy endpoint's deliveries follow one another at once), or later.
            await asyncio.wait(
                {stopping, *running}, timeout=interval, return_when="FIRST_COMPLETED"
            )
    finally:
        stopping.cancel()
        for task in list(running):
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def _deliver(svc: Services, client: httpx.AsyncClient, claimed: _Claimed, now: float) -> str:
    async with read(svc.db) as conn:
        found = await conn.execute(select(events).where(events.c.id == claimed.event_id))
        event = cast(EventRow, found.one())
        found = await conn.execute(
            select(webhook_endpoints).where(webhook_endpoints.c.id == claimed.endpoint_id)
        )
        endpoint = cast(EndpointRow, found.one())
    if endpoint.disabled or endpoint.deleted:
        return await _finish(svc, claimed, now, status="canceled", error="endpoint disabled")
    sent_at = max(now, time.time())
    if not await _renew(svc, claimed, sent_at):
        return "lost"  # the lock lapsed while this delivery waited its turn: another has it
    payload = event_payload(event)
    started = time.perf_counter()
    traced = tracing.delivery(  # in the trace of the payment behind the event (tracing on)
        event.traceparent,
        delivery_id=claimed.id,
        event_id=event.id,
        endpoint_id=endpoint.id,
        attempt=claimed.attempts + 1,
    )
    with traced as span:
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT):
                code = await _post(svc, client, endpoint, event.id, payload, sent_at)
            error = None
        except TimeoutError:
            code, error = None, f"no complete answer within {DELIVERY_TIMEOUT:g} s"
        except Exception as exc:  # any failure to send is a failed attempt, never a stuck worker
            code, error = None, f"{type(exc).__name__}: {exc}"[:ERROR_LIMIT]
        tracing.delivered(span, code, error)
    latency = (time.perf_counter() - started) * 1000
    WEBHOOK_LATENCY.observe(latency / 1000)
    return await _record(svc, claimed, max(now, time.time()), code, error, latency)


async def _post(
    svc: Services,
    client: httpx.AsyncClient,
    endpoint: EndpointRow,
    webhook_id: str,
    payload: bytes,
    sent_at: float,
) -> int:
    """Send one attempt; its status code. The answer's body is read up to ANSWER_LIMIT (the
    connection then serves the next delivery) or dropped with its connection: a receiver
    answering with gigabytes costs the worker nothing."""
    headers = signed_headers(endpoint, webhook_id, payload, sent_at)
    target: httpx.URL | str = endpoint.url
    extensions: dict[str, Any] = {}
    if not svc.settings.webhook_allow_private:
        target, host, extensions = await public_target(endpoint.url)
        headers.update(host)
    request = client.build_request(
        "POST",
        target,
        content=payload,
        headers=headers,
        timeout=DELIVERY_TIMEOUT,
        extensions=extensions,
    )
    response = await client.send(request, stream=True)
    try:
        read = 0
        if not response.is_stream_consumed:  # raw bytes: a compressed answer is not inflated
            async for chunk in response.aiter_raw():
                read += len(chunk)
                if read > ANSWER_LIMIT:
                    break
    finally:
        await response.aclose()
    return response.status_code


async def _renew(svc: Services, claimed: _Claimed, at: float) -> bool:
    """Extend this worker's lock to cover the attempt about to be made."""
    async with write(svc.db) as conn:
        result = await conn.execute(
            _held(claimed)
            .where(webhook_deliveries.c.status == "delivering")
            .values(locked_until=at + LOCK_SECONDS)
        )
        return bool(result.rowcount)


def _held(claimed: _Claimed) -> Update:
    """An update of the delivery that applies only while this worker holds its lock: a late
    worker, whose claim another took over, changes nothing."""
    return update(webhook_deliveries).where(
        webhook_deliveries.c.id == claimed.id, webhook_deliveries.c.lock_token == claimed.token
    )


def event_payload(event: EventRow) -> bytes:
    return json.dumps(event_public(event), separators=(",", ":")).encode()


def signed_headers(
    endpoint: EndpointRow, webhook_id: str, payload: bytes, now: float
) -> dict[str, str]:
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
    svc: Services,
    claimed: _Claimed,
    now: float,
    code: int | None,
    error: str | None,
    latency: float,
) -> str:
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
            _held(claimed).values(
                status=status,
                attempts=attempt,
                next_attempt_at=now + delay,
                locked_until=None,
                lock_token=None,
                last_status_code=code,
                last_error=error,
                updated_at=time.time(),
            )
        )
        if not changed.rowcount:
            return "lost"  # our lock lapsed and another worker took over: its word counts
        await conn.execute(
            webhook_attempts.insert().values(
                delivery_id=claimed.id,
                attempt=attempt,
                status_code=code,
                latency_ms=latency,
                error=error,
                created_at=time.time(),
            )
        )
        if code == 410:
            await _disable(conn, claimed.endpoint_id, "the endpoint answered 410 Gone")
    return result


async def _finish(svc: Services, claimed: _Claimed, now: float, *, status: str, error: str) -> str:
    async with write(svc.db) as conn:
        await conn.execute(
            _held(claimed).values(
                status=status, locked_until=None, lock_token=None, last_error=error, updated_at=now
            )
        )
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
        .where(
            webhook_deliveries.c.endpoint_id == endpoint_id,
            webhook_deliveries.c.status == "pending",
        )
        .values(status="canceled", last_error=reason, updated_at=now)
    )
