"""What an acquirer client has seen lately: how long its attempts took and how many failed.

Two uses:

* **backoff that stretches with latency** — :class:`wait_stretched`, a tenacity wait policy:
  capped exponential backoff with full jitter (tenacity's ``wait_random_exponential``) whose
  base is the acquirer's recent p50 latency when that is longer than the configured base. A
  slow acquirer is given room to recover in proportion to how slow it is; the cap still holds.
* **retries from health** — :meth:`Health.failing`: while the acquirer's last three attempts,
  whoever made them, all failed, no retry is made.
* **failover from health** — :meth:`Health.degraded`: an acquirer whose last three attempts
  all failed, that fails at least half of its recent attempts, or whose p90 latency nears the
  attempt timeout, is passed over for new payments (and for the next attempt of a failing one)
  before its breaker trips, and is not retried. The verdict looks at a short window only, so
  it expires by itself (or with the next success) and the acquirer is tried again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from tenacity import RetryCallState, wait_random_exponential
from tenacity.wait import wait_base

__all__ = ["Health", "wait_stretched"]

# Seconds of attempts the health verdict looks at: a few seconds of bad answers is a pattern,
# and a verdict older than this has expired, so a recovered acquirer gets traffic again soon.
WINDOW = 10.0
# Attempts the window must hold before it says anything: one or two failures are a blip.
MINIMUM = 10
# Remembered attempts at most (memory stays bounded at any traffic).
SAMPLES = 200
# Half the recent attempts failing: the breaker's rate rule, reached here on time, not count.
DEGRADED_ERROR_SHARE = 0.5
# The last attempts all failing, whoever made them: failures that come together are an outage
# starting, not independent blips (three in a row at a 10 % blip rate: one time in a thousand),
# and retrying into one is waste. Seen long before half a busy window has failed.
DEGRADED_STREAK = 3


class Health:
    """Recent attempts of one acquirer: (when, seconds, failed)."""

    def __init__(
        self,
        *,
        slow: float,
        window: float = WINDOW,
        minimum: int = MINIMUM,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if slow <= 0 or window <= 0 or minimum < 1:
            raise ValueError("need slow > 0, window > 0 and minimum >= 1")
        self.slow, self.window, self.minimum, self.clock = slow, window, minimum, clock
        self._samples: deque[tuple[float, float, bool]] = deque()
        # Of the samples held: how many failed, how many took ``slow`` or longer (kept as
        # samples come and go, so the verdict asked before every payment reads no window).
        self._failed = self._slow = 0
        self.streak = 0  # failed attempts in a row, however long ago

    def observe(self, seconds: float, *, failed: bool) -> None:
        if len(self._samples) >= SAMPLES:
            self._forget(self._samples.popleft())
        self._samples.append((self.clock(), seconds, failed))
        self._failed += failed
        self._slow += seconds >= self.slow
        self.streak = self.streak + 1 if failed else 0

    def latency(self, quantile: float) -> float | None:
        """The recent latency at ``quantile`` (0.5, 0.9), or None with too few samples."""
        return _latency(self._recent(), quantile)

    def error_share(self) -> float:
        return _error_share(self._recent())

    def degraded(self) -> bool:
        """Over the short window: the last attempts all failed, or (with enough of them) half
        failed, or p90 is slow. (Asked before every payment: the window is read once, and p90
        worked out only when the error share has not settled it.)"""
        recent = self._pruned()
        count = len(recent)
        if count >= DEGRADED_STREAK and all(recent[-n][2] for n in range(1, DEGRADED_STREAK + 1)):
            return True
        if count < self.minimum:
            return False
        if self._failed / count >= DEGRADED_ERROR_SHARE:
            return True
        # p90 is at most the slowest attempt: with none slow (a healthy acquirer, nearly
        # always) the sort is not needed.
        if not self._slow:
            return False
        p90 = _latency(list(recent), 0.9)
        return p90 is not None and p90 >= self.slow

    def failing(self) -> bool:
        """The last attempts all failed, however long ago: retrying now is retrying into an
        outage. The next success ends it."""
        return self.streak >= DEGRADED_STREAK

    def _recent(self) -> list[tuple[float, float, bool]]:
        return list(self._pruned())

    def _pruned(self) -> deque[tuple[float, float, bool]]:
        """The samples, those older than the window dropped (no copy)."""
        oldest = self.clock() - self.window
        samples = self._samples
        while samples and samples[0][0] < oldest:
            self._forget(samples.popleft())
        return samples

    def _forget(self, sample: tuple[float, float, bool]) -> None:
        self._failed -= sample[2]
        self._slow -= sample[1] >= self.slow


def _error_share(recent: list[tuple[float, float, bool]]) -> float:
    return sum(failed for _, _, failed in recent) / len(recent) if recent else 0.0


def _latency(recent: list[tuple[float, float, bool]], quantile: float) -> float | None:
    """The percentile cut ``statistics.quantiles(seconds, n=100, method="inclusive")`` would
    give at ``quantile`` (its cut ``round(quantile * 100)``, clamped to 1..99), worked out by
    the same arithmetic for that one cut instead of all 99."""
    seconds = sorted([taken for _, taken, _ in recent])
    if len(seconds) < 2:
        return seconds[0] if seconds else None
    cut = min(99, max(1, round(quantile * 100)))
    j, delta = divmod(cut * (len(seconds) - 1), 100)
    return (seconds[j] * (100 - delta) + seconds[j + 1] * delta) / 100


class wait_stretched(wait_base):  # lower case: reads like tenacity's own policies
    """Full-jitter capped exponential backoff, its base stretched to the recent p50 latency."""

    def __init__(self, health: Health, *, base: float, cap: float) -> None:
        if not 0 < base <= cap:
            raise ValueError("need 0 < base <= cap")
        self.health, self.base, self.cap = health, base, cap

    def multiplier(self) -> float:
        p50 = self.health.latency(0.5)
        return min(self.cap, max(self.base, p50 or 0.0))

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = wait_random_exponential(multiplier=self.multiplier(), max=self.cap)
        return float(wait(retry_state))
