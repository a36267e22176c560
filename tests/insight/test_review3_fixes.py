"""Traffic a third blind review found the detectors wrong on: flaky phones retrying one key a
dozen times taken for replay storms, fresh-key retries after a client's 30 s timeout missed,
and a key reused from the log's first line taken for the tenant's normal."""

from __future__ import annotations

import random
from collections.abc import Iterator

from oncepay.insight.analyzer import analyze
from oncepay.insight.findings import Finding
from oncepay.insight.records import Usage
from tests.insight.traffic import normal, ordered, usage, window


def findings(records: list[Usage]) -> list[Finding]:
    return analyze(records).findings()


# -- replay_storm: a retry schedule is bounded in time, not only in count ------------------------


def _flaky(rng: random.Random, start: float, end: float) -> Iterator[Usage]:
    """Phones on a lossy network: now and then one retries its key 10 to 18 times, 3 to 15 s
    apart, within two minutes, switching once between Wi-Fi and mobile data."""
    t = start
    n = 0
    while t < end:
        t += rng.uniform(120, 400)
        n += 1
        key = f"flaky-{n}"
        wifi, cellular = f"192.0.2.{n % 250 + 1}", f"198.51.100.{n % 250 + 1}"
        yield usage(t, key, source=wifi)
        at, here = t, wifi
        for _ in range(rng.randint(10, 18)):
            at += rng.uniform(3.0, 9.0)
            if rng.random() < 0.15:
                here = cellular if here == wifi else wifi
            yield usage(at, key, "replayed", source=here)


def test_a_flaky_phones_dozen_retries_of_one_key_are_no_replay_storm() -> None:
    rng = random.Random(301)
    start, end = window(start_hour=30, hours=3)
    assert findings(ordered(normal(rng), _flaky(rng, start, end))) == []


def test_a_key_replayed_long_after_its_first_send_is_still_a_storm() -> None:
    """The same count of replays, spread over an hour from one address: no schedule does that."""
    rng = random.Random(302)
    start, end = window(start_hour=30, hours=3)

    def bot() -> Iterator[Usage]:
        t, n = start, 0
        while t < end:
            t += rng.uniform(300, 600)
            n += 1
            key = f"bot-{n}"
            yield usage(t, key)
            for i in range(1, 16):
                yield usage(t + i * 240.0, key, "replayed", source="203.0.113.9")

    assert [f.kind for f in findings(ordered(normal(rng), bot()))] == ["replay_storm"]


# -- key_per_retry: a batch of identical requests is no retry ------------------------------------


def test_a_subscriptions_monthly_renewal_batch_is_no_key_per_retry() -> None:
    """On the first of the month the subscription server renews its customers: a few hundred
    payments of two plans (identical bodies) from one address within twenty minutes, each under
    its own key. Many fall seconds after the previous renewal of the same plan; none is a
    retry."""
    rng = random.Random(303)

    def renewals() -> Iterator[Usage]:
        start, _ = window(start_hour=26)
        for n in range(300):
            plan = f"plan-{rng.randrange(2)}"
            yield usage(start + rng.uniform(0, 1200), f"renew-{n}", fingerprint=plan,
                        source="203.0.113.7")  # fmt: skip

    assert findings(ordered(normal(rng, hours=72), renewals())) == []


def test_a_drifting_client_beside_the_renewal_batch_is_still_found() -> None:
    """The same nights, and for an hour a client that retries each lost answer once under a
    fresh key a few seconds later."""
    rng = random.Random(304)
    start, end = window(start_hour=40)

    def drift() -> Iterator[Usage]:
        t, n = start, 0
        while t < end:
            t += rng.uniform(20, 60)
            n += 1
            yield usage(t, f"d{n}", fingerprint=f"order-{n}")
            yield usage(t + rng.uniform(1, 8), f"d{n}-again", fingerprint=f"order-{n}")

    def renewals() -> Iterator[Usage]:
        n = 0
        for night in range(3):
            first, _ = window(start_hour=2 + 24 * night)
            for _ in range(200):
                n += 1
                yield usage(first + rng.uniform(0, 1200), f"renew-{n}",
                            fingerprint=f"plan-{n % 2}", source="203.0.113.7")  # fmt: skip

    kinds = [f.kind for f in findings(ordered(normal(rng, hours=72), renewals(), drift()))]
    assert kinds == ["key_per_retry"]


