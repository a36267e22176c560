"""Traffic a blind review of the detectors found them wrong on: clients that honour
Retry-After, double clicks, keys reused for another request once expired, a replay storm
teaching the TTL, and slow anomalies whose evidence arrives an event at a time."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from oncepay.insight.analyzer import analyze
from oncepay.insight.findings import Finding
from oncepay.insight.records import Usage, UsageReader
from oncepay.insight.ttl import TtlBounds
from tests.insight.traffic import HOUR, T0, normal, ordered, usage, window

DATA = Path(__file__).parent / "data"


def findings(records: list[Usage]) -> list[Finding]:
    return analyze(records).findings()


# -- no_backoff: timing, not counts -------------------------------------------------------------


def test_clients_honouring_retry_after_on_a_slow_hour_are_no_no_backoff() -> None:
    """The acquirer slows down for an hour: every payment draws 409s, and the clients wait the
    2 s that Retry-After asks before each new attempt. Many 409s per key, none of them hurried."""
    rng = random.Random(20)
    start, end = window(start_hour=30)

    def patient() -> Iterator[Usage]:
        t = start
        while t < end:
            t += rng.uniform(20, 60)
            key = f"slow-{t}"
            yield usage(t, key)
            at = t
            for _ in range(rng.randint(3, 6)):
                at += 2.0 + rng.uniform(0.0, 1.5)
                yield usage(at, key, "in_progress", status=409)

    assert findings(ordered(normal(rng), patient())) == []


def test_the_reviews_patient_clients_are_no_no_backoff() -> None:
    """Logged as the review's slow-downstream tenant logged them (`executed` when answered):
    3 to 6 409s per key, 2 s apart."""
    with (DATA / "patient_retry_after.jsonl").open("rb") as log:
        assert analyze(UsageReader(log)).findings() == []


def test_double_clicks_are_no_no_backoff() -> None:
    """A shop whose pay button can be clicked twice, `executed` logged when the request came
    in: each key draws one 409 a fraction of a second later, and no more."""
    rng = random.Random(21)
    start, end = window(start_hour=30)

    def double_clicks() -> Iterator[Usage]:
        t = start
        while t < end:
            t += rng.uniform(20, 60)
            key = f"click-{t}"
            yield usage(t, key)
            yield usage(t + rng.uniform(0.05, 0.4), key, "in_progress", status=409)

    assert findings(ordered(normal(rng), double_clicks())) == []


def test_no_backoff_counts_the_quick_409s_of_keys_that_do_not_back_off() -> None:
    """Each key's first quick 409 could be a double click; from its second on, it counts."""
    rng = random.Random(22)
    start, _ = window(start_hour=30)
    storm = []
    for n in range(3):
        t = start + n * 300.0
        storm.append(usage(t, f"hurry-{n}"))
        storm += [usage(t + 0.2 * i, f"hurry-{n}", "in_progress", status=409) for i in range(1, 6)]
    (found,) = findings(ordered(normal(rng), iter(storm)))
    assert (found.kind, found.events) == ("no_backoff", 3 * 4)


# -- retry_after_expiry: the same request, not the same key -------------------------------------


def test_a_key_reused_for_other_requests_after_expiry_is_no_retry_after_expiry() -> None:
    """A client keying its payments by cart id on a route whose keys last 10 minutes: the key
    comes back after expiry with another basket, and executes (rightly) as a new request."""
    rng = random.Random(23)
    start, end = window(start_hour=30, hours=3)
    reused = []
    for cart in range(12):
        at = start + cart * 30.0
        while at < end:
            reused.append(usage(at, f"cart-{cart}", fingerprint=f"basket-{at}", ttl=600.0))
            at += rng.uniform(700, 1500)
    assert findings(ordered(normal(rng), iter(reused))) == []


def test_the_same_request_back_after_expiry_still_is_retry_after_expiry() -> None:
    rng = random.Random(24)
    start, end = window(start_hour=30, hours=3)
    loop = []
    for n in range(12):
        at = start + n * 30.0
        while at < end:
            loop.append(usage(at, f"loop-{n}", fingerprint=f"same-{n}", ttl=600.0))
            at += rng.uniform(700, 1500)
    assert [f.kind for f in findings(ordered(normal(rng), iter(loop)))] == ["retry_after_expiry"]


# -- adaptive TTL: a storm's replays are no retries ---------------------------------------------


