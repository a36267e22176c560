"""Receiving OncePay's webhooks: verify the Standard Webhooks signature, then make handling
idempotent by ``webhook-id`` on any OncePay store — so a redelivered event is processed once.

    receiver = WebhookReceiver("whsec_…", store="sqlite:///webhooks.db")

    async with receiver.receive(body, headers) as delivery:
        if not delivery.duplicate:
            handle(delivery.event)          # an exception here releases the id: the retry runs

With FastAPI, ``Annotated[Delivery, Depends(receiver.dependency)]`` does the same around a
route (docs/webhooks.md). Signatures are computed by the ``standardwebhooks`` package; the
timestamp tolerance is ours, so it can be set (default five minutes, the spec's).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from oncepay.errors import ClientError, LeaseLost, RequestInProgress
from oncepay.idempotency.engine import Engine, Execute, InProgress, Replay
from oncepay.idempotency.keys import fingerprint
from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.stores import Store

__all__ = ["DEFAULT_TOLERANCE", "Delivery", "InvalidWebhook", "WebhookReceiver", "sign", "verify"]

# Standard Webhooks' own tolerance: wide enough for clock skew and a queued delivery, narrow
# enough that a captured request cannot be replayed much later.
DEFAULT_TOLERANCE = 300.0
# Seen ids are kept longer than OncePay retries a delivery (about three days), so a last retry
# is still recognised.
DEFAULT_DEDUPE_TTL = 4 * 24 * 3600.0
# How long one handler may hold an id before a redelivery may run it again.
DEFAULT_HANDLER_LEASE = 60.0
SCOPE = "oncepay-webhooks"


class InvalidWebhook(ClientError):
    status = 400
    code = "webhook_invalid"
    title = "The webhook signature or headers are invalid"


def sign(secret: str, webhook_id: str, timestamp: int, payload: bytes) -> str:
    """The ``v1,<base64>`` signature of a payload (the sender's side)."""
    from standardwebhooks.webhooks import Webhook

    when = datetime.fromtimestamp(timestamp, tz=UTC)
    signature: str = Webhook(secret).sign(webhook_id, when, payload.decode())
    return signature


def verify(
    payload: bytes,
    headers: Mapping[str, str],
    secret: str | Sequence[str],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> dict[str, Any]:
    """The event a signed delivery carries; :class:`InvalidWebhook` if any check fails.

    ``secret`` may list several secrets (during a rotation); any one of them may match.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    webhook_id = lower.get("webhook-id")
    stamp = lower.get("webhook-timestamp")
    signatures = lower.get("webhook-signature")
    if not (webhook_id and stamp and signatures):
        raise InvalidWebhook("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise InvalidWebhook("webhook-timestamp is not a number of seconds") from None
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        raise InvalidWebhook(f"webhook-timestamp is more than {tolerance:.0f} s away from now")
    secrets = [secret] if isinstance(secret, str) else list(secret)
    # A signature is base64; anything else (a forged header with other bytes) cannot match.
    offered = [
        s.partition(",")[2] for s in signatures.split() if s.startswith("v1,") and s.isascii()
    ]
    for candidate in secrets:
        expected = sign(candidate, webhook_id, timestamp, payload).partition(",")[2]
        if any(hmac.compare_digest(expected, given) for given in offered):
            return _parse(payload)
    raise InvalidWebhook("no signature matches")


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        event = json.loads(payload)
    except ValueError:
        raise InvalidWebhook("the payload is not JSON") from None
    if not isinstance(event, dict):
        raise InvalidWebhook("the payload is not a JSON object")
    return event


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook_id: str
    event: dict[str, Any]
    duplicate: bool  # already handled: acknowledge it and do nothing


class WebhookReceiver:
    """Verifies deliveries and hands each ``webhook-id`` to the handler once."""

    def __init__(
        self,
        secret: str | Sequence[str],
        store: Store | str = "memory://",
        *,
        tolerance: float = DEFAULT_TOLERANCE,
        ttl: float = DEFAULT_DEDUPE_TTL,
        lease: float = DEFAULT_HANDLER_LEASE,
    ) -> None:
        self.secret = secret
        self.tolerance = tolerance
        self.engine = Engine.for_store(store, ttl=ttl, lease=lease)

    @asynccontextmanager
    async def receive(
        self, payload: bytes, headers: Mapping[str, str], *, now: float | None = None
    ) -> AsyncIterator[Delivery]:
        event = verify(payload, headers, self.secret, tolerance=self.tolerance, now=now)
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        decision = await self.engine.begin(SCOPE, webhook_id, fingerprint("POST", "", payload))
        if isinstance(decision, Replay):
            yield Delivery(webhook_id, event, duplicate=True)
            return
        if isinstance(decision, InProgress):
            raise RequestInProgress("this webhook-id is being handled; deliver it again later")
        if not isinstance(decision, Execute):
            raise InvalidWebhook("this webhook-id came before with another payload")
        try:
            yield Delivery(webhook_id, event, duplicate=False)
        except BaseException:
            await self.engine.release(decision.ticket)
            raise
        try:
            await self.engine.complete(decision.ticket, StoredResponse(200))
        except LeaseLost:
            # The handler outlived its lease and a redelivery took the id over: that one
            # records it. The handler did run; raising now would only make the sender retry.
            return

    @property
    def dependency(self) -> Any:
        """A FastAPI dependency: the verified, de-duplicated delivery; 400 for a bad
        signature, 409 while the same id is being handled elsewhere. The id counts as handled
        once the route returns; an exception in the route lets a redelivery run it again."""
        from starlette.exceptions import HTTPException
        from starlette.requests import Request

        async def delivery(request: Request) -> AsyncIterator[Delivery]:
            body = await request.body()
            try:
                async with self.receive(body, dict(request.headers)) as received:
                    yield received
            except (InvalidWebhook, RequestInProgress) as exc:
                # FastAPI's own handler answers {"detail": ...}: with this type it is an RFC
                # 9457 problem (every member is optional), whatever handlers the app has.
                problem = {"content-type": "application/problem+json"}
                raise HTTPException(exc.status, exc.detail, headers=problem) from exc

        # FastAPI reads annotations to inject parameters; this module's are strings naming
        # a class it imports lazily (to need no web framework), so give it the class itself.
        delivery.__annotations__ = {"request": Request, "return": AsyncIterator[Delivery]}
        return delivery

    async def aclose(self) -> None:
        await self.engine.store.aclose()
