"""``EmbeddedAcquirer``: the simulated acquirer inside the payments process (``oncepay serve``
with no acquirer URL), its money moves called as functions instead of in-process HTTP requests.

Everything but the transport of an attempt is :class:`~.http.HttpAcquirer`'s, as for a remote
acquirer: retries with the same reference, the circuit breaker, retry control, the journal,
metrics and spans. The simulator keeps its own database and its idempotency by reference
(:mod:`oncepay.simulator.direct` answers what its HTTP routes would, byte for byte), so a
repeated call stays harmless. An exception out of the simulator (a dropped connection, a bug)
is what a remote caller would see as a broken connection: an attempt that may have reached it.
The settlement reports (reconciliation) still go through the app's HTTP routes, in-process.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.applications import Starlette

from oncepay.payments.acquirers.breaker import CircuitBreaker
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import (
    DEFAULT_ATTEMPTS,
    DEFAULT_TIMEOUT,
    HttpAcquirer,
    _Failure,
    _Reply,
)
from oncepay.simulator import Simulator
from oncepay.simulator.direct import call

__all__ = ["EmbeddedAcquirer"]


class EmbeddedAcquirer(HttpAcquirer):
    """The simulator ``app`` (:func:`oncepay.simulator.create_app`) in this process."""

    def __init__(
        self,
        name: str,
        app: Starlette,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        breaker: CircuitBreaker | None = None,
        control: RetryControl | None = None,
    ) -> None:
        super().__init__(
            name, app=app, timeout=timeout, attempts=attempts, breaker=breaker, control=control
        )
        self.simulator: Simulator = app.state.simulator

    async def _send(self, path: str, payload: dict[str, Any], reference: str) -> _Reply:
        try:
            async with asyncio.timeout(self.timeout):
                status, content = await call(self.simulator, path, payload, reference)
        except TimeoutError as exc:
            raise _Failure(f"no answer: {exc!r}", maybe_reached=True) from exc
        except Exception as exc:
            raise _Failure(f"no answer: acquirer failed: {exc!r}", maybe_reached=True) from exc
        return self._reply(status, content)
