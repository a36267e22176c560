"""A retry budget per acquirer, as Envoy has one: at any moment, retries in progress may be at
most ``percent`` of the requests in progress, and never fewer than ``minimum`` are allowed.

A retry that would exceed the budget is not made: the attempt's failure stands (an unknown
outcome still goes to a look-up and recovery, as without a budget). Against an acquirer that is
down every request fails and wants a retry; a budget keeps the retries to a fifth of the load
instead of multiplying it by the attempt count, while a lone request in a quiet moment still
gets its retries through the floor.

A request is in progress from the start of one logical call (``authorize``, ``lookup``, …) to its
end; a retry from the moment it is granted — before its backoff — to the end of its attempt.
State is per process and per event loop, like the breaker's: no locks, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DEFAULT_MINIMUM", "DEFAULT_PERCENT", "RetryBudget"]

# Envoy's defaults (retry_budget: budget_percent 20 %, min_retry_concurrency 3): a fifth more
# load at worst while an acquirer is failing, yet a quiet service still retries a blip.
DEFAULT_PERCENT = 0.2
DEFAULT_MINIMUM = 3


class RetryBudget:
    def __init__(self, percent: float = DEFAULT_PERCENT, minimum: int = DEFAULT_MINIMUM) -> None:
        if not 0 <= percent <= 1 or minimum < 0:
            raise ValueError("need 0 <= percent <= 1 and minimum >= 0")
        self.percent = percent
        self.minimum = minimum
        self.active = 0  # logical calls in progress
        self.retries = 0  # retries granted and not yet finished

    @property
    def limit(self) -> int:
        """How many retries may be in progress now."""
        return max(self.minimum, int(self.percent * self.active))

    @contextmanager
    def request(self) -> Iterator[None]:
        """One logical call in progress for as long as the block runs."""
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def try_retry(self) -> bool:
        """Grant one retry if the budget has room; the caller ends it with :meth:`retry_done`."""
        if self.retries >= self.limit:
            return False
        self.retries += 1
        return True

    def retry_done(self) -> None:
        self.retries = max(0, self.retries - 1)
