"""The detectors: each decision of the log classified, exactly, as evidence of a kind or not,
then judged per tenant against that tenant's own normal (:mod:`oncepay.insight.baseline`).

What makes a decision evidence (a key is tracked from its first send):

``key_per_retry``
    an execution under a *fresh* key of a request (route and fingerprint) that executed under
    another key seconds before, or minutes before when that first attempt failed (5xx). A
    product whose identical baskets repeat legitimately repeats at the tenant's usual pace, not
    seconds apart; the few that happen to fall close are the tenant's baseline.
``key_reuse``
    a ``reused`` decision (the 422: one key, another request).
``replay_storm``
    a replay of a key already replayed more times than any retry schedule sends; the fourth
    replay of a key from an address other than the one that first sent it; or a replay from
    another address more than ten minutes after the first send.
``retry_after_expiry``
    an execution of a key whose record had expired: the key came back after its TTL.
``no_backoff``
    a 409 (``in_progress``) less than a second after the key's previous send, or the key's third
    409 or later: the client fires again while the first attempt still runs.

Flaky clients that retry with the same key produce replays and the odd 409 at a backoff's
pace; terminals that retry hours later produce replays within the TTL: neither is evidence.

:class:`Analyzer` is incremental: ``feed`` one record at a time (the worker can feed the live
log), ``findings()`` and ``ttl()`` whenever asked. Memory: per tenant, its buckets and the keys
still inside their TTL plus a grace period; nothing grows with the length of the log.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from oncepay.insight.baseline import Episode, Series, Thresholds, squared
from oncepay.insight.findings import (
    KEY_PER_RETRY,
    KEY_REUSE,
    KINDS,
    NO_BACKOFF,
    REPLAY_STORM,
    RETRY_AFTER_EXPIRY,
    Finding,
    TtlAdvice,
)
from oncepay.insight.records import Usage
from oncepay.insight.ttl import TtlBounds, TtlLearner

__all__ = ["Analyzer", "Tuning", "analyze"]


@dataclass(frozen=True, slots=True)
class Tuning:
    """The detectors' constants, each with its reason."""

    # Ten-minute buckets: short enough that an hour's anomaly fills several, long enough that a
    # small tenant's bucket holds a rate.
    bucket: float = 600.0
    # A fresh key for the same request this soon is a retry, not a customer buying again: a
    # person takes longer than ten seconds to pay twice for the same basket.
    quick_repeat: float = 10.0
    # ... and this soon after a failed (5xx) attempt, a retry under a fresh key.
    failed_repeat: float = 300.0
    # More replays of one key than any retry schedule sends (exponential backoff stops at 5-8).
    replay_schedule: int = 8
    # Replays of one key from this many addresses other than the one that sent it: a phone
    # that moves from Wi-Fi to mobile data changes address once or twice, not four times.
    replay_addresses: int = 4
    # A replay from another address this long after the first send: past any client's retry
    # schedule, and a terminal that retries hours later does so from where it stands.
    replay_late: float = 600.0
    # A 409 this soon after the key's previous send: no backoff at all.
    no_backoff_gap: float = 1.0
    # A key's third 409: even a backing-off client rarely hits the first attempt three times.
    no_backoff_conflicts: int = 3
    # How long a key is remembered after its record expired, to see it come back (seconds).
    grace: float = 2 * 86400.0
    # The TTL assumed when the log does not say (the usual 24 h).
    default_ttl: float = 86400.0
    # The live worker's history per tenant, in buckets (a week): what the baseline looks back on.
    history: int = 7 * 144


# Fewest events for a finding, where a kind differs from the thresholds' floor: a storm is far
# beyond any schedule, so a handful of replays is not one; a tenant whose customers pay the
# same basket often sees a few chance repeats within seconds at its busiest; a key back after
# expiry is already unusual one by one.
_FLOORS = {REPLAY_STORM: 8, KEY_PER_RETRY: 8, RETRY_AFTER_EXPIRY: 4}


class _Key:
    """What is known of one key: there are hundreds of thousands, hence the slots."""

    __slots__ = (
        "conflicts",
        "expires",
        "first",
        "last",
        "replays",
        "returns",
        "route",
        "source",
        "strangers",
    )

    def __init__(self, at: float, expires: float, route: str, source: str | None) -> None:
        self.first = self.last = at
        self.expires = expires
        self.route = route
        self.source = source
        self.replays = self.conflicts = self.returns = self.strangers = 0


class _Tenant:
    """One tenant's keys, recent requests, decisions per bucket and evidence per kind."""

    __slots__ = ("expiring", "keys", "late", "recent", "seen", "series", "stale", "turned")

    def __init__(self) -> None:
        self.keys: dict[str, _Key] = {}
        self.expiring: deque[tuple[float, str]] = deque()  # (forget after, key) in send order
        self.recent: dict[tuple[str, str], tuple[float, str, int]] = {}  # request -> last exec
        self.stale: dict[tuple[str, str], tuple[float, str, int]] = {}
        self.turned = -math.inf  # when ``recent`` last became ``stale``
        self.seen: dict[int, int] = {}
        self.late: list[tuple[int, str, float]] = []  # returns after expiry: bucket, route, delay
        self.series = {kind: Series() for kind in KINDS}


