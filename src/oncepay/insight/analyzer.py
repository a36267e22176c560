"""The detectors: each decision of the log classified, exactly, as evidence of a kind or not,
then judged per tenant against that tenant's own normal (:mod:`oncepay.insight.baseline`).

What makes a decision evidence (a key is tracked from its first send):

``key_per_retry``
    an execution under a *fresh* key of a request (route and fingerprint) that executed under
    another key seconds before, or minutes before when that first attempt failed (5xx). A
    product whose identical baskets repeat legitimately repeats at the tenant's usual pace, not
    seconds apart; the few that happen to fall close are the tenant's baseline. Both sends must
    come from the same address when the log gives both: a flash deal's identical requests from
    thousands of customers seconds apart are no client's retry.
``key_reuse``
    a ``reused`` decision (the 422: one key, another request).
``replay_storm``
    a replay of a key already replayed more times than a retry schedule sends, once it comes
    more than ten minutes after the key's first send (a flaky client's dozen retries of one key
    all fall within a minute or two) or faster than one a second since then; the fourth
    replay of a key from an address other than the one that first sent it; or a replay from
    another address more than ten minutes after the first send.
``retry_after_expiry``
    an execution of a key whose record had expired: the key came back after its TTL with the
    request it was first sent with (the same fingerprint; a key reused for another request
    once its record expired is a new key, not a retry).
``no_backoff``
    a 409 (``in_progress``) less than a second after the key's previous send, once the key has
    drawn a quick 409 right after another 409 of its own (one not sent after a patient wait of
    ten seconds or more: a client that timed out at 30 s may start its backoff at half a
    second), or two quick 409s: the client fires again and again while the first attempt
    still runs. One quick 409 after the executing
    request (a double click) is not evidence, nor are 409s spaced as ``Retry-After`` asks.
    A key's tenth quick 409 (hammering, which no backoff schedule does) is also judged against
    no baseline at all, so that a client broken from before the log began is found.

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
from typing import Any

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
from oncepay.insight.records import Row, Usage, UsageReader
from oncepay.insight.ttl import TtlBounds, TtlLearner

__all__ = ["Analyzer", "Evidence", "Tuning", "analyze"]

# A finding's evidence beyond SPEC §9's fields (the live path stores it with the finding).
Evidence = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Tuning:
    """The detectors' constants, each with its reason."""

    # Ten-minute buckets: short enough that an hour's anomaly fills several, long enough that a
    # small tenant's bucket holds a rate.
    bucket: float = 600.0
    # A fresh key for the same request this soon is a retry, not a customer buying again: a
    # person takes longer than ten seconds to pay twice for the same basket. (Wider, to cover a
    # client's 30 s timeout, a shop whose identical baskets come from one server address sees
    # chance repeats that its baseline no longer explains: left at ten seconds.)
    quick_repeat: float = 10.0
    # ... and this soon after a failed (5xx) attempt, a retry under a fresh key.
    failed_repeat: float = 300.0
    # Executions of one request from one address in a row (each within minutes of the last)
    # that a client retrying lost answers makes: the first and two retries. More is a batch of
    # identical requests (a subscription's renewals of one plan from its server), none a retry.
    retry_chain: int = 3
    # More replays of one key than a retry schedule sends (exponential backoff stops at 5-8; a
    # flaky client's linear one may send a dozen or more within a minute or two, so more than
    # this many is evidence only past ``replay_late`` or faster than one a ``no_backoff_gap``).
    replay_schedule: int = 8
    # Replays of one key from this many addresses other than the one that sent it: a phone
    # that moves from Wi-Fi to mobile data changes address once or twice, not four times.
    replay_addresses: int = 4
    # ... and this many: a key that sixteen addresses replay is no client's retry anywhere (a
    # stolen response replayed by a botnet), judged against no baseline at all, so that a storm
    # that lasts a day or started before the log cannot become the tenant's normal.
    replay_crowd: int = 16
    # A replay from another address this long after the first send: past any client's retry
    # schedule, and a terminal that retries hours later does so from where it stands.
    replay_late: float = 600.0
    # A 409 this soon after the key's previous send: no backoff at all (a client that honours
    # Retry-After, one second or more, waits longer).
    no_backoff_gap: float = 1.0
    # Quick 409s of one key that make it evidence: a double click (or a 409 logged just after
    # its executing request) makes one; a client that does not back off, several. One quick 409
    # after another 409 is enough: a double click draws a single one.
    no_backoff_conflicts: int = 2
    # ... unless that other 409 came this long after the key's previous send: the client waited
    # out a timeout (30 s is usual) and then starts a backoff, whose first step may be short.
    patient_timeout: float = 10.0
    # A key's quick 409s that no tenant's normal explains, judged against no baseline at all (so
    # that a client deploy that stays broken cannot become the normal): no backoff schedule, with
    # jitter or without, fires ten times within a second of its previous try.
    no_backoff_hammering: int = 10
    # 422s of one key (each for a request other than the one it was first sent with) from which
    # on each is judged against no baseline at all: a client that mints keys gets the odd one
    # refused; one refused ten times uses a constant key, and a tenant whose client did so from
    # before the log began must not have that as its normal.
    reuse_hoarding: int = 10
    # Findings of one tenant and kind this close together are one anomaly, reported once (an
    # app release that drifts for two days is one finding, not one per busy hour); anomalies
    # further apart stay findings of their own.
    merge_gap: float = 2 * 3600.0
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
# ... and where the tenant's history holds no evidence of the kind at all: no chance repeats to
# allow for, and every duplicate execution moved money.
_QUIET_FLOORS = {KEY_PER_RETRY: 5}
# Kinds whose evidence needs no history to appear, so that a tenant's first days can be its
# reference when the baseline is an anomaly that never stopped (a key back after expiry, or a
# late replay from another address, needs keys sent long before: the first days have none).
_ONSET = frozenset({KEY_PER_RETRY, KEY_REUSE, NO_BACKOFF})


