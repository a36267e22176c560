"""Adaptive TTL: the retries a tenant sends are covered, records kept no longer than needed,
within bounds; censoring and returns after expiry are taken into account."""

from __future__ import annotations

import random

import pytest

from oncepay.insight.analyzer import analyze
from oncepay.insight.findings import TtlAdvice
from oncepay.insight.records import Usage
from oncepay.insight.ttl import TtlBounds, TtlLearner
from tests.insight.traffic import HOUR, ROUTE, T0, usage


def retried(rng: random.Random, tenant: str, delays: list[float], keys: int = 2000) -> list[Usage]:
    out = []
    for n in range(keys):
        at = T0 + n * 60.0
        key = f"{tenant}-{n}"
        out.append(usage(at, key, tenant=tenant))
        out.append(usage(at + rng.choice(delays), key, "replayed", tenant=tenant))
    return sorted(out, key=lambda u: u.at)


def advice(records: list[Usage], bounds: TtlBounds | None = None) -> dict[str, TtlAdvice]:
    return {a.tenant: a for a in analyze(records, bounds=bounds).ttl()}


def test_a_tenant_retrying_within_seconds_gets_minutes_not_a_day() -> None:
    rng = random.Random(1)
    got = advice(retried(rng, "m_fast", [rng.uniform(1, 30) for _ in range(100)]))["m_fast"]
    assert got.route == ROUTE
    assert 30 <= got.ttl_seconds <= 120
    assert got.basis == 2000


def test_a_tenant_whose_terminals_retry_hours_later_keeps_its_keys_for_hours() -> None:
    rng = random.Random(2)
    records = retried(rng, "m_terminal", [rng.uniform(1, 5) * HOUR for _ in range(100)])
    assert 5 * HOUR <= advice(records)["m_terminal"].ttl_seconds <= 7 * HOUR


def test_learned_ttls_are_held_within_the_bounds() -> None:
    rng = random.Random(3)
    fast = retried(rng, "m_fast", [1.0])
    slow = retried(rng, "m_slow", [3 * 86400.0], keys=500)
    bounds = TtlBounds(minimum=600, maximum=86400, default=3600)
    got = advice(sorted(fast + slow, key=lambda u: u.at), bounds)
    assert got["m_fast"].ttl_seconds == 600
    assert got["m_slow"].ttl_seconds == 86400


def test_a_tenant_with_too_few_retries_gets_the_default() -> None:
    records = [usage(T0 + n, f"k{n}") for n in range(100)]
    assert advice(records, TtlBounds(default=7200)) == {
        "m_1": TtlAdvice("m_1", ROUTE, 7200, 0),
    }


def test_returns_after_expiry_push_the_ttl_up() -> None:
    """Keys stored for an hour come back after two: retries the TTL failed to cover."""
    records = []
    for n in range(300):
        at = T0 + n * 600.0
        records.append(usage(at, f"k{n}", ttl=HOUR))
        records.append(usage(at + 10.0, f"k{n}", "replayed", ttl=HOUR))
        if n % 10 == 0:  # a tenth come back after expiry, two hours on: executed again
            records.append(usage(at + 2 * HOUR, f"k{n}", ttl=HOUR))
    records.sort(key=lambda u: u.at)
    assert advice(records)["m_1"].ttl_seconds >= 2 * HOUR


def test_censoring_long_delays_near_the_end_of_the_log_are_weighted_up() -> None:
    """Half the keys are sent in the log's last hour, so their hour-late retries are unseen:
    uncorrected, the late retries look like 0.6 % and a 99 % coverage would leave them out;
    weighted by the keys watched long enough, they are 1.2 %."""
    learner = TtlLearner()
    for n in range(1000):
        learner.first_send("m_1", ROUTE, T0 + n)
        learner.first_send("m_1", ROUTE, T0 + 20 * HOUR + n * 3.6)
    for _ in range(990):
        learner.repeat("m_1", ROUTE, 5.0, T0 + 21 * HOUR)
    for _ in range(6):
        learner.repeat("m_1", ROUTE, HOUR, T0 + 2 * HOUR)
    (got,) = learner.advice(TtlBounds(coverage=0.99, route_coverage=0.5))
    assert got.ttl_seconds >= HOUR


@pytest.mark.parametrize(
    "kwargs", [{"minimum": 0}, {"minimum": 100, "default": 50}, {"coverage": 0}, {"margin": 0.5}]
)
def test_bounds_that_contradict_themselves_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the message is the test's next line
        TtlBounds(**kwargs)  # type: ignore[arg-type]
