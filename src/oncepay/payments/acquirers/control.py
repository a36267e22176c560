"""How an acquirer client retries: the settings of retry control, in one value.

``adaptive`` (the default) retries within a budget (:mod:`.budget`), throttles itself from the
acquirer's recent success rate (:mod:`.throttle`), stretches its backoff with the acquirer's
latency and passes over a degraded acquirer (:mod:`.health`). ``fixed`` is the plain policy it
replaced — every attempt up to ``attempts``, backoff from the base alone, only the breaker to
stop it — kept for comparisons (``bench/retries``, ``oncepay chaos --retry-control fixed``).
Both keep the circuit breaker.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from oncepay.payments.acquirers import budget, throttle
from oncepay.payments.settings import Settings

__all__ = ["BACKOFF_BASE", "BACKOFF_CAP", "Mode", "RetryControl"]

Mode = Literal["adaptive", "fixed"]

# Backoff: the first retry within 50 ms (most blips are that short), never more than 1 s
# between attempts, since the caller's own request is waiting on us.
BACKOFF_BASE = 0.05
BACKOFF_CAP = 1.0


@dataclass(frozen=True)
class RetryControl:
    mode: Mode = "adaptive"
    budget_percent: float = budget.DEFAULT_PERCENT
    budget_minimum: int = budget.DEFAULT_MINIMUM
    throttle_k: float = throttle.DEFAULT_K
    throttle_window: float = throttle.DEFAULT_WINDOW
    throttle_minimum: int = throttle.DEFAULT_MINIMUM
    backoff_base: float = BACKOFF_BASE
    backoff_cap: float = BACKOFF_CAP
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    dice: Callable[[], float] = field(default=random.random, compare=False)

    @property
    def adaptive(self) -> bool:
        return self.mode == "adaptive"

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryControl:
        return cls(
            mode=settings.acquirer_retry_control,
            budget_percent=settings.acquirer_retry_budget_percent,
            budget_minimum=settings.acquirer_retry_budget_minimum,
            throttle_k=settings.acquirer_throttle_k,
            throttle_window=settings.acquirer_throttle_window,
            throttle_minimum=settings.acquirer_throttle_minimum,
            backoff_base=settings.acquirer_backoff_base,
            backoff_cap=settings.acquirer_backoff_cap,
        )

    def new_budget(self) -> budget.RetryBudget | None:
        if not self.adaptive:
            return None
        return budget.RetryBudget(self.budget_percent, self.budget_minimum)

    def new_throttle(self) -> throttle.AdaptiveThrottle | None:
        if not self.adaptive:
            return None
        return throttle.AdaptiveThrottle(
            k=self.throttle_k,
            window=self.throttle_window,
            minimum=self.throttle_minimum,
            clock=self.clock,
            dice=self.dice,
        )