class _Key:
    """What is known of a key sent more than once. A key sent once (most are) is a plain tuple
    ``(first send, TTL, route, source, fingerprint's hash)``, cheaper to make and to keep; its
    second send turns it into one of these. The fingerprint is kept as its ``hash()`` (0 for
    none): a key is only ever compared with itself, and a hex digest per key would cost a
    quarter more memory."""

    __slots__ = (
        "conflicted",
        "conflicts",
        "counted",
        "expires",
        "fingerprint",
        "first",
        "last",
        "replays",
        "returns",
        "reuses",
        "route",
        "source",
        "strangers",
    )

    def __init__(
        self, first: float, ttl: float, route: str, source: str | None, fingerprint: int
    ) -> None:
        self.first = self.last = first
        self.expires = first + ttl
        self.route = route
        self.source = source
        self.fingerprint = fingerprint
        self.replays = self.conflicts = self.returns = self.reuses = 0
        # The other addresses its replays came from (kept only for a key replayed from one).
        self.strangers: set[str] | None = None
        self.conflicted = False  # whether its latest send drew a 409 without a patient wait
        self.counted = False  # whether its quick 409s are no_backoff evidence


_Once = tuple[float, float, str, "str | None", int]
_Sent = tuple[float, str, int, "str | None", int, tuple[int, ...]]


def _expires(state: _Key | _Once) -> float:
    if type(state) is tuple:
        return state[0] + state[1]
    return state.expires  # type: ignore[union-attr]


