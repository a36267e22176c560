"""A labelled traffic generator for the analyzer (``oncepay insight simulate``), seeded.

Tenants of several kinds, each with its own volume and daily rhythm:

* ``shop``: web checkout; a few requests retried after a timeout, with the same key, backing off;
* ``sale``: a shop with a sale day at 8x its volume for ten hours;
* ``repeat``: a small set of customers paying the same small basket with the same card again
  and again (same fingerprint, a new key each time, at the tenant's usual pace);
* ``mobile``: clients on flaky networks that retry a lot with the same key, some changing
  address between attempts, some hitting the still-running first attempt (a 409);
* ``terminal``: payment terminals that retry hours later with the same key, some after more
  than a day (past a fixed 24 h TTL).

Every tenant has the odd client bug (a 422 now and then). Anomalies of each kind are planted in
some tenants for a window of one to four hours (days two to six); each is a label
``{"tenant", "kind", "start", "end"}``. A second, held-out week of the same tenants with no
anomalies follows the first, for scoring learned TTLs.

Memory stays flat: a day of operations is generated at a time and its sends pass through a
heap in time order.
"""

from __future__ import annotations

import bisect
import heapq
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from oncepay.insight.findings import (
    KEY_PER_RETRY,
    KEY_REUSE,
    KINDS,
    NO_BACKOFF,
    REPLAY_STORM,
    RETRY_AFTER_EXPIRY,
)
from oncepay.insight.records import Usage

__all__ = ["TENANT_KINDS", "Label", "Simulation"]

DAY = 86400.0
HOUR = 3600.0
TTL = DAY  # the TTL the simulated services store keys with: the usual 24 h
START = 1_767_225_600.0  # 2026-01-01 00:00 UTC, a Thursday
TENANT_KINDS = ("shop", "sale", "repeat", "mobile", "terminal")
PAYMENTS = "POST /v1/payments"
REFUNDS = "POST /v1/payments/{id}/refunds"


@dataclass(frozen=True, slots=True)
class Label:
    tenant: str
    kind: str
    start: float
    end: float

    def as_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "kind": self.kind, "start": self.start, "end": self.end}


@dataclass(slots=True)
class _Profile:
    name: str
    kind: str
    per_hour: float
    customers: list[tuple[str, str]]  # (fingerprint, address) for repeat tenants
    sale_day: int = -1
    anomalies: list[Label] = field(default_factory=list)
    old_keys: list[tuple[float, str, str, str]] = field(default_factory=list)


