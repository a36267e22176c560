"""A circuit breaker per acquirer: stop sending to an acquirer that keeps failing.

    closed ──(trip policy says so)──▶ open ──(reset_timeout passed)──▶ half-open
      ▲                                 ▲                                 │
      └────────(the probe succeeds)─────┼──────────(the probe fails)──────┘

* **closed**: every call goes through; each result is recorded.
* **open**: every call is refused without being sent (:meth:`CircuitBreaker.allow` is
  False), for ``reset_timeout`` seconds.
* **half-open**: one call, the probe, goes through; its success closes the breaker, its failure
  opens it again for another ``reset_timeout``. A probe that never reports (its caller was
  cancelled) is given up after ``reset_timeout`` and another probe is let through.

Only failures of the acquirer count: transport errors, timeouts and 5xx. A decline, or any
other answer, is a success — the acquirer is alive and saying no.

When to open is a policy, a small callable object over the recent results in the style of
tenacity's ``stop_after_attempt``, composable with ``|``:

    CircuitBreaker("primary", trip=consecutive_failures(5) | failure_rate(0.5, window=20))
"""

from __future__ import annotations

import abc
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from oncepay.payments import tracing
from oncepay.payments.metrics import BREAKER_TRANSITIONS

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "History",
    "breaker_for",
    "consecutive_failures",
    "failure_rate",
    "trip_any",
]

# An acquirer that fails five calls in a row (each already a retried HTTP attempt) is down,
# not blipping: a blip is one or two failures among successes.
DEFAULT_FAILURES = 5
# Long enough for an acquirer to restart or fail over behind its load balancer (tens of
# seconds), short enough that payments return to it soon after it is back.
DEFAULT_RESET_TIMEOUT = 30.0
# Results remembered for rate-based policies; a window longer than this sees only this many.
HISTORY = 100


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class History:
    """What a trip policy looks at: the recent results while closed (True = failure)."""

    consecutive_failures: int = 0
    results: deque[bool] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def record(self, failed: bool) -> None:
        self.results.append(failed)
        self.consecutive_failures = self.consecutive_failures + 1 if failed else 0


class trip_base(abc.ABC):  # lower case: policies read as a sentence, like tenacity's
    """A policy deciding, after a failure, whether the breaker opens."""

    @abc.abstractmethod
    def __call__(self, history: History) -> bool: ...

    def __or__(self, other: trip_base) -> trip_any:
        return trip_any(self, other)


class trip_any(trip_base):
    """Open when any of the policies says so."""

    def __init__(self, *policies: trip_base) -> None:
        self.policies = policies

    def __call__(self, history: History) -> bool:
        return any(policy(history) for policy in self.policies)


class consecutive_failures(trip_base):
    """Open after ``count`` failures in a row."""

    def __init__(self, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self.count = count

    def __call__(self, history: History) -> bool:
        return history.consecutive_failures >= self.count


class failure_rate(trip_base):
    """Open when at least ``rate`` of the last ``window`` results failed, once at least
    ``minimum`` results are known (so one failure of the first call does not open it)."""

    def __init__(self, rate: float, *, window: int = 20, minimum: int = 10) -> None:
        if not 0 < rate <= 1 or not 1 <= minimum <= window <= HISTORY:
            raise ValueError("need 0 < rate <= 1 and 1 <= minimum <= window <= HISTORY")
        self.rate, self.window, self.minimum = rate, window, minimum

    def __call__(self, history: History) -> bool:
        recent = list(history.results)[-self.window :]
        return len(recent) >= self.minimum and sum(recent) >= self.rate * len(recent)


class CircuitBreaker:
    """One acquirer's breaker. Callers ask :meth:`allow` before each attempt and report its
    result with :meth:`record_success` or :meth:`record_failure`."""

    def __init__(
        self,
        name: str = "acquirer",
        *,
        trip: trip_base | None = None,
        reset_timeout: float = DEFAULT_RESET_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if reset_timeout <= 0:
            raise ValueError("reset_timeout must be positive")
        self.name = name
        self.trip = trip or consecutive_failures(DEFAULT_FAILURES)
        self.reset_timeout = reset_timeout
        self.clock = clock
        self.history = History()
        self._state = BreakerState.CLOSED
        self._since = clock()  # when the breaker opened, or when the probe went out

    @property
    def state(self) -> BreakerState:
        return self._state

    def available(self) -> bool:
        """Whether a call now would be let through (without claiming the probe)."""
        return self._state is BreakerState.CLOSED or self._expired()

    def allow(self) -> bool:
        """May a call be sent now? In half-open, True claims the single probe."""
        if self._state is BreakerState.CLOSED:
            return True
        if not self._expired():
            return False
        self._move(BreakerState.HALF_OPEN)  # open long enough, or the last probe went silent
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.CLOSED)
        elif self._state is BreakerState.CLOSED:
            self.history.record(failed=False)
        # open: a straggler from before the breaker opened tells us nothing new

    def record_failure(self) -> None:
        if self._state is BreakerState.HALF_OPEN:
            self._move(BreakerState.OPEN)
        elif self._state is BreakerState.CLOSED:
            self.history.record(failed=True)
            if self.trip(self.history):
                self._move(BreakerState.OPEN)

    def _expired(self) -> bool:
        return self.clock() - self._since >= self.reset_timeout

    def _move(self, state: BreakerState) -> None:
        if state is BreakerState.CLOSED:
            self.history = History()
        if state is not self._state:
            BREAKER_TRANSITIONS.labels(acquirer=self.name, state=state.value).inc()
            tracing.breaker_moved(self.name, state.value)  # a span event, with tracing on
        self._state = state
        self._since = self.clock()


# Half of the last twenty calls failing, once ten are known, also opens the breaker: an
# acquirer that refuses authorizations but answers look-ups alternates failures with successes
# and would never reach five failures in a row.
FAILURE_RATE = 0.5
RATE_WINDOW = 20
RATE_MINIMUM = 10


def breaker_for(name: str, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
    """The breaker every configured acquirer gets: five failures in a row, or half of the
    recent calls."""
    trip = consecutive_failures(DEFAULT_FAILURES) | failure_rate(
        FAILURE_RATE, window=RATE_WINDOW, minimum=RATE_MINIMUM
    )
    return CircuitBreaker(name, trip=trip, clock=clock)