class _Tenant:
    """One tenant's keys, recent requests, decisions per bucket and evidence per kind."""

    __slots__ = (
        "batch",
        "batches",
        "bucket",
        "count",
        "crowded",
        "hoarded",
        "keys",
        "late",
        "name",
        "recent",
        "routes",
        "seen",
        "series",
        "severe",
        "stale",
        "stormy",
        "turned",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.keys: dict[str, _Key | _Once] = {}
        # The keys sent in each bucket, looked at together once the usual TTL and the grace
        # have passed: (when, keys), in send order; ``batch`` the current bucket's.
        self.batches: deque[tuple[float, list[str]]] = deque()
        self.batch: list[str] = []
        # request -> its last execution: (at, key, status, source, executions of the request
        # from that address in a row, the buckets of those counted as key_per_retry evidence)
        self.recent: dict[tuple[str, str], _Sent] = {}
        self.stale: dict[tuple[str, str], _Sent] = {}
        self.turned = -math.inf  # when ``recent`` last became ``stale``
        # Decisions per bucket; the current bucket's are counted in ``count`` until it changes.
        self.seen: dict[int, int] = {}
        self.bucket = -1
        self.count = 0
        # Repeats held back from the TTL until the findings say whether they are retries: returns
        # after expiry, and replays that are storm evidence (bucket, route, delay).
        self.late: list[tuple[int, str, float]] = []
        self.stormy: list[tuple[int, str, float]] = []
        self.series = {kind: Series() for kind in KINDS}
        self.severe = Series()  # no_backoff keys hammering (a key each), beyond any baseline
        self.hoarded = Series()  # 422s of keys refused ten times or more, beyond any baseline
        self.crowded = Series()  # replays of keys replayed from 16 addresses, beyond any baseline
        # route -> (the route's one string, shared by its keys; its first sends per hour)
        self.routes: dict[str, tuple[str, dict[int, int]]] = {}

    def settle(self) -> dict[int, int]:
        """Decisions per bucket, the current one's included."""
        if self.count:
            self.seen[self.bucket] = self.seen.get(self.bucket, 0) + self.count
            self.count = 0
        return self.seen


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
        self.latest = -math.inf  # the time of the latest decision fed
        # Tenants with new evidence since the caller last emptied this (the live path: only
        # their findings can have grown).
        self.evidenced: set[str] = set()
        self._tenants: dict[str, _Tenant] = {}
        self._ttl = TtlLearner()

    def feed_all(self, records: Iterable[Usage] | UsageReader) -> None:
        """Take a log's decisions (a reader's blocks, the fastest, or any records)."""
        if isinstance(records, UsageReader):
            for block in records.blocks():
                self.feed_rows(block)
        else:
            self.feed_rows(records)

    def feed(self, usage: Usage) -> None:
        """Take one decision (in time order; a little disorder is tolerated)."""
        self.feed_rows((usage,))

    def feed_rows(self, rows: Iterable[Row]) -> None:
        """Take decisions in time order (a little disorder is tolerated): rows, or
        :class:`Usage` records (the same fields, in the same order).

        One loop with the first send of a key written out in it: that is most decisions, and
        a call per decision would cost as much as the rest of the work."""
        tenants = self._tenants
        size, default_ttl = self.tuning.bucket, self.tuning.default_ttl
        count, at = 0, self.latest
        for row in rows:
            at, name, route, key, fingerprint, decision, status, source, ttl = row
            count += 1
            tenant = tenants.get(name)
            if tenant is None:
                tenant = tenants[name] = _Tenant(name)
            bucket = int(at // size)
            if bucket != tenant.bucket:
                self._next_bucket(tenant, bucket, at)
            tenant.count += 1
            if not key:
                continue
            keys = tenant.keys
            state = keys.get(key)
            if state is not None or decision != "executed":
                kind = self._classify(tenant, row, state, bucket)
                if kind is not None:
                    tenant.series[kind].evidence(bucket, at, key, source)
                    self.evidenced.add(name)
                continue
            # A key's first send.
            known = tenant.routes.get(route)
            if known is None:
                known = tenant.routes[route] = (route, self._ttl.first_sends(name, route))
            route, hours = known
            keys[key] = (at, ttl or default_ttl, route, source, hash(fingerprint))
            tenant.batch.append(key)
            hour = int(at // 3600)
            hours[hour] = hours.get(hour, 0) + 1
            request = (route, fingerprint)
            before = tenant.recent.get(request) or tenant.stale.get(request)
            if before is None or not fingerprint:
                tenant.recent[request] = (at, key, status, source, 1, ())
            else:  # a request executed again under a fresh key (rare: a call is fine)
                self._executed_anew(tenant, request, before, row, bucket)
        if count:
            self.records += count
            self.latest = max(self.latest, at)
            self._ttl.reach(self.latest)

    def _executed_anew(
        self, tenant: _Tenant, request: tuple[str, str], before: _Sent, row: Row, bucket: int
    ) -> None:
        """A key's first send whose request (route and fingerprint) executed minutes before
        under another key: a retry under a fresh key, or the same request made again."""
        at, key, status, source = row[0], row[3], row[6], row[7]
        if before[1] == key or (
            source is not None and before[3] is not None and source != before[3]
        ):
            # the same request from another address: another customer's
            tenant.recent[request] = (at, key, status, source, 1, ())
            return
        executions, counted = before[4] + 1, before[5]
        if executions > self.tuning.retry_chain:
            # The same request executed again and again from one address under fresh keys: a
            # batch of identical requests (renewals of one plan), not a client retrying a lost
            # answer; what was counted of it was no evidence.
            if counted:
                tenant.series[KEY_PER_RETRY].retract(counted)
            tenant.recent[request] = (at, key, status, source, executions, ())
            return
        gap = at - before[0]
        quick, failed = self.tuning.quick_repeat, self.tuning.failed_repeat
        if gap <= quick or (before[2] >= 500 and gap <= failed):
            tenant.series[KEY_PER_RETRY].evidence(bucket, at, key, source)
            self.evidenced.add(tenant.name)
            counted = (*counted, bucket)
        tenant.recent[request] = (at, key, status, source, executions, counted)

    def _next_bucket(self, tenant: _Tenant, bucket: int, now: float) -> None:
        """A tenant's decision in another bucket than its last: the last one's count and keys
        put away, and what is too old let go of (once a bucket, not on every record)."""
        tenant.settle()
        if tenant.batch:  # looked at again once a usual TTL and the grace have passed
            forget = (tenant.bucket + 1) * self.tuning.bucket + self.tuning.default_ttl
            tenant.batches.append((forget + self.tuning.grace, tenant.batch))
            tenant.batch = []
        tenant.bucket = bucket
        self._forget(tenant, now)

    # -- classification of every decision but a first send -----------------------------------

    def _classify(
        self, tenant: _Tenant, usage: Row, state: _Key | _Once | None, bucket: int
    ) -> str | None:
        decision = usage[5]
        if decision == "reused":
            if state is not None:
                self._reused(tenant, usage, state, bucket)
            return KEY_REUSE
        if state is None:  # a key first sent before the log began: no delay to learn from
            if decision in ("replayed", "in_progress"):
                self._remember(tenant, usage)
            return None
        if type(state) is tuple:  # its second send: from now on its counts are kept
            state = tenant.keys[usage[3]] = _Key(*state)
        assert isinstance(state, _Key)
        if decision == "executed":
            return self._executed_again(tenant, usage, state, bucket)
        if decision == "replayed":
            return self._replayed(tenant, usage, state, bucket)
        if decision == "in_progress":
            return self._conflict(tenant, usage, state, bucket)
        return None

    def _reused(self, tenant: _Tenant, usage: Row, state: _Key | _Once, bucket: int) -> None:
        """A 422 of a key sent before: from the key's tenth on, also evidence judged against no
        baseline (one key refused for other requests that often is a client that mints none)."""
        if type(state) is tuple:
            state = tenant.keys[usage[3]] = _Key(*state)
        assert isinstance(state, _Key)
        state.reuses += 1
        if state.reuses >= self.tuning.reuse_hoarding:
            tenant.hoarded.evidence(bucket, usage[0], usage[3], usage[7])

    def _executed_again(self, tenant: _Tenant, usage: Row, state: _Key, bucket: int) -> str | None:
        at = usage[0]
        expired = at > state.expires
        state.last, state.conflicted = at, False
        if not expired:  # a takeover
            self._repeat(tenant, at, state)
            return None
        life = usage[8] or self.tuning.default_ttl
        fingerprint = hash(usage[4])
        if fingerprint and state.fingerprint and fingerprint != state.fingerprint:
            # The key reused for another request once its record expired: a new key, no retry.
            tenant.keys[usage[3]] = _Key(at, life, state.route, usage[7], fingerprint)
            tenant.batch.append(usage[3])
            return None
        if state.returns == 0:  # the key's first return: a retry the TTL missed, or a loop
            tenant.late.append((bucket, state.route, at - state.first))
        state.returns += 1
        state.expires = at + life
        tenant.batch.append(usage[3])
        return RETRY_AFTER_EXPIRY

    def _replayed(self, tenant: _Tenant, usage: Row, state: _Key, bucket: int) -> str | None:
        at, source = usage[0], usage[7]
        state.last, state.conflicted = at, False
        state.replays += 1
        moved = source is not None and source != state.source
        if source is not None and moved:  # distinct addresses: a phone flips back and forth
            if state.strangers is None:
                state.strangers = set()
            if len(state.strangers) < self.tuning.replay_crowd:
                state.strangers.add(source)
        # More replays than a schedule sends are a storm only past the minutes a client's
        # retries last, or at a pace no backoff has (more than one a second since the first
        # send): a phone on a lossy network retries one key a dozen times in a minute or two.
        since = at - state.first
        many = state.replays > self.tuning.replay_schedule and (
            since > self.tuning.replay_late or since < state.replays * self.tuning.no_backoff_gap
        )
        elsewhere = len(state.strangers or ())
        scattered = elsewhere >= self.tuning.replay_addresses
        if elsewhere >= self.tuning.replay_crowd:  # no client roams that far: beyond any baseline
            tenant.crowded.evidence(bucket, at, usage[3], source)
        stolen = moved and at - state.first > self.tuning.replay_late
        if not (many or scattered or stolen):
            self._repeat(tenant, at, state)
            return None
        # Held back from the TTL until it is known whether a storm's finding holds it: a storm's
        # replays are no retries to cover, a late terminal's from another address are.
        tenant.stormy.append((bucket, state.route, at - state.first))
        return REPLAY_STORM

    def _conflict(self, tenant: _Tenant, usage: Row, state: _Key, bucket: int) -> str | None:
        at = usage[0]
        previous = state.last
        hurried = at - previous < self.tuning.no_backoff_gap
        again = state.conflicted
        self._repeat(tenant, at, state)
        state.last = at
        # A 409 makes the next quick one a repeat offence unless the client waited out a
        # patient timeout before it: one that gave up after 30 s and backs off from half a
        # second on draws one quick 409; one that gives up after a second does not wait.
        state.conflicted = at - previous < self.tuning.patient_timeout
        if not hurried:
            return None
        state.conflicts += 1  # quick ones only
        if state.conflicts == self.tuning.no_backoff_hammering:
            tenant.severe.evidence(bucket, at, usage[3], usage[7])
        if state.counted or again or state.conflicts >= self.tuning.no_backoff_conflicts:
            state.counted = True  # from now on each quick 409 of the key is one more
            return NO_BACKOFF
        return None

    # -- keys ---------------------------------------------------------------------------------

    def _remember(self, tenant: _Tenant, usage: Row) -> None:
        key, life = usage[3], usage[8] or self.tuning.default_ttl
        tenant.keys[key] = _Key(usage[0], life, usage[2], usage[7], hash(usage[4]))
        tenant.batch.append(key)

    def _repeat(self, tenant: _Tenant, at: float, state: _Key) -> None:
        self._ttl.repeat(tenant.name, state.route, at - state.first, at)

    def _forget(self, tenant: _Tenant, now: float) -> None:
        """Keys past expiry and grace, and requests older than any retry window, let go."""
        batches, keys = tenant.batches, tenant.keys
        grace = self.tuning.grace
        while batches and batches[0][0] < now:
            for key in batches.popleft()[1]:
                state = keys.pop(key, None)
                if state is not None and _expires(state) + grace >= now:  # a longer TTL
                    keys[key] = state
                    tenant.batch.append(key)  # looked at again later
        if now - tenant.turned > self.tuning.failed_repeat:
            tenant.stale, tenant.recent, tenant.turned = tenant.recent, {}, now

    # -- answers ------------------------------------------------------------------------------

    def findings(self, tenants: Iterable[str] | None = None) -> list[Finding]:
        """Every finding so far (of ``tenants``, or all), per tenant and kind, in time order."""
        return [finding for finding, _ in self.reports(tenants)]

    def reports(self, tenants: Iterable[str] | None = None) -> list[tuple[Finding, Evidence]]:
        """The findings with their evidence: example keys (as logged: hashes), how many
        addresses sent the evidence, and how many events the tenant's baseline expected."""
        names = self._tenants if tenants is None else tenants
        out = []
        for name in names:
            tenant = self._tenants.get(name)
            if tenant is None:
                continue
            for kind in KINDS:
                for episode in _merged(self._episodes(tenant, kind), self.tuning.merge_gap):
                    out.append((_finding(name, kind, episode), _evidence(episode)))
        return sorted(out, key=lambda r: (r[0].first_at, r[0].tenant, r[0].kind))

    def _episodes(self, tenant: _Tenant, kind: str) -> list[Episode]:
        counts = tenant.settle()
        seen = squared(counts) if kind == KEY_PER_RETRY else counts
        series = tenant.series[kind]
        floor, quiet = _FLOORS.get(kind), _QUIET_FLOORS.get(kind)
        severe = {
            NO_BACKOFF: tenant.severe,
            KEY_REUSE: tenant.hoarded,
            REPLAY_STORM: tenant.crowded,
        }.get(kind)
        return series.episodes(
            seen,
            self.thresholds,
            floor,
            quiet,
            onset=kind in _ONSET,
            severe=severe,
            slow_over_usual=kind != KEY_PER_RETRY,  # chance repeats of identical baskets
        )

    def ttl(self) -> list[TtlAdvice]:
        """The learned TTLs. A return after expiry is a retry the TTL should have covered,
        unless it belongs to a ``retry_after_expiry`` finding: a loop is to be fixed, not
        accommodated. Likewise a replay that is storm evidence counts as a retry unless it
        belongs to a ``replay_storm`` finding: a storm's thousands of replays, hours after the
        first sends, would otherwise be most of the route's retries and pull its TTL towards
        their delays, leaving the genuine late retries uncovered."""
        return self._ttl.advice(self.bounds, self._held_back())

    def _held_back(self) -> Iterable[tuple[str, str, float]]:
        for tenant in self._tenants.values():
            yield from self._outside(tenant, RETRY_AFTER_EXPIRY, tenant.late)
            yield from self._outside(tenant, REPLAY_STORM, tenant.stormy)

    def _outside(
        self, tenant: _Tenant, kind: str, held: list[tuple[int, str, float]]
    ) -> Iterable[tuple[str, str, float]]:
        """The held-back observations of ``kind`` that no finding of it holds."""
        if not held:
            return
        size = self.tuning.bucket
        episodes = self._episodes(tenant, kind)
        for bucket, route, delay in held:
            at = bucket * size
            if not any(e.first_at - size <= at <= e.last_at for e in episodes):
                yield tenant.name, route, delay

    def trim(self, now: float) -> None:
        """Forget buckets older than the history (the live worker calls this now and then)."""
        oldest = int(now // self.tuning.bucket) - self.tuning.history
        for tenant in self._tenants.values():
            tenant.settle()
            for index in [i for i in tenant.seen if i < oldest]:
                del tenant.seen[index]
            tenant.late = [late for late in tenant.late if late[0] >= oldest]
            tenant.stormy = [replay for replay in tenant.stormy if replay[0] >= oldest]
            for series in (*tenant.series.values(), tenant.severe, tenant.hoarded, tenant.crowded):
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


def _evidence(episode: Episode) -> Evidence:
    return {
        "example_keys": list(episode.examples),
        "sources": episode.sources,
        "expected": round(episode.expected, 2),
    }


def _examples(episode: Episode) -> str:
    return ", ".join(episode.examples)


def _usual(episode: Episode) -> str:
    return f"about {episode.expected:.0f} would be usual for this tenant"


def _n(count: int, one: str, many: str) -> str:
    """``count`` and the word that agrees with it: "1 address", "3 addresses"."""
    return f"{count} {one if count == 1 else many}"


_DETAILS = {
    KEY_PER_RETRY: lambda e: (
        f"{_n(e.events, 'request was', 'requests were')} sent again under a fresh idempotency "
        f"key seconds after the same request ({_usual(e)}), so each executed twice: reuse the "
        f"key of the first attempt when retrying (example keys: {_examples(e)})."
    ),
    KEY_REUSE: lambda e: (
        f"{_n(e.events, 'request', 'requests')} reused an idempotency key already used for a "
        f"different request and {'was' if e.events == 1 else 'were'} refused (422) "
        f"({_usual(e)}): mint a new key per logical operation (example keys: {_examples(e)})."
    ),
    REPLAY_STORM: lambda e: (
        f"{_n(e.events, 'replay', 'replays')} of completed requests, far beyond any retry "
        f"schedule, from {_n(e.sources, 'address', 'addresses')} ({_usual(e)}): check for a "
        f"bot or replayed traffic and rotate credentials if they are not yours (example keys: "
        f"{_examples(e)})."
    ),
    RETRY_AFTER_EXPIRY: lambda e: (
        f"{_n(e.events, 'key', 'keys')} came back after their record had expired and executed "
        f"again ({_usual(e)}): stop the retry loop sooner, or keep keys longer (see the learned "
        f"TTL) (example keys: {_examples(e)})."
    ),
    NO_BACKOFF: lambda e: (
        f"{_n(e.events, 'retry was', 'retries were')} fired while the first attempt was still "
        f"running, less than a second after the previous one, ignoring Retry-After (409s; "
        f"{_usual(e)}): back off exponentially and honour Retry-After (example keys: "
        f"{_examples(e)})."
    ),
}


def _merged(episodes: list[Episode], gap: float) -> list[Episode]:
    """``episodes`` (in time order) with those less than ``gap`` apart joined into one: their
    events and expectations added, the first examples kept, the most addresses any of them had
    (the same clients, more often than not)."""
    joined: list[Episode] = []
    for episode in sorted(episodes, key=lambda e: e.first_at):
        last = joined[-1] if joined else None
        if last is None or episode.first_at - last.last_at > gap:
            joined.append(episode)
            continue
        joined[-1] = Episode(
            first_at=last.first_at,
            last_at=max(last.last_at, episode.last_at),
            events=last.events + episode.events,
            expected=last.expected + episode.expected,
            examples=tuple(dict.fromkeys(last.examples + episode.examples))[:3],
            sources=max(last.sources, episode.sources),
        )
    return joined
