"""Client-side adaptive throttling per acquirer (Google SRE book, ch. 21, "Handling Overload").

Over a sliding window the client counts ``requests`` (attempts it sent, once their outcome is
known) and ``accepts`` (attempts the acquirer answered). Each new attempt is rejected locally
with probability

    max(0, (requests - K * accepts) / (requests + 1))

With K = 2 an acquirer may fail half of what it is sent before anything is held back; when it
fails everything the probability climbs towards 1, so almost nothing is sent; as it heals, the
attempts still let through are accepted and the probability falls back to 0 by itself — no
timer, no probe schedule. A locally rejected attempt provably never reached the acquirer.

Three departures from the book, all measured (tests/payments/test_retry_control.py):

* An attempt is counted when its outcome is known, not when it is sent: one still in flight is
  neither a request nor an accept. Counted at sending, a burst of first attempts all in flight
  at once — the first payments after a start, 32 at a time — read as an outage (20 requests, no
  accepts yet: p = 0.95) and were rejected locally, a dozen payments failed against a healthy
  acquirer. Under a steady load the two counts differ only by what is in flight. The price: in
  an outage whose attempts time out, nothing is counted until the first timeouts end, and
  what is sent meanwhile goes through; the breaker and the health verdict (p90 latency near
  the timeout) hold those back. An attempt cancelled by its caller counts as not accepted, and
  every attempt sent counts, retries and the breaker's half-open probe too.
* ``requests`` counts the attempts sent, not those rejected locally. Counted, the rejections
  keep the probability up by themselves after the acquirer heals: the accepts then only about
  double every window, so a total outage is forgotten log2(requests) windows after it ended
  (at one call a second and the book's two minutes, p was still 0.3 four and a half minutes
  after the heal). Uncounted, the outage's failures leave the window and it is forgotten
  within one window.
* Below ``minimum`` requests in the window nothing is rejected. At a payment service's low
  volumes the formula is noise (one failure of the first call would reject the second with
  probability ½), and the breaker already guards the quiet case.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable

__all__ = ["DEFAULT_K", "DEFAULT_MINIMUM", "DEFAULT_WINDOW", "AdaptiveThrottle"]

# The book's K: the acquirer may fail half the attempts before any is held back locally.
DEFAULT_K = 2.0
# The book's two minutes: long enough that a few bad seconds do not shed traffic, short enough
# that the memory of an outage is gone a couple of minutes after it healed.
DEFAULT_WINDOW = 120.0
# Attempts in the window before the ratio is trusted: a score of them is a pattern, not a blip.
DEFAULT_MINIMUM = 20
# The window is kept as this many buckets: counts move in steps of window/BUCKETS seconds.
BUCKETS = 60


class AdaptiveThrottle:
    def __init__(
        self,
        *,
        k: float = DEFAULT_K,
        window: float = DEFAULT_WINDOW,
        minimum: int = DEFAULT_MINIMUM,
        clock: Callable[[], float] = time.monotonic,
        dice: Callable[[], float] = random.random,
    ) -> None:
        if k < 1 or window <= 0 or minimum < 0:
            raise ValueError("need k >= 1, window > 0 and minimum >= 0")
        self.k, self.window, self.minimum = k, window, minimum
        self.clock, self.dice = clock, dice
        self._width = window / BUCKETS
        self._buckets: deque[list[float]] = deque()  # [start, requests, accepts], oldest first
        self._requests = 0
        self._accepts = 0

    @property
    def requests(self) -> int:
        self._expire()
        return self._requests

    @property
    def accepts(self) -> int:
        self._expire()
        return self._accepts

    def probability(self) -> float:
        """The chance that the next attempt is rejected locally."""
        self._expire()
        if self._requests < self.minimum:
            return 0.0
        return max(0.0, (self._requests - self.k * self._accepts) / (self._requests + 1))

    def admit(self) -> bool:
        """Decide one attempt: True sends it (counted by :meth:`record` once it has an
        outcome)."""
        return self.decide()[0]

    def decide(self) -> tuple[bool, float]:
        """:meth:`admit`'s verdict, and the probability it rolled against (for the gauge)."""
        probability = self.probability()
        return self.dice() >= probability, probability

    def record(self, *, accepted: bool) -> None:
        """An attempt sent, its outcome known: a request, and an accept when the acquirer
        answered it (any answer but a failure of its own)."""
        bucket = self._bucket()
        bucket[1] += 1
        self._requests += 1
        if accepted:
            bucket[2] += 1
            self._accepts += 1

    def _bucket(self) -> list[float]:
        now = self.clock()
        start = now - now % self._width
        if not self._buckets or self._buckets[-1][0] < start:
            self._buckets.append([start, 0, 0])
        self._expire()
        return self._buckets[-1]

    def _expire(self) -> None:
        oldest = self.clock() - self.window
        while self._buckets and self._buckets[0][0] + self._width <= oldest:
            _, requests, accepts = self._buckets.popleft()
            self._requests -= int(requests)
            self._accepts -= int(accepts)