# -- evidence no legitimate client produces is judged against no baseline -----------------------


def test_one_key_reused_for_most_payments_from_the_first_line_is_key_reuse() -> None:
    """A shop's client sends every payment under one constant key from the log's first line:
    the key's first request executed, every other one is refused (422) for three days. The
    tenant's own history is nothing but this, yet no client that mints keys does it."""
    rng = random.Random(305)

    def constant_key() -> Iterator[Usage]:
        yield usage(window(start_hour=0)[0], "the-key", fingerprint="order-0")
        t, n = window(start_hour=0.01)[0], 0
        while t < window(start_hour=72)[0]:
            t += rng.expovariate(8 / 3600)
            n += 1
            yield usage(t, "the-key", "reused", status=422, fingerprint=f"order-{n}")

    found = findings(ordered(normal(rng, hours=72, per_hour=2), constant_key()))
    assert [f.kind for f in found] == ["key_reuse"]


def test_keys_refused_once_each_as_usual_stay_the_tenants_normal() -> None:
    """A client that now and then reuses a key once (a stale key after a crash): a steady few
    422s a day, each of another key, all week: no finding."""
    rng = random.Random(306)

    def now_and_then() -> Iterator[Usage]:
        t, n = window(start_hour=0)[0], 0
        while t < window(start_hour=72)[0]:
            t += rng.expovariate(1 / 3600)
            n += 1
            yield usage(t, f"m_1-k{n}", "reused", status=422, fingerprint=f"other-{n}")

    assert findings(ordered(normal(rng, hours=72), now_and_then())) == []


def test_a_storm_from_hundreds_of_addresses_to_the_end_of_the_log_is_a_replay_storm() -> None:
    """For the last day of a three-day log, a botnet replays forty payments completed just
    before, a few times a minute, from hundreds of addresses: a third of the tenant's blocks
    hold it, enough for its history to take it for the normal; no client's key is replayed
    from sixteen addresses."""
    rng = random.Random(307)
    start, end = window(start_hour=48, hours=24)
    victims = [f"victim-{n}" for n in range(40)]

    def botnet() -> Iterator[Usage]:
        for n, key in enumerate(victims):
            yield usage(start - 600 + n, key)
        t = start
        while t < end:
            t += rng.expovariate(3 / 60)
            address = f"198.51.{rng.randrange(4)}.{rng.randrange(1, 255)}"
            yield usage(t, rng.choice(victims), "replayed", source=address)

    found = findings(ordered(normal(random.Random(308), hours=72), botnet()))
    assert [f.kind for f in found] == ["replay_storm"]


# -- no_backoff: a timeout, then a backoff from half a second ------------------------------------


def test_clients_timing_out_on_a_slow_acquirer_then_backing_off_are_no_no_backoff() -> None:
    """The acquirer takes a minute or more for an hour: each client times out after 30 s and
    retries (a 409), then backs off from half a second, doubling. Each key draws one 409 less
    than a second after the previous one, right after another 409; none fires again and again."""
    rng = random.Random(309)
    start, end = window(start_hour=30)

    def patient() -> Iterator[Usage]:
        t, n = start, 0
        while t < end:
            t += rng.uniform(20, 60)
            n += 1
            key = f"slow-{n}"
            yield usage(t, key)
            at = t + 30.0 + rng.uniform(0, 0.5)
            yield usage(at, key, "in_progress", status=409)
            wait = rng.uniform(0.5, 0.9)
            for _ in range(3):
                at += wait
                wait *= 2
                yield usage(at, key, "in_progress", status=409)

    assert findings(ordered(normal(rng), patient())) == []