def test_a_replay_storm_does_not_pull_the_ttl_below_the_late_terminals() -> None:
    """Terminals retry up to 20 hours later; a storm replays a few keys thousands of times an
    hour after they were sent. The TTL must still cover the terminals. (A pooled coverage of
    99 %: what a log of many tenants whose retries are quick leaves to this one.)"""
    rng = random.Random(25)
    late: list[float] = []

    def terminals() -> Iterator[Usage]:
        for u in normal(rng, hours=96, retry_rate=0.0):
            yield u
            if rng.random() < 0.01:
                delay = rng.uniform(1, 20) * HOUR
                late.append(delay)
                yield usage(u.at + delay, u.key, "replayed")

    records = list(terminals())
    start = T0 + 60 * HOUR
    victims = [u for u in records if start - HOUR < u.at < start and u.decision == "executed"]
    storm = (
        usage(start + i * 1.2, victims[i % 10].key, "replayed", source=f"198.51.100.{i % 200}")
        for i in range(3000)
    )
    analyzer = analyze(ordered(iter(records), storm), bounds=TtlBounds(coverage=0.99))
    assert [f.kind for f in analyzer.findings()] == ["replay_storm"]
    (advice,) = analyzer.ttl()
    assert advice.basis == len(late)  # the storm's replays are not retries
    assert all(delay <= advice.ttl_seconds for delay in late)


# -- slow anomalies: evidence an event at a time ------------------------------------------------


def test_keys_back_after_expiry_one_every_two_hours_are_retry_after_expiry() -> None:
    """A retry loop that outlives the TTL, one key every two hours or so for 30 hours of a week:
    no ten minutes hold more than one, but a tenant that never had one sees fifteen."""
    rng = random.Random(26)
    start = T0 + 80 * HOUR
    loop = []
    for n in range(15):
        at = start + n * 2 * HOUR + rng.uniform(0, 1800)
        loop += [usage(at - 30 * HOUR, f"loop-{n}"), usage(at, f"loop-{n}")]
    found = findings(ordered(normal(rng, hours=7 * 24), iter(loop)))
    assert [f.kind for f in found] == ["retry_after_expiry"]
    assert found[0].events == 15


def test_a_few_double_charges_over_hours_are_key_per_retry_where_there_are_none() -> None:
    """Seven requests executed twice under fresh keys over three and a half hours, in a tenant
    whose history has no such repeat at all: each moved money twice."""
    rng = random.Random(27)
    start = T0 + 30 * HOUR
    doubled = []
    for n in range(7):
        at = start + n * 30 * 60 + rng.uniform(0, 300)
        doubled.append(usage(at, f"first-{n}", status=502, fingerprint=f"same-{n}"))
        doubled.append(usage(at + rng.uniform(1, 5), f"again-{n}", fingerprint=f"same-{n}"))
    found = findings(ordered(normal(rng, hours=72), iter(doubled)))
    assert [(f.kind, f.events) for f in found] == [("key_per_retry", 7)]


def test_rare_evidence_at_the_tenants_usual_pace_is_no_slow_finding() -> None:
    """A tenant whose clients send the odd 422 every few hours, all week: its normal."""
    rng = random.Random(28)
    odd = []
    at = T0
    while at < T0 + 7 * 24 * HOUR:
        at += rng.expovariate(1 / (3 * HOUR))
        odd.append(usage(at, f"odd-{at}", "reused", status=422))
    assert findings(ordered(normal(rng, hours=7 * 24), iter(odd))) == []


def test_a_client_that_retries_quickly_after_each_409_is_no_backoff() -> None:
    """Each attempt times out after a second, then the client fires again within half a second:
    its 409s come 0.3-0.6 s after one another, two or three a key."""
    rng = random.Random(29)
    start, end = window(start_hour=30)

    def hasty() -> Iterator[Usage]:
        t = start
        while t < end:
            t += rng.uniform(20, 60)
            key = f"hasty-{t}"
            yield usage(t, key)
            at = t + 1.0 + rng.uniform(0.3, 0.6)
            yield usage(at, key, "in_progress", status=409)
            yield usage(at + rng.uniform(0.3, 0.6), key, "in_progress", status=409)

    assert [f.kind for f in findings(ordered(normal(rng), hasty()))] == ["no_backoff"]


# -- an anomaly that never stops is not the tenant's normal -------------------------------------


def _hasty_409s(rng: random.Random, u: Usage) -> Iterator[Usage]:
    at = u.at
    for _ in range(rng.randint(3, 8)):
        at += rng.uniform(0.05, 0.3)
        yield usage(at, u.key, "in_progress", status=409)


