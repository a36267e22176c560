"""A tenant's normal, and what stands out from it.

Time is cut into buckets (ten minutes). For each kind a bucket holds the decisions that are
evidence of it and the decisions seen at all (the opportunity: a sale day multiplies both). The
tenant's baseline rate is its pooled rate over blocks of six hours, leaving out the tenth of
blocks with the highest rates: anomalies take a minority of the time, so they are left out,
while a flaky-network tenant whose clients always retry a lot gets a high baseline of its own.
A run of buckets above the baseline (gaps of a few quiet buckets allowed) is an *episode*; it
is a finding when its evidence both reaches a floor and exceeds what the baseline predicts by
a multiple plus a Poisson margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Episode", "Series", "Thresholds"]


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How far above its normal a tenant must go. ``floor``: fewest evidence events for a
    finding; ``ratio`` and ``z``: evidence must exceed ``ratio`` x expected + ``z`` x its
    Poisson spread; ``gap``: quiet buckets an episode may span."""

    floor: int = 5
    ratio: float = 3.0
    z: float = 3.0
    gap: int = 3
    # The baseline's blocks, in buckets: six hours (an anomaly window is one to a few hours).
    block: int = 36
    # Blocks with fewer decisions say little about a rate: they do not vote on the median.
    min_opportunity: int = 20


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

    def forget_before(self, bucket: int) -> None:
        """Drop buckets older than ``bucket`` (the live worker's bounded history)."""
        for index in [i for i in self._buckets if i < bucket]:
            del self._buckets[index]

    def baseline(self, seen: dict[int, int], thresholds: Thresholds) -> float:
        """The tenant's usual evidence rate per decision, over blocks of several hours: the
        pooled rate of all but the tenth of blocks with the highest rates (an anomaly window
        spoils one or two blocks; a median would read 0 for evidence that is rare but usual)."""
        events: dict[int, int] = {}
        decisions: dict[int, int] = {}
        for index, count in seen.items():
            block = index // thresholds.block
            decisions[block] = decisions.get(block, 0) + count
        for index, cell in self._buckets.items():
            block = index // thresholds.block
            events[block] = events.get(block, 0) + cell.events
        rated = sorted(
            (events.get(block, 0) / count, events.get(block, 0), count)
            for block, count in decisions.items()
            if count >= thresholds.min_opportunity
        )
        kept = rated[: len(rated) - len(rated) // 10]  # the busiest tenth may be the anomaly
        opportunity = sum(count for _, _, count in kept)
        return sum(n for _, n, _ in kept) / opportunity if opportunity else 0.0

    def episodes(self, seen: dict[int, int], thresholds: Thresholds) -> list[Episode]:
        """Runs of buckets above the baseline that make a finding."""
        rate = self.baseline(seen, thresholds)
        runs: list[list[tuple[_Bucket, int]]] = []
        last = None
        for index in sorted(self._buckets):
            cell, opportunity = self._buckets[index], seen.get(index, 0)
            if cell.events <= rate * opportunity:
                continue
            if last is None or index - last > thresholds.gap + 1:
                runs.append([])
            runs[-1].append((cell, opportunity))
            last = index
        episodes = (_episode(run, rate) for run in runs)
        return [episode for episode in episodes if _stands_out(episode, thresholds)]


def _episode(run: list[tuple[_Bucket, int]], rate: float) -> Episode:
    cells = [cell for cell, _ in run]
    examples = tuple(dict.fromkeys(c.example for c in cells if c.example))[:3]
    sources: set[str] = set()
    for cell in cells:
        sources |= cell.sources
    return Episode(
        first_at=min(c.first_at for c in cells),
        last_at=max(c.last_at for c in cells),
        events=sum(c.events for c in cells),
        expected=rate * sum(opportunity for _, opportunity in run),
        examples=examples,
        sources=len(sources),
    )


def _stands_out(episode: Episode, thresholds: Thresholds) -> bool:
    expected = episode.expected
    bar = thresholds.ratio * expected + thresholds.z * math.sqrt(expected + 1.0)
    return episode.events >= thresholds.floor and episode.events > bar
