"""A tenant's normal, and what stands out from it.

Time is cut into buckets (ten minutes). For each kind a bucket holds the decisions that are
evidence of it and the decisions seen at all (the opportunity: a sale day multiplies both). The
tenant's baseline rate is its pooled rate over blocks of six hours, leaving out the tenth of
blocks with the highest rates: anomalies take a minority of the time, so they are left out,
while a flaky-network tenant whose clients always retry a lot gets a high baseline of its own.
A run of buckets above the baseline (gaps of a few quiet buckets allowed) is an *episode*; it
is a finding when its evidence both reaches a floor and exceeds what the baseline predicts by
a multiple plus a Poisson margin. Evidence that arrives an event every half hour or hour never
makes such a run: the buckets above the baseline are also joined across quiet stretches of up to
six hours, and such a slow run, judged over all of its span (with a margin of 4 Poisson standard
deviations rather than 3), is a finding too where no run's finding overlaps it. An anomaly
that never stops would be its own baseline: where the tenant's first blocks hold a third or less
of what the baseline predicts for them, what follows them is judged against their rate too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

__all__ = ["Episode", "Series", "Thresholds", "squared"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How far above its normal a tenant must go. ``floor``: fewest evidence events for a
    finding; ``ratio`` and ``z``: evidence must exceed ``ratio`` x expected + ``z`` x its
    Poisson spread; ``gap``: quiet buckets an episode may span."""

    floor: int = 5
    ratio: float = 3.0
    z: float = 3.0
    gap: int = 3
    # Quiet buckets a slow episode may span (six hours): a loop that sends one bad request an
    # hour is as much an anomaly as one that sends ten in ten minutes, if it stands out.
    slow_gap: int = 36
    # ... judged with a wider Poisson margin: joined across hours, runs can be cut in many more
    # ways, so chance finds more of them.
    slow_z: float = 4.0
    # The baseline's blocks, in buckets: six hours (an anomaly window is one to a few hours).
    block: int = 36
    # Blocks with fewer decisions say little about a rate: they do not vote on the median.
    min_opportunity: int = 20
    # The tenant's first blocks (two days), its reference when the baseline may be an anomaly
    # that never stopped; and the evidence the baseline must predict for them before their
    # having a third of it or less says anything (at 10, seeing 3 or fewer is a 1 % chance).
    reference: int = 8
    reference_evidence: float = 10.0


@dataclass(slots=True)
class _Bucket:
    events: int = 0
    first_at: float = math.inf
    last_at: float = -math.inf
    example: str = ""
    sources: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Episode:
    """Buckets that stood out together, and their evidence."""

    first_at: float
    last_at: float
    events: int
    expected: float
    examples: tuple[str, ...]
    sources: int


# Distinct sources kept per bucket: enough to say "from many addresses", bounded.
_MAX_SOURCES = 256

# A block of the baseline: its index, its evidence, its decisions (the opportunity).
_Block = tuple[int, int, float]