class Simulation:
    """``tenants`` tenants over ``days`` days (and the same number held out), from ``seed``."""

    def __init__(self, seed: int = 1, tenants: int = 30, days: int = 7, scale: float = 1.0):
        self.seed = seed
        self.days = days
        rng = random.Random(seed)  # noqa: S311 -- a seeded simulation, not a secret
        self._profiles = [self._profile(rng, i, scale) for i in range(tenants)]
        self._plant(rng)

    @property
    def labels(self) -> list[Label]:
        return sorted((a for p in self._profiles for a in p.anomalies), key=lambda a: a.start)

    # -- tenants ------------------------------------------------------------------------------

    @staticmethod
    def _profile(rng: random.Random, index: int, scale: float) -> _Profile:
        kind = TENANT_KINDS[index % len(TENANT_KINDS)]
        per_hour = math.exp(rng.uniform(math.log(15), math.log(400))) * scale
        customers = [(f"{rng.getrandbits(128):032x}", _address(rng)) for _ in range(40)]
        profile = _Profile(f"m_{index:04d}", kind, per_hour, customers)
        if kind == "sale":
            profile.sale_day = rng.randrange(1, 6)
        return profile

    def _plant(self, rng: random.Random) -> None:
        """Each kind in a few tenants (a third of them stay clean), one window each."""
        candidates = self._profiles[: max(1, len(self._profiles) * 2 // 3)]
        for kind in KINDS:
            for profile in rng.sample(candidates, k=max(1, len(candidates) // 5)):
                day = rng.randrange(2, max(3, self.days - 1))
                start = START + day * DAY + rng.uniform(0, DAY - 4 * HOUR)
                end = start + rng.uniform(1, 4) * HOUR
                profile.anomalies.append(Label(profile.name, kind, start, end))

    # -- traffic ------------------------------------------------------------------------------

    def records(self, *, held_out: bool = False) -> Iterator[Usage]:
        """The labelled week, or (``held_out``) the clean week after it, in time order."""
        rng = random.Random(self.seed * 7919 + (1 if held_out else 0))  # noqa: S311
        first = self.days if held_out else 0
        pending: list[tuple[float, int, Usage]] = []
        counter = 0
        for day in range(first, first + self.days):
            for profile in self._profiles:
                for usage in self._day(rng, profile, day, anomalies=not held_out):
                    counter += 1
                    heapq.heappush(pending, (usage.at, counter, usage))
            horizon = START + (day + 1) * DAY
            while pending and pending[0][0] < horizon:
                yield heapq.heappop(pending)[2]
        end = START + (first + self.days) * DAY
        while pending and pending[0][0] < end:  # sends after the week are not in its log
            yield heapq.heappop(pending)[2]

    def _day(self, rng: random.Random, p: _Profile, day: int, anomalies: bool) -> Iterator[Usage]:
        t = START + day * DAY
        end = t + DAY
        while True:
            t += rng.expovariate(self._rate(p, t, day) / HOUR)
            if t >= end:
                return
            active = [a.kind for a in p.anomalies if anomalies and a.start <= t < a.end]
            yield from self._operation(rng, p, t, active)

    @staticmethod
    def _rate(p: _Profile, t: float, day: int) -> float:
        hour = (t % DAY) / HOUR
        rhythm = 0.35 + 0.65 * max(0.0, math.sin(math.pi * (hour - 6) / 16)) if hour > 6 else 0.35
        sale = 8.0 if day == p.sale_day and 9 <= hour < 19 else 1.0
        return max(p.per_hour * rhythm * sale, 0.5)

    def _operation(
        self, rng: random.Random, p: _Profile, t: float, active: list[str]
    ) -> Iterator[Usage]:
        route = PAYMENTS if rng.random() < 0.85 else REFUNDS
        if p.kind == "repeat" and route == PAYMENTS:
            fingerprint, source = rng.choice(p.customers)
        else:
            fingerprint, source = f"{rng.getrandbits(128):032x}", _address(rng)
        key = f"{rng.getrandbits(128):032x}"
        send = _Sender(p.name, route, fingerprint)
        latency = rng.lognormvariate(math.log(0.4), 0.6)
        if (KEY_REUSE in active and rng.random() < 0.4) or rng.random() < 0.0005:
            yield send(t, key, "reused", 422, source)  # a key from another request
            return
        failed = rng.random() < 0.01
        yield send(t, key, "executed", 502 if failed else 201, source)
        _keep(p, (t, key, route, fingerprint))
        yield from _RETRIES[p.kind](rng, send, t, key, latency, source)
        yield from self._anomalies(rng, p, send, t, key, latency, source, active)

    def _anomalies(
        self,
        rng: random.Random,
        p: _Profile,
        send: _Sender,
        t: float,
        key: str,
        latency: float,
        source: str,
        active: list[str],
    ) -> Iterator[Usage]:
        if KEY_PER_RETRY in active and rng.random() < 0.5:
            for attempt in range(rng.randint(1, 2)):
                at = t + (attempt + 1) * rng.uniform(1.0, 6.0)
                yield send(at, f"{rng.getrandbits(128):032x}", "executed", 201, source)
        if NO_BACKOFF in active and rng.random() < 0.4:
            slow = latency + rng.uniform(2.0, 6.0)
            at = t
            while True:
                at += rng.uniform(0.05, 0.3)
                if at >= t + slow:
                    break
                yield send(at, key, "in_progress", 409, source)
        if REPLAY_STORM in active and rng.random() < 0.15:
            for _ in range(rng.randint(20, 60)):
                yield send(t + rng.uniform(5, 600), key, "replayed", 201, _address(rng))
        if RETRY_AFTER_EXPIRY in active and rng.random() < 0.5:
            yield from _return_after_expiry(rng, p, send, t)


class _Sender:
    """Builds one tenant operation's records."""

    __slots__ = ("fingerprint", "route", "tenant")

    def __init__(self, tenant: str, route: str, fingerprint: str) -> None:
        self.tenant, self.route, self.fingerprint = tenant, route, fingerprint

    def __call__(self, at: float, key: str, decision: str, status: int, source: str) -> Usage:
        return Usage(
            at, self.tenant, self.route, key, self.fingerprint, decision, status, source, TTL
        )


def _keep(p: _Profile, sent: tuple[float, str, str, str]) -> None:
    """Remember a key for the expiry loop; three days of them at most."""
    p.old_keys.append(sent)
    if len(p.old_keys) > 4096 and p.old_keys[0][0] < sent[0] - 3 * DAY:
        low = bisect.bisect_left(p.old_keys, sent[0] - 3 * DAY, key=lambda k: k[0])
        del p.old_keys[:low]


def _address(rng: random.Random) -> str:
    return f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _same_key(
    send: _Sender, t: float, key: str, latency: float, delays: list[float], sources: list[str]
) -> Iterator[Usage]:
    for delay, source in zip(delays, sources, strict=True):
        if delay < latency:
            yield send(t + delay, key, "in_progress", 409, source)
        elif delay <= TTL:
            yield send(t + delay, key, "replayed", 201, source)
        else:
            yield send(t + delay, key, "executed", 201, source)  # the record had expired


def _backoff(rng: random.Random, tries: int, base: float) -> list[float]:
    delays, at = [], 0.0
    for attempt in range(tries):
        at += base * 2**attempt * rng.uniform(0.8, 1.6)
        delays.append(at)
    return delays


def _shop(
    rng: random.Random, send: _Sender, t: float, key: str, latency: float, source: str
) -> Iterator[Usage]:
    if rng.random() < 0.05:
        delays = _backoff(rng, rng.randint(1, 3), 2.0)
        yield from _same_key(send, t, key, latency, delays, [source] * len(delays))


def _mobile(
    rng: random.Random, send: _Sender, t: float, key: str, latency: float, source: str
) -> Iterator[Usage]:
    if rng.random() < 0.4:
        delays = _backoff(rng, rng.randint(1, 6), 0.5)
        sources = [source if rng.random() < 0.9 else _address(rng) for _ in delays]
        yield from _same_key(send, t, key, latency * 3, delays, sources)


def _terminal(
    rng: random.Random, send: _Sender, t: float, key: str, latency: float, source: str
) -> Iterator[Usage]:
    if rng.random() < 0.06:
        delays = [rng.lognormvariate(math.log(4 * HOUR), 0.8)]
        yield from _same_key(send, t, key, latency, delays, [source])
    else:
        yield from _shop(rng, send, t, key, latency, source)


_RETRIES: dict[str, Callable[..., Iterator[Usage]]] = {
    "shop": _shop,
    "sale": _shop,
    "repeat": _shop,
    "mobile": _mobile,
    "terminal": _terminal,
}


def _return_after_expiry(
    rng: random.Random, p: _Profile, send: _Sender, t: float
) -> Iterator[Usage]:
    """A retry loop that outlives the TTL: a key from one to three days ago comes back."""
    low = bisect.bisect_left(p.old_keys, t - 3 * DAY, key=lambda k: k[0])
    high = bisect.bisect_left(p.old_keys, t - TTL - HOUR, key=lambda k: k[0])
    if low < high:
        _, key, route, fingerprint = p.old_keys[rng.randrange(low, high)]
        again = _Sender(p.name, route, fingerprint)
        yield again(t + rng.uniform(0, 60), key, "executed", 201, _address(rng))
