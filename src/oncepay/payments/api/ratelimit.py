"""Rate limits per API key and per merchant (docs/payments-api.md, "Rate limits"), counted by
the ``limits`` library: a sliding window counter, in this process's memory, or in Redis when
``redis_url`` is set so that every API process shares one count.

The check runs once the caller is authenticated and before the idempotency layer claims the
request's key, so a 429 stores nothing: the same request sent again after the window runs
normally. A 429 is problem+json with ``Retry-After`` and the ``RateLimit-Policy`` and
``RateLimit`` fields of draft-ietf-httpapi-ratelimit-headers (structured-field lists of
named policies: ``"key";q=100;w=1`` and ``"key";r=0;t=1``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import FastAPI, Request
from fastapi.responses import Response
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError

from oncepay.errors import ConfigurationError
from oncepay.payments.api.deps import problem_response
from oncepay.payments.errors import RateLimited
from oncepay.payments.settings import Settings

__all__ = ["Policy", "RateLimits", "add_rate_limit_handler", "parse_rate"]

log = logging.getLogger("oncepay.payments")

# The counters' keys in Redis: the idempotency records' prefix, then this.
REDIS_PREFIX = "ratelimit"


def parse_rate(text: str) -> RateLimitItem:
    """``100/second``, ``6000/minute``, ``10 per 2 seconds``: limits' notation, one rate."""
    try:
        return parse(text)
    except ValueError as exc:
        raise ConfigurationError(f"rate limit {text!r}: {exc} (e.g. '100/second')") from None


@dataclass(frozen=True, slots=True)
class Policy:
    """One limit: its name in the RateLimit fields, and its rate."""

    name: str
    rate: RateLimitItem

    @property
    def window(self) -> int:
        return int(self.rate.get_expiry())

    def field(self) -> str:
        """The policy as a RateLimit-Policy list member: ``"key";q=100;w=1``."""
        return f'"{self.name}";q={self.rate.amount};w={self.window}'


class RateLimits:
    """The configured policies over one storage. With no policy, :meth:`check` does nothing."""

    def __init__(
        self, per_key: RateLimitItem | None, per_merchant: RateLimitItem | None, storage: Storage
    ) -> None:
        self.policies = tuple(
            Policy(name, rate)
            for name, rate in (("key", per_key), ("merchant", per_merchant))
            if rate is not None
        )
        self.storage = storage
        self.limiter = SlidingWindowCounterRateLimiter(storage)
        self.policy_field = ", ".join(p.field() for p in self.policies)

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        per_key = parse_rate(settings.rate_limit_per_key) if settings.rate_limit_per_key else None
        per_merchant = (
            parse_rate(settings.rate_limit_per_merchant)
            if settings.rate_limit_per_merchant
            else None
        )
        return cls(per_key, per_merchant, storage_for(settings.redis_url))

    @property
    def enabled(self) -> bool:
        return bool(self.policies)

    async def check(self, key_id: str, merchant_id: str) -> None:
        """Count one request, the key's policy first; 429 ``rate_limited`` at the first policy
        with no room left. A request the key's own limit refuses is not counted against the
        merchant, so one runaway key does not use up its sibling keys' share."""
        for policy in self.policies:
            subject = key_id if policy.name == "key" else merchant_id
            try:
                allowed = await self.limiter.hit(policy.rate, policy.name, subject)
            except StorageError as exc:
                # Redis down: serve unlimited rather than refuse every request (the limits
                # protect the service; they are not what makes a payment correct).
                log.warning("rate limits: request not counted, storage unavailable (%s)", exc)
                allowed = True
            if not allowed:
                raise await self._refusal(policy, subject)

    async def _refusal(self, policy: Policy, subject: str) -> RateLimited:
        stats = await self.limiter.get_window_stats(policy.rate, policy.name, subject)
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        headers = (
            ("ratelimit-policy", self.policy_field),
            ("ratelimit", f'"{policy.name}";r=0;t={wait}'),
        )
        return RateLimited(
            f"more than {policy.rate.amount} requests per {_window(policy)} for this "
            f"{'API key' if policy.name == 'key' else 'merchant'}; retry after {wait} s",
            retry_after=wait,
            headers=headers,
        )

    async def aclose(self) -> None:
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        if client is not None:  # redis-py's client under limits' bridge: its pool
            await client.aclose()


def _window(policy: Policy) -> str:
    seconds = policy.window
    return "second" if seconds == 1 else f"{seconds} seconds"


def storage_for(redis_url: str | None) -> Storage:
    """Redis when configured (shared by every process), else this process's memory. The
    URL's ``?prefix=`` (the idempotency records' key prefix) prefixes the counters too."""
    if redis_url is None:
        return MemoryStorage()
    parts = urlsplit(redis_url)
    options = dict(parse_qsl(parts.query))
    prefix = options.pop("prefix", "oncepay:")
    plain = urlunsplit(parts._replace(query=urlencode(options)))
    return RedisStorage(
        f"async+{plain}",
        implementation="redispy",
        key_prefix=f"{prefix}{REDIS_PREFIX}",
        wrap_exceptions=True,
    )


def add_rate_limit_handler(app: FastAPI) -> None:
    """A 429 is the problem every error is, plus its RateLimit fields."""

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> Response:
        response = problem_response(exc)
        for name, value in exc.headers:
            response.headers[name] = value
        return response
