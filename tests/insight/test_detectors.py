"""Each kind of finding (SPEC §9) on planted traffic, and none on the traffic that makes naive
thresholds fail: sale-day bursts, identical baskets repeating, flaky clients, late terminals."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from oncepay.insight.analyzer import Analyzer, analyze
from oncepay.insight.findings import KINDS, Finding
from oncepay.insight.records import Usage
from tests.insight.traffic import HOUR, T0, normal, ordered, usage, window


def findings(records: list[Usage]) -> list[Finding]:
    return analyze(records).findings()


def kinds(records: list[Usage]) -> set[str]:
    return {finding.kind for finding in findings(records)}


# -- clean traffic ------------------------------------------------------------------------------


def test_a_tenants_normal_traffic_has_no_finding() -> None:
    assert findings(ordered(normal(random.Random(1)))) == []


def test_a_sale_day_at_eight_times_the_volume_is_no_finding() -> None:
    rng = random.Random(2)
    quiet = normal(rng, hours=48, per_hour=60)
    sale = (u._replace(at=u.at + 20 * HOUR) for u in normal(rng, hours=8, per_hour=480))
    assert findings(ordered(quiet, _renamed(sale, "sale"))) == []


def test_identical_baskets_repeating_at_the_usual_pace_are_no_key_per_retry() -> None:
    """Same card, same basket: the same fingerprint under new keys, minutes apart."""
    rng = random.Random(3)
    baskets = (
        usage(T0 + i * rng.uniform(30, 90), f"b{i}", fingerprint=f"basket-{i % 5}")
        for i in range(3000)
    )
    assert findings(ordered(baskets)) == []


def test_flaky_clients_retrying_a_lot_with_the_same_key_are_their_normal() -> None:
    rng = random.Random(4)

    def flaky() -> Iterator[Usage]:
        for u in normal(rng, retry_rate=0.0):
            yield u
            at = u.at
            for attempt in range(rng.randint(0, 5)):
                at += 0.5 * 2**attempt * rng.uniform(1, 1.5)
                yield usage(at, u.key, "replayed")

    assert findings(ordered(flaky())) == []


def test_terminals_retrying_hours_later_with_the_same_key_are_no_finding() -> None:
    rng = random.Random(5)

    def terminals() -> Iterator[Usage]:
        for u in normal(rng, retry_rate=0.0):
            yield u
            if rng.random() < 0.1:
                yield usage(u.at + rng.uniform(2, 20) * HOUR, u.key, "replayed")

    assert findings(ordered(terminals())) == []


# -- each kind planted --------------------------------------------------------------------------


def _planted(kind: str, rng: random.Random, start: float, end: float) -> Iterator[Usage]:
    n = 0
    t = start
    while t < end:
        t += rng.uniform(20, 60)
        n += 1
        key = f"x{n}"
        if kind == "key_per_retry":  # a 502, then the same request under a fresh key
            yield usage(t, key, status=502, fingerprint=f"same-{n}")
            yield usage(t + rng.uniform(1, 5), f"{key}-again", fingerprint=f"same-{n}")
        elif kind == "key_reuse":
            yield usage(t, "the-one-key", "reused", status=422)
        elif kind == "replay_storm":
            yield usage(t, key)
            for _ in range(30):
                yield usage(t + rng.uniform(1, 50), key, "replayed", source=_somewhere(rng))
        elif kind == "retry_after_expiry":  # a key first sent 30 hours before
            yield usage(t - 30 * HOUR, key, ttl=86400.0)
            yield usage(t, key)
        elif kind == "no_backoff":
            yield usage(t, key)
            for i in range(12):
                yield usage(t + 0.1 * (i + 1), key, "in_progress", status=409)


def _somewhere(rng: random.Random) -> str:
    return f"198.51.{rng.randrange(256)}.{rng.randrange(256)}"


def _renamed(records: Iterator[Usage], prefix: str) -> Iterator[Usage]:
    return (u._replace(key=f"{prefix}-{u.key}") for u in records)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_planted_for_an_hour_is_found_in_its_window(kind: str) -> None:
    rng = random.Random(6)
    start, end = window(start_hour=36)
    records = ordered(normal(rng), _renamed(_planted(kind, rng, start, end), "p"))
    found = findings(records)
    assert [f.kind for f in found] == [kind]
    assert start <= found[0].first_at <= found[0].last_at <= end + 120  # the last send, late
    assert found[0].events >= 30
    assert found[0].tenant == "m_1"
    assert "example keys: p-" in found[0].detail


def test_a_finding_is_the_misbehaving_tenants_only() -> None:
    rng = random.Random(7)
    start, end = window(start_hour=30)
    good = normal(rng, tenant="m_good")
    bad = (u._replace(tenant="m_bad") for u in _planted("no_backoff", rng, start, end))
    found = findings(ordered(good, normal(rng, tenant="m_bad"), _renamed(bad, "p")))
    assert [(f.tenant, f.kind) for f in found] == [("m_bad", "no_backoff")]


def test_a_flaky_tenant_is_judged_against_its_own_retries() -> None:
    """The same storm of 409s that stands out in a calm tenant stands out here too, while the
    flaky tenant's usual single 409s do not."""
    rng = random.Random(8)

    def usual_conflicts() -> Iterator[Usage]:
        for u in normal(rng, retry_rate=0.0):
            yield u
            if rng.random() < 0.3:
                yield usage(u.at + rng.uniform(1.5, 3), u.key, "in_progress", status=409)

    assert findings(ordered(usual_conflicts())) == []


def test_the_analyzer_is_incremental() -> None:
    """Fed one record at a time, it answers at any point: what the worker needs."""
    rng = random.Random(9)
    start, end = window(start_hour=30)
    analyzer = Analyzer()
    records = ordered(normal(rng), _renamed(_planted("key_reuse", rng, start, end), "p"))
    before = [u for u in records if u.at < start]
    for record in before:
        analyzer.feed(record)
    assert analyzer.findings() == []
    for record in records[len(before) :]:
        analyzer.feed(record)
    assert [f.kind for f in analyzer.findings()] == ["key_reuse"]
    analyzer.trim(now=T0 + 400 * HOUR)  # a history of a week: all of it forgotten
    assert analyzer.findings() == []


def test_a_sale_day_of_identical_baskets_is_no_key_per_retry() -> None:
    """Chance repeats of the same basket within seconds grow with the square of the volume:
    at 8x the volume, 64x as many, and still no finding."""
    rng = random.Random(10)

    def baskets(start: float, hours: float, per_hour: float) -> Iterator[Usage]:
        t = start
        while t < start + hours * HOUR:
            t += rng.expovariate(per_hour / HOUR)
            yield usage(t, f"b{t}", fingerprint=f"basket-{rng.randrange(40)}")

    quiet = baskets(T0, 72, 150)
    sale = baskets(T0 + 30 * HOUR, 8, 7 * 150)
    assert findings(ordered(quiet, sale)) == []


def test_a_retry_loop_past_expiry_does_not_teach_the_ttl_to_keep_keys_for_days() -> None:
    rng = random.Random(11)
    start, end = window(start_hour=60)
    loop = _renamed(_planted("retry_after_expiry", rng, start, end), "p")
    analyzer = analyze(ordered(normal(rng, hours=72), loop))
    assert [f.kind for f in analyzer.findings()] == ["retry_after_expiry"]
    (advice,) = analyzer.ttl()
    assert advice.ttl_seconds < HOUR