def test_a_client_deploy_that_stays_broken_is_found_against_the_first_days() -> None:
    """From hour 60 of a week on, a third of the payments draw a storm of 409s, and it never
    stops: most of the week is the anomaly, so the baseline is; the first two days are not."""
    rng = random.Random(30)

    def broken() -> Iterator[Usage]:
        for u in normal(rng, hours=7 * 24):
            yield u
            if u.decision == "executed" and u.at > T0 + 60 * HOUR and rng.random() < 0.3:
                yield from _hasty_409s(rng, u)

    found = findings(ordered(broken()))
    assert {f.kind for f in found} == {"no_backoff"}
    assert min(f.first_at for f in found) < T0 + 62 * HOUR


def test_a_tenant_whose_clients_always_hurry_a_little_is_no_onset() -> None:
    """The same storms all week long, from the first day, at a steady pace: its normal."""
    rng = random.Random(31)

    def always() -> Iterator[Usage]:
        for u in normal(rng, hours=7 * 24):
            yield u
            if u.decision == "executed" and rng.random() < 0.02:
                yield from _hasty_409s(rng, u)

    assert findings(ordered(always())) == []


def test_a_client_hammering_from_the_first_hour_is_no_backoff_whatever_the_baseline() -> None:
    """Broken before the log began: no first days to compare with. But a key's tenth 409 within
    a second of the one before is no backoff schedule, whatever the tenant usually does."""
    rng = random.Random(32)

    def hammering() -> Iterator[Usage]:
        for u in normal(rng, hours=7 * 24):
            yield u
            if u.decision == "executed" and rng.random() < 0.2:
                at = u.at
                for _ in range(15):
                    at += rng.uniform(0.05, 0.3)
                    yield usage(at, u.key, "in_progress", status=409)

    assert {f.kind for f in findings(ordered(hammering()))} == {"no_backoff"}


# -- key_per_retry: one client's retry, not two customers' identical requests ------------------


def test_a_flash_sales_identical_requests_from_many_customers_are_no_key_per_retry() -> None:
    """A second blind review: during a flash deal thousands of customers send the very same
    request within seconds of each other, each under its own key and from its own address; the
    tenant's history holds no such repeats (a baseline of zero), so every coincidence was a
    "retry under a fresh key" and the sale was reported as drift. A retry comes from the client
    that sent the first attempt."""
    rng = random.Random(31)
    start, end = window(start_hour=30)

    def flash_sale() -> Iterator[Usage]:
        t, n = start, 0
        while t < end:
            t += rng.expovariate(1.0)  # one a second: many within 10 s of each other
            n += 1
            yield usage(
                t, f"deal-{n}", fingerprint="fp-the-deal", source=f"10.1.{n // 250}.{n % 250}"
            )

    assert [
        f for f in findings(ordered(normal(rng), flash_sale())) if f.kind == "key_per_retry"
    ] == []


def test_a_client_retrying_under_fresh_keys_from_its_address_is_still_key_per_retry() -> None:
    """The same hour, but each request is sent again a few seconds later under a fresh key from
    the address that sent it: money moved twice, whatever the other customers do."""
    rng = random.Random(32)
    start, end = window(start_hour=30)

    def drifting() -> Iterator[Usage]:
        t, n = start, 0
        while t < end:
            t += rng.uniform(30, 90)
            n += 1
            body, source = f"fp-order-{n}", f"10.2.{n // 250}.{n % 250}"
            yield usage(t, f"first-{n}", fingerprint=body, source=source)
            yield usage(t + rng.uniform(2, 6), f"again-{n}", fingerprint=body, source=source)

    found = [f for f in findings(ordered(normal(rng), drifting())) if f.kind == "key_per_retry"]
    assert len(found) == 1
    assert found[0].events >= 30


def test_one_anomaly_in_bursts_an_hour_apart_is_one_finding() -> None:
    """A second blind review: a client that kept misbehaving in bursts got a finding a burst
    (18 for one client). Bursts less than two hours apart are one anomaly, one finding with
    all their events; bursts further apart stay findings of their own."""
    rng = random.Random(33)

    def bursts(hours: list[float]) -> Iterator[Usage]:
        for b, hour in enumerate(hours):
            for i in range(12):
                at, body = T0 + hour * HOUR + i * 30.0, f"fp-burst-{b}-{i}"
                yield usage(at, f"b{b}-{i}", fingerprint=body)
                yield usage(at + 2.0, f"b{b}-{i}-again", fingerprint=body)

    close = [
        f for f in findings(ordered(normal(rng), bursts([30, 31, 32]))) if f.kind == "key_per_retry"
    ]
    assert len(close) == 1
    assert close[0].events == 36
    apart = [
        f
        for f in findings(ordered(normal(random.Random(33)), bursts([24, 30, 36])))
        if f.kind == "key_per_retry"
    ]
    assert len(apart) == 3