class Series:
    """One tenant's evidence of one kind, bucket by bucket. The opportunity (decisions seen per
    bucket) is the tenant's, shared by its kinds, and passed in when judging."""

    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}

    def evidence(self, bucket: int, at: float, key: str, source: str | None) -> None:
        """A decision in ``bucket`` that is evidence of this kind."""
        cell = self._buckets.get(bucket)
        if cell is None:
            cell = self._buckets[bucket] = _Bucket(first_at=at, example=key)
        cell.events += 1
        cell.last_at = max(cell.last_at, at)
        if source is not None and len(cell.sources) < _MAX_SOURCES:
            cell.sources.add(source)

    def retract(self, buckets: tuple[int, ...]) -> None:
        """Take back evidence counted in ``buckets`` (one event each) that later decisions
        showed was none."""
        for bucket in buckets:
            cell = self._buckets.get(bucket)
            if cell is None:
                continue
            cell.events -= 1
            if cell.events <= 0:
                del self._buckets[bucket]

    def _episode(self, run: list[int], seen: Mapping[int, float], rate: float) -> Episode:
        """The run's evidence, and what the baseline predicts over all of its span: the quiet
        buckets inside it count too (counting only the buckets above the baseline would pick
        the lucky ones and find an anomaly in chance)."""
        cells = [self._buckets[index] for index in run]
        examples = tuple(dict.fromkeys(c.example for c in cells if c.example))[:3]
        sources: set[str] = set()
        for cell in cells:
            sources |= cell.sources
        return Episode(
            first_at=min(c.first_at for c in cells),
            last_at=max(c.last_at for c in cells),
            events=sum(c.events for c in cells),
            expected=rate * _opportunity(seen, run[0], run[-1]),
            examples=examples,
            sources=len(sources),
        )

    def forget_before(self, bucket: int) -> None:
        """Drop buckets older than ``bucket`` (the live worker's bounded history)."""
        for index in [i for i in self._buckets if i < bucket]:
            del self._buckets[index]

    def baseline(self, seen: Mapping[int, float], thresholds: Thresholds) -> float:
        """The tenant's usual evidence rate per decision, over blocks of several hours: the
        pooled rate of all but the tenth of blocks with the highest rates (an anomaly window
        spoils one or two blocks; a median would read 0 for evidence that is rare but usual)."""
        return self._baseline(seen, thresholds) or 0.0

    def _blocks(self, seen: Mapping[int, float], thresholds: Thresholds) -> list[_Block]:
        """(block, evidence, decisions) of each block with decisions enough to rate, in order."""
        events: dict[int, int] = {}
        decisions: dict[int, float] = {}
        for index, count in seen.items():
            block = index // thresholds.block
            decisions[block] = decisions.get(block, 0) + count
        for index, cell in self._buckets.items():
            block = index // thresholds.block
            events[block] = events.get(block, 0) + cell.events
        return [
            (block, events.get(block, 0), count)
            for block, count in sorted(decisions.items())
            if count >= thresholds.min_opportunity
        ]

    def _baseline(self, seen: Mapping[int, float], thresholds: Thresholds) -> float | None:
        """:meth:`baseline`, or None for a tenant with no history yet."""
        return _pooled(self._blocks(seen, thresholds))

    def _reference(
        self, seen: Mapping[int, float], thresholds: Thresholds, rate: float
    ) -> tuple[float, int] | None:
        """The evidence rate of the tenant's first blocks and the bucket where they end, when
        it is far below the baseline: the baseline is then an anomaly that never stopped (a
        client deploy that stayed broken), and what followed those blocks is judged against
        them too. None when the first blocks are not far below, or too few to say."""
        blocks = self._blocks(seen, thresholds)
        first = blocks[: thresholds.reference]
        if len(first) < thresholds.reference or len(blocks) == len(first):
            return None
        events = sum(n for _, n, _ in first)
        opportunity = sum(count for _, _, count in first)
        expected = rate * opportunity  # what the first blocks would hold at the baseline
        if expected < thresholds.reference_evidence or events * thresholds.ratio > expected:
            return None
        return events / opportunity, (first[-1][0] + 1) * thresholds.block

    def episodes(
        self,
        seen: Mapping[int, float],
        thresholds: Thresholds,
        floor: int | None = None,
        quiet_floor: int | None = None,
        *,
        onset: bool = False,
        severe: Series | None = None,
        slow_over_usual: bool = True,
    ) -> list[Episode]:
        """Runs of buckets above the baseline that make a finding, then the slow runs that do
        where they overlap none of those. ``quiet_floor``: the floor instead of ``floor`` for a
        tenant whose history holds no evidence of this kind at all. ``onset``: whether an
        anomaly that never stopped is looked for too, judged against the tenant's first blocks
        (for evidence that does not need history to appear: a return after expiry does).
        ``severe``: evidence of this kind that no tenant's normal explains, judged against no
        baseline at all; what stands out there is a finding where none already overlaps it.
        ``slow_over_usual``: whether slow runs are looked for above a baseline that is not zero
        (not for evidence that chance alone makes, such as identical baskets: over hours, its
        coincidences add up to a run that stands out by chance)."""
        known = self._baseline(seen, thresholds)
        rate = known or 0.0
        least = thresholds.floor if floor is None else floor
        if known == 0.0 and quiet_floor is not None:
            least = quiet_floor
        found = self._above(seen, thresholds, rate, least, 0, slow_over_usual)
        reference = self._reference(seen, thresholds, rate) if onset and rate else None
        if reference is not None:
            usual, since = reference
            found = _joined(
                found, self._above(seen, thresholds, usual, least, since, slow_over_usual)
            )
        if severe is not None:
            found = _joined(found, severe._above(seen, thresholds, 0.0, thresholds.floor, 0))
        return found

    def _above(
        self,
        seen: Mapping[int, float],
        thresholds: Thresholds,
        rate: float,
        floor: int,
        since: int,
        slow_over_usual: bool = True,
    ) -> list[Episode]:
        """The runs above ``rate`` from bucket ``since`` on that stand out, then the slow runs
        (above a rate that is not zero only if ``slow_over_usual``)."""
        cells = sorted(self._buckets.items())
        above = [i for i, cell in cells if i >= since and cell.events > rate * seen.get(i, 0)]
        found = self._standing_out(_runs(above, thresholds.gap), seen, rate, thresholds, floor)
        if rate and not slow_over_usual:
            return found
        slower = replace(thresholds, z=thresholds.slow_z)
        slow = self._standing_out(_runs(above, thresholds.slow_gap), seen, rate, slower, floor)
        return _joined(found, slow)

    def _standing_out(
        self,
        runs: list[list[int]],
        seen: Mapping[int, float],
        rate: float,
        thresholds: Thresholds,
        floor: int,
    ) -> list[Episode]:
        episodes = (self._episode(run, seen, rate) for run in runs)
        return [episode for episode in episodes if _stands_out(episode, thresholds, floor)]