class Analyzer:
    """The detectors and the TTL learner over one stream of decisions."""

    def __init__(
        self,
        tuning: Tuning | None = None,
        thresholds: Thresholds | None = None,
        bounds: TtlBounds | None = None,
    ) -> None:
        self.tuning = tuning or Tuning()
        self.thresholds = thresholds or Thresholds()
        self.bounds = bounds or TtlBounds()
        self.records = 0
        self._tenants: dict[str, _Tenant] = {}
        self._ttl = TtlLearner()

    def feed_all(self, records: Iterable[Usage]) -> None:
        for usage in records:
            self.feed(usage)

    def feed(self, usage: Usage) -> None:
        """Take one decision (in time order; a little disorder is tolerated)."""
        self.records += 1
        tenant = self._tenants.get(usage.tenant)
        if tenant is None:
            tenant = self._tenants[usage.tenant] = _Tenant()
        bucket = int(usage.at // self.tuning.bucket)
        seen = tenant.seen.get(bucket, 0)
        tenant.seen[bucket] = seen + 1
        if not seen:  # a new bucket: time to let go of what is too old (not on every record)
            self._forget(tenant, usage.at)
        if not usage.key:
            return
        kind = self._classify(tenant, usage)
        if kind is not None:
            tenant.series[kind].evidence(bucket, usage.at, usage.key, usage.source)

    # -- classification -----------------------------------------------------------------------

    def _classify(self, tenant: _Tenant, usage: Usage) -> str | None:
        decision = usage.decision
        state = tenant.keys.get(usage.key)
        if decision == "executed":
            if state is None:
                return self._first_send(tenant, usage)
            return self._executed_again(tenant, usage, state)
        if decision == "reused":
            return KEY_REUSE
        if state is None:  # a key first sent before the log began: no delay to learn from
            if decision in ("replayed", "in_progress"):
                self._remember(tenant, usage)
            return None
        if decision == "replayed":
            return self._replayed(usage, state)
        if decision == "in_progress":
            return self._conflict(usage, state)
        return None

    def _first_send(self, tenant: _Tenant, usage: Usage) -> str | None:
        request = (usage.route, usage.fingerprint)
        before = tenant.recent.get(request) or tenant.stale.get(request)
        tenant.recent[request] = (usage.at, usage.key, usage.status)
        self._remember(tenant, usage)
        self._ttl.first_send(usage.tenant, usage.route, usage.at)
        if before is None or not usage.fingerprint or before[1] == usage.key:
            return None
        gap = usage.at - before[0]
        quick = gap <= self.tuning.quick_repeat
        after_failure = before[2] >= 500 and gap <= self.tuning.failed_repeat
        return KEY_PER_RETRY if quick or after_failure else None

    def _executed_again(self, tenant: _Tenant, usage: Usage, state: _Key) -> str | None:
        at = usage.at
        expired = at > state.expires
        state.last = at
        if not expired:  # a takeover
            self._repeat(usage, state)
            return None
        if state.returns == 0:  # the key's first return: a retry the TTL missed, or a loop
            bucket = int(at // self.tuning.bucket)
            tenant.late.append((bucket, state.route, at - state.first))
        state.returns += 1
        state.expires = at + (usage.ttl or self.tuning.default_ttl)
        tenant.expiring.append((state.expires + self.tuning.grace, usage.key))
        return RETRY_AFTER_EXPIRY

    def _replayed(self, usage: Usage, state: _Key) -> str | None:
        self._repeat(usage, state)
        state.last = usage.at
        state.replays += 1
        moved = usage.source is not None and usage.source != state.source
        if moved:
            state.strangers += 1
        many = state.replays > self.tuning.replay_schedule
        scattered = state.strangers >= self.tuning.replay_addresses
        stolen = moved and usage.at - state.first > self.tuning.replay_late
        return REPLAY_STORM if many or scattered or stolen else None

    def _conflict(self, usage: Usage, state: _Key) -> str | None:
        hurried = usage.at - state.last < self.tuning.no_backoff_gap
        self._repeat(usage, state)
        state.last = usage.at
        state.conflicts += 1
        many = state.conflicts >= self.tuning.no_backoff_conflicts
        return NO_BACKOFF if hurried or many else None

    # -- keys ---------------------------------------------------------------------------------

    def _remember(self, tenant: _Tenant, usage: Usage) -> None:
        expires = usage.at + (usage.ttl or self.tuning.default_ttl)
        tenant.keys[usage.key] = _Key(usage.at, expires, usage.route, usage.source)
        tenant.expiring.append((expires + self.tuning.grace, usage.key))

    def _repeat(self, usage: Usage, state: _Key) -> None:
        self._ttl.repeat(usage.tenant, state.route, usage.at - state.first, usage.at)

    def _forget(self, tenant: _Tenant, now: float) -> None:
        """Keys past expiry and grace, and requests older than any retry window, let go."""
        expiring = tenant.expiring
        grace = self.tuning.grace
        while expiring and expiring[0][0] < now:
            _, key = expiring.popleft()
            state = tenant.keys.get(key)
            if state is not None and state.expires + grace < now:
                del tenant.keys[key]
        if now - tenant.turned > self.tuning.failed_repeat:
            tenant.stale, tenant.recent, tenant.turned = tenant.recent, {}, now

    # -- answers ------------------------------------------------------------------------------

    def findings(self) -> list[Finding]:
        """Every finding so far, per tenant and kind, in time order."""
        out = []
        for name, tenant in self._tenants.items():
            for kind in KINDS:
                for episode in self._episodes(tenant, kind):
                    out.append(_finding(name, kind, episode))
        return sorted(out, key=lambda f: (f.first_at, f.tenant, f.kind))

    def _episodes(self, tenant: _Tenant, kind: str) -> list[Episode]:
        seen = squared(tenant.seen) if kind == KEY_PER_RETRY else tenant.seen
        floor = _FLOORS.get(kind)
        return tenant.series[kind].episodes(seen, self.thresholds, floor)

    def ttl(self) -> list[TtlAdvice]:
        """The learned TTLs. A return after expiry is a retry the TTL should have covered,
        unless it belongs to a ``retry_after_expiry`` finding: a loop is to be fixed, not
        accommodated."""
        return self._ttl.advice(self.bounds, self._late_retries())

    def _late_retries(self) -> Iterable[tuple[str, str, float]]:
        size = self.tuning.bucket
        for name, tenant in self._tenants.items():
            loops = self._episodes(tenant, RETRY_AFTER_EXPIRY)
            for bucket, route, delay in tenant.late:
                at = bucket * size
                if not any(e.first_at - size <= at <= e.last_at for e in loops):
                    yield name, route, delay

    def trim(self, now: float) -> None:
        """Forget buckets older than the history (the live worker calls this now and then)."""
        oldest = int(now // self.tuning.bucket) - self.tuning.history
        for tenant in self._tenants.values():
            for index in [i for i in tenant.seen if i < oldest]:
                del tenant.seen[index]
            tenant.late = [late for late in tenant.late if late[0] >= oldest]
            for series in tenant.series.values():
                series.forget_before(oldest)


def analyze(
    records: Iterable[Usage],
    tuning: Tuning | None = None,
    thresholds: Thresholds | None = None,
    bounds: TtlBounds | None = None,
) -> Analyzer:
    """A log analysed in one pass."""
    analyzer = Analyzer(tuning, thresholds, bounds)
    analyzer.feed_all(records)
    return analyzer


def _finding(tenant: str, kind: str, episode: Episode) -> Finding:
    return Finding(
        tenant=tenant,
        kind=kind,
        first_at=episode.first_at,
        last_at=episode.last_at,
        events=episode.events,
        detail=_DETAILS[kind](episode),
    )


def _examples(episode: Episode) -> str:
    return ", ".join(episode.examples)


def _usual(episode: Episode) -> str:
    return f"about {episode.expected:.0f} would be usual for this tenant"


_DETAILS = {
    KEY_PER_RETRY: lambda e: (
        f"{e.events} requests were sent again under a fresh idempotency key seconds after the "
        f"same request ({_usual(e)}), so each executed twice: reuse the key of the first "
        f"attempt when retrying (example keys: {_examples(e)})."
    ),
    KEY_REUSE: lambda e: (
        f"{e.events} requests reused an idempotency key already used for a different request "
        f"and were refused (422) ({_usual(e)}): mint a new key per logical operation "
        f"(example keys: {_examples(e)})."
    ),
    REPLAY_STORM: lambda e: (
        f"{e.events} replays of completed requests, far beyond any retry schedule, from "
        f"{e.sources} addresses ({_usual(e)}): check for a bot or replayed traffic and rotate "
        f"credentials if they are not yours (example keys: {_examples(e)})."
    ),
    RETRY_AFTER_EXPIRY: lambda e: (
        f"{e.events} keys came back after their record had expired and executed again "
        f"({_usual(e)}): stop the retry loop sooner, or keep keys longer (see the learned TTL) "
        f"(example keys: {_examples(e)})."
    ),
    NO_BACKOFF: lambda e: (
        f"{e.events} retries were fired while the first attempt was still running, ignoring "
        f"Retry-After (409s; {_usual(e)}): back off exponentially and honour Retry-After "
        f"(example keys: {_examples(e)})."
    ),
}
