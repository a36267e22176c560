"""The acquirers a payments process calls, built from its settings: the embedded simulator
(in-process, on its own database) when no URL is set, else one client per configured URL."""

from __future__ import annotations

import time
from collections.abc import Callable

from oncepay.payments.acquirers.base import Acquirer
from oncepay.payments.acquirers.breaker import (
    DEFAULT_FAILURES,
    CircuitBreaker,
    consecutive_failures,
    failure_rate,
)
from oncepay.payments.routing import AcquirerSet
from oncepay.payments.settings import Settings

__all__ = ["breaker_for", "build_acquirers"]

# Half of the last twenty calls failing, once ten are known, also opens the breaker: an
# acquirer that refuses authorizations but answers look-ups alternates failures with successes
# and would never reach five failures in a row.
FAILURE_RATE = 0.5
RATE_WINDOW = 20
RATE_MINIMUM = 10


def breaker_for(name: str, clock: Callable[[], float] = time.monotonic) -> CircuitBreaker:
    trip = consecutive_failures(DEFAULT_FAILURES) | failure_rate(
        FAILURE_RATE, window=RATE_WINDOW, minimum=RATE_MINIMUM
    )
    return CircuitBreaker(name, trip=trip, clock=clock)


async def build_acquirers(settings: Settings) -> AcquirerSet:
    from oncepay.payments.acquirers.http import HttpAcquirer

    timeout, attempts = settings.acquirer_timeout, settings.acquirer_attempts
    found: list[Acquirer] = []
    if settings.acquirer_url is None:
        from oncepay.payments.acquirers.simulator import create_app

        app = create_app(settings.acquirer_database_url)
        found.append(
            HttpAcquirer("primary", app=app, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("primary"))
        )  # fmt: skip
    else:
        found.append(
            HttpAcquirer("primary", settings.acquirer_url, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("primary"))
        )  # fmt: skip
    if settings.secondary_acquirer_url:
        url = settings.secondary_acquirer_url
        found.append(
            HttpAcquirer("secondary", url, timeout=timeout, attempts=attempts,
                         breaker=breaker_for("secondary"))
        )  # fmt: skip
    return AcquirerSet(found)
