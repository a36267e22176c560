"""Adaptive TTL: per tenant and route, the time within which its clients' retries arrive.

Every repeat send of a key (a replay, a 409, a takeover, a return after expiry) is one
observation: its delay since the key's first send. A return after expiry counts like any other
(at most once a key, so that one runaway loop does not speak for a tenant): it is exactly the
retry a TTL that was too short failed to cover, and it pushes the learned TTL up.

Censoring: a key first sent an hour before the log ends could still be retried tomorrow, so
long delays are under-observed. Each observed delay ``d`` is weighted by the inverse of the
share of keys the log watched for at least ``d`` (Kaplan-Meier's idea, on histograms). The TTL
is the delay below which ``coverage`` of the weighted retries fall, times ``margin``, rounded
up to a minute and held to ``[minimum, maximum]``. A route with too few retries borrows its
tenant's figure; a tenant with too few gets ``default``. (Applying the TTLs is
:mod:`oncepay.insight.ttl_policy`'s part.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from oncepay.insight.findings import TtlAdvice

__all__ = ["TtlBounds", "TtlLearner"]

# Delays are kept in bins 5 % wide (geometric): the TTL's resolution, in bounded memory.
_GROWTH = 1.05
_LOG_GROWTH = math.log(_GROWTH)
# Key first-sends are counted per hour, to know how long the log watched each key.
_HOUR = 3600
# A delay the log watched fewer than 2 % of the keys for is weighted as if 2 % had been watched:
# beyond that the correction would multiply noise.
_MIN_AT_RISK = 0.02


@dataclass(frozen=True, slots=True)
class TtlBounds:
    """What the learned TTLs are held to (seconds), and how they are chosen."""

    minimum: float = 60.0
    maximum: float = 7 * 86400.0
    default: float = 86400.0  # a tenant that retried too rarely to learn from: the usual 24 h
    coverage: float = 0.9995  # of all the retries in the log, pooled
    route_coverage: float = 0.99  # of each route's own retries, whatever the pool needs
    margin: float = 1.2  # head-room above the observed delay, for next week's stragglers
    min_basis: int = 30  # fewer retries than this do not make a quantile

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.default <= self.maximum:
            raise ValueError("TTL bounds must satisfy 0 < minimum <= default <= maximum")
        if not 0 < self.coverage <= 1 or not 0 < self.route_coverage <= 1 or self.margin < 1:
            raise ValueError("coverage must be in (0, 1] and margin at least 1")


def _bin(delay: float) -> int:
    return 0 if delay <= 1.0 else int(math.log(delay) / _LOG_GROWTH) + 1


def _upper(index: int) -> float:
    return _GROWTH**index


@dataclass(slots=True)
class _Route:
    delays: dict[int, int] = field(default_factory=dict)
    first_sends: dict[int, int] = field(default_factory=dict)  # hour -> keys first sent

    def basis(self) -> int:
        return sum(self.delays.values())

    def keys(self) -> int:
        return sum(self.first_sends.values())

    def copy(self) -> _Route:
        return _Route(dict(self.delays), dict(self.first_sends))

    def merge(self, other: _Route) -> None:
        for index, count in other.delays.items():
            self.delays[index] = self.delays.get(index, 0) + count
        for hour, count in other.first_sends.items():
            self.first_sends[hour] = self.first_sends.get(hour, 0) + count


class TtlLearner:
    """Fed first sends and repeat delays; answers the TTL per tenant and route."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str], _Route] = {}
        self._end = -math.inf

    def _route(self, tenant: str, route: str) -> _Route:
        entry = self._routes.get((tenant, route))
        if entry is None:
            entry = self._routes[(tenant, route)] = _Route()
        return entry

    def first_send(self, tenant: str, route: str, at: float) -> None:
        hours = self._route(tenant, route).first_sends
        hour = int(at // _HOUR)
        hours[hour] = hours.get(hour, 0) + 1
        self._end = max(self._end, at)

    def first_sends(self, tenant: str, route: str) -> dict[int, int]:
        """The route's first sends per hour, for a caller that counts them itself (the
        analyzer's loop, a call per record saved); it then tells :meth:`reach` how far it got."""
        return self._route(tenant, route).first_sends

    def reach(self, at: float) -> None:
        """Decisions were counted up to ``at`` (the end of what the log watched)."""
        self._end = max(self._end, at)

    def repeat(self, tenant: str, route: str, delay: float, at: float) -> None:
        delays = self._route(tenant, route).delays
        index = _bin(delay) if delay > 1.0 else 0
        delays[index] = delays.get(index, 0) + 1
        self._end = max(self._end, at)

    def advice(
        self, bounds: TtlBounds, late: Iterable[tuple[str, str, float]] = ()
    ) -> list[TtlAdvice]:
        """One entry per tenant and route seen, sorted. ``late``: returns after expiry (tenant,
        route, delay) that count as retries: those of a runaway loop are left out by the
        caller, the ones that are a tenant's normal (late terminals) are not."""
        routes = {name: entry.copy() for name, entry in self._routes.items()}
        for tenant, route, delay in late:
            entry = routes.setdefault((tenant, route), _Route())
            entry.delays[_bin(delay)] = entry.delays.get(_bin(delay), 0) + 1
        tenants: dict[str, _Route] = {}
        for (tenant, _), entry in routes.items():
            tenants.setdefault(tenant, _Route()).merge(entry)
        learned = {
            name: self._tail(entry, bounds)
            for name, entry in routes.items()
            if entry.basis() >= bounds.min_basis
        }
        _allot(list(learned.values()), bounds)
        out = []
        for (tenant, route), entry in sorted(routes.items()):
            tail = learned.get((tenant, route))
            ttl: float | None
            if tail is not None:
                ttl, basis = tail.ttl, entry.basis()
            else:
                ttl, basis = self._borrowed(tenants[tenant], bounds)
            out.append(TtlAdvice(tenant, route, _held(ttl, bounds), basis))
        return out

    def _borrowed(self, entry: _Route, bounds: TtlBounds) -> tuple[float | None, int]:
        """A route with few retries: its tenant's ``coverage`` quantile, or the default."""
        basis = entry.basis()
        if basis < bounds.min_basis:
            return None, basis
        return self._tail(entry, bounds).covering(bounds.coverage), basis

    def _tail(self, entry: _Route, bounds: TtlBounds) -> _Tail:
        return _Tail(entry.keys(), sorted(self._weighted(entry)), bounds)

    def _weighted(self, entry: _Route) -> Iterable[tuple[int, float]]:
        watched = sorted(entry.first_sends.items())
        keys = sum(count for _, count in watched) or 1
        for index, count in entry.delays.items():
            delay = 0.0 if index == 0 else _upper(index - 1)
            horizon = self._end - delay  # keys first sent before this could show the delay
            at_risk = sum(n * _watched(hour, horizon) for hour, n in watched) / keys
            yield index, count / max(at_risk, _MIN_AT_RISK)


class _Tail:
    """One route's weighted retry delays, and the TTL chosen for it."""

    def __init__(self, keys: int, weighted: list[tuple[int, float]], bounds: TtlBounds) -> None:
        self.keys = max(keys, 1)
        self.total = sum(weight for _, weight in weighted) or 1.0
        self.bounds = bounds
        # (TTL, weight of the retries it misses) for each candidate: a bin's upper edge.
        self.options: list[tuple[float, float]] = []
        covered = 0.0
        for index, weight in weighted:
            covered += weight
            ttl = min(max(_upper(index) * bounds.margin, bounds.minimum), bounds.maximum)
            self.options.append((ttl, max(self.total - covered, 0.0)))
        self.floor = self.covering(bounds.route_coverage)
        self.ttl = self.floor

    def covering(self, share: float) -> float:
        """The shortest candidate TTL that misses at most ``1 - share`` of the retries."""
        for ttl, missed in self.options:
            if missed <= (1 - share) * self.total + 1e-9:
                return ttl
        return self.options[-1][0] if self.options else self.bounds.default

    def choose(self, price: float) -> float:
        """Take the TTL minimising key-seconds + ``price`` per missed retry (never below the
        route's own floor); answer the retries it misses."""
        ttl, missed = min(
            (option for option in self.options if option[0] >= self.floor),
            key=lambda option: self.keys * option[0] + price * option[1],
            default=(self.floor, 0.0),
        )
        self.ttl = ttl
        return missed


def _allot(tails: list[_Tail], bounds: TtlBounds) -> None:
    """TTLs for every route at once: the fewest key-seconds that still cover ``coverage`` of
    all the retries. A missed retry is given a price, raised (by bisection) until the routes'
    cheapest choices together cover enough: a tenant whose terminals retry a day later keeps
    its keys long, the tenants whose clients retry within seconds do not pay for it."""
    if not tails:
        return
    allowed = (1 - bounds.coverage) * sum(tail.total for tail in tails)
    low, high = 0.0, 1.0
    while _missed(tails, high) > allowed and high < 1e18:
        high *= 16
    for _ in range(50):
        middle = (low + high) / 2
        if _missed(tails, middle) > allowed:
            low = middle
        else:
            high = middle
    _missed(tails, high)  # leaves every tail at its choice for the final price


def _missed(tails: list[_Tail], price: float) -> float:
    return sum(tail.choose(price) for tail in tails)


def _watched(hour: int, horizon: float) -> float:
    """The share of an hour's first sends sent before ``horizon`` (taken as evenly spread)."""
    return min(max((horizon - hour * _HOUR) / _HOUR, 0.0), 1.0)


def _held(ttl: float | None, bounds: TtlBounds) -> int:
    chosen = bounds.default if ttl is None else ttl
    minutes = math.ceil(min(max(chosen, bounds.minimum), bounds.maximum) / 60)
    return int(min(minutes * 60, bounds.maximum))