def _pooled(blocks: list[_Block]) -> float | None:
    """The pooled rate of all blocks but the tenth with the highest rates; None for fewer than
    two blocks (no history yet: a live worker's first hours), so that the rules and the floors
    alone judge, or the anomaly would be its own baseline."""
    if len(blocks) < 2:
        return None
    rated = sorted((n / count, n, count) for _, n, count in blocks)
    # The busiest tenth may be the anomaly; in a log of a day or so, still the busiest block.
    kept = rated[: len(rated) - max(1, len(rated) // 10)]
    opportunity = sum(count for _, _, count in kept)
    return sum(n for _, n, _ in kept) / opportunity if opportunity else 0.0


def _joined(found: list[Episode], more: list[Episode]) -> list[Episode]:
    """``found`` and those of ``more`` that overlap none of it, in time order."""
    found = found + [
        e
        for e in more
        if not any(e.first_at <= f.last_at and f.first_at <= e.last_at for f in found)
    ]
    return sorted(found, key=lambda episode: episode.first_at)


def _runs(indexes: list[int], gap: int) -> list[list[int]]:
    """Sorted bucket indexes cut into runs, each with at most ``gap`` buckets missing between
    two of its own."""
    runs: list[list[int]] = []
    for index in indexes:
        if not runs or index - runs[-1][-1] > gap + 1:
            runs.append([])
        runs[-1].append(index)
    return runs


def _opportunity(seen: Mapping[int, float], first: int, last: int) -> float:
    if last - first < len(seen):
        return sum(seen.get(index, 0.0) for index in range(first, last + 1))
    return sum(count for index, count in seen.items() if first <= index <= last)


def squared(seen: Mapping[int, int]) -> dict[int, float]:
    """The opportunity for evidence that is a coincidence of two independent requests (the same
    basket paid twice within seconds by chance): it grows with the square of the volume, so a
    sale day at 8x the volume brings 64x the coincidences, not 8x. Scaled by the tenant's mean
    bucket so that it still reads as decisions."""
    mean = sum(seen.values()) / len(seen) if seen else 1.0
    return {index: count * count / mean for index, count in seen.items()}


def _stands_out(episode: Episode, thresholds: Thresholds, floor: int) -> bool:
    expected = episode.expected
    bar = thresholds.ratio * expected + thresholds.z * math.sqrt(expected + 1.0)
    return episode.events >= floor and episode.events > bar
