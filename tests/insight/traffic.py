"""Small hand-made logs for the detector tests: a tenant's normal day, and anomalies planted in
it for a window."""

from __future__ import annotations

import random
from collections.abc import Iterator

from oncepay.insight.records import Usage

T0 = 1_767_225_600.0  # 2026-01-01 00:00 UTC
HOUR = 3600.0
ROUTE = "POST /v1/payments"


def usage(
    at: float,
    key: str,
    decision: str = "executed",
    *,
    tenant: str = "m_1",
    fingerprint: str | None = None,
    status: int = 201,
    source: str = "10.0.0.1",
    ttl: float = 86400.0,
) -> Usage:
    return Usage(at, tenant, ROUTE, key, fingerprint or f"fp-{key}", decision, status, source,
                 ttl)  # fmt: skip


def normal(
    rng: random.Random,
    *,
    tenant: str = "m_1",
    hours: float = 48,
    per_hour: float = 120,
    retry_rate: float = 0.1,
) -> Iterator[Usage]:
    """Payments at a steady pace; some retried with the same key, backing off (a replay)."""
    t = T0
    n = 0
    while True:
        t += rng.expovariate(per_hour / HOUR)
        if t >= T0 + hours * HOUR:
            return
        n += 1
        key = f"{tenant}-k{n}"
        yield usage(t, key, tenant=tenant)
        if rng.random() < retry_rate:
            yield usage(t + rng.uniform(2, 8), key, "replayed", tenant=tenant)


def ordered(*streams: Iterator[Usage]) -> list[Usage]:
    return sorted((u for stream in streams for u in stream), key=lambda u: u.at)


def window(start_hour: float, hours: float = 1.0) -> tuple[float, float]:
    return T0 + start_hour * HOUR, T0 + (start_hour + hours) * HOUR
