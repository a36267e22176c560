"""Start-up: a payments process's :class:`~oncepay.payments.context.Services`, wired from its
settings — the database (migrated), the idempotency engine on the same database (queued behind
SQLite's one writer, with Redis in front when configured), the HTTP gate, and the acquirers:
the embedded simulator (in-process, on its own database) when no URL is set, else one client
per configured URL."""

from __future__ import annotations

import logging

from oncepay.http.gate import Gate
from oncepay.idempotency.engine import Engine
from oncepay.insight.ttl_policy import TtlPolicy
from oncepay.insight.usage_log import UsageLog
from oncepay.payments.acquirers.base import Acquirer
from oncepay.payments.acquirers.breaker import breaker_for
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.context import Services
from oncepay.payments.metrics import ADAPTIVE_TTL_KEY_SECONDS, watch_usage_log
from oncepay.payments.settings import Settings
from oncepay.payments.storage.idempotency import idempotency_store
from oncepay.payments.storage.migrations import migrate
from oncepay.storage.db import Database

__all__ = ["build_acquirers", "lease_warning", "start"]

log = logging.getLogger("oncepay.payments")


async def start(settings: Settings, acquirers: AcquirerPool | None = None) -> Services:
    """Everything a payments process needs, ready; ``acquirers`` replaces the configured ones."""
    policy = ttl_policy(settings)  # first: a file that cannot be used leaves nothing open
    if (warning := lease_warning(settings)) is not None:
        log.warning(warning)
    db = Database.from_url(settings.database_url)
    await migrate(db)
    store = await idempotency_store(db, settings.redis_url)
    engine = Engine(store, ttl=settings.key_ttl, lease=settings.lease)
    usage_log = UsageLog(settings.usage_log) if settings.usage_log else None
    if usage_log is not None:
        watch_usage_log(usage_log)  # its counts in /metrics
    gate = Gate(engine, methods=("POST",), required=True, usage_log=usage_log, ttl_policy=policy)
    pool = acquirers or build_acquirers(settings)
    return Services(settings, db, engine, gate, pool, ttl_policy=policy)


def lease_warning(settings: Settings) -> str | None:
    """What to say when the lease is shorter than an acquirer call may take (every attempt at
    its timeout, on each acquirer): a request still waiting on the acquirer then loses its key
    to a retry, which answers 409 ``idempotency_lease_lost`` until the first finishes. Money
    stays right (fencing); the service just works badly. None when the lease is long enough."""
    acquirers = 2 if settings.secondary_acquirer_url else 1
    slowest = settings.acquirer_timeout * settings.acquirer_attempts * acquirers
    if settings.lease >= slowest:
        return None
    return (
        f"ONCEPAY_LEASE ({settings.lease:g} s) is shorter than an acquirer call may take "
        f"({slowest:g} s: {settings.acquirer_attempts} attempts of {settings.acquirer_timeout:g} s"
        f"{' on each of 2 acquirers' if acquirers == 2 else ''}): a request still at the acquirer "
        "can lose its key to a retry, which then answers 409 idempotency_lease_lost; set the "
        "lease well above it (default 60 s)"
    )


def ttl_policy(settings: Settings) -> TtlPolicy | None:
    """The learned TTLs when ``adaptive_ttl`` is on (from ``adaptive_ttl_file`` if set; a
    file that cannot be used stops the start-up), counted in /metrics; None when off."""
    if not settings.adaptive_ttl:
        return None
    policy = TtlPolicy(
        minimum=settings.adaptive_ttl_min,
        maximum=settings.adaptive_ttl_max,
        fallback=settings.key_ttl,
        on_stored=_count_key_seconds,
    )
    if settings.adaptive_ttl_file:
        policy.load(settings.adaptive_ttl_file)
    return policy


def _count_key_seconds(learned: float, fixed: float) -> None:
    ADAPTIVE_TTL_KEY_SECONDS.labels("learned").inc(learned)
    ADAPTIVE_TTL_KEY_SECONDS.labels("fixed").inc(fixed)


def build_acquirers(settings: Settings) -> AcquirerPool:
    timeout, attempts = settings.acquirer_timeout, settings.acquirer_attempts
    control = RetryControl.from_settings(settings)
    found: list[Acquirer] = []
    if settings.acquirer_url is None:
        # The service extra only: imported when used.
        from oncepay.payments.acquirers.embedded import EmbeddedAcquirer
        from oncepay.simulator import create_app

        app = create_app(settings.acquirer_database_url)
        found.append(
            EmbeddedAcquirer(  # called as a function, not through an in-process HTTP request
                "primary",
                app,
                timeout=timeout,
                attempts=attempts,
                control=control,
                breaker=breaker_for("primary"),
            )
        )
    else:
        found.append(
            HttpAcquirer(
                "primary",
                settings.acquirer_url,
                timeout=timeout,
                attempts=attempts,
                control=control,
                breaker=breaker_for("primary"),
            )
        )
    if settings.secondary_acquirer_url:
        url = settings.secondary_acquirer_url
        found.append(
            HttpAcquirer(
                "secondary",
                url,
                timeout=timeout,
                attempts=attempts,
                control=control,
                breaker=breaker_for("secondary"),
            )
        )
    return AcquirerPool(found)
