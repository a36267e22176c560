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
