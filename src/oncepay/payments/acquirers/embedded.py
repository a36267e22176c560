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
        # asyncio.timeout(self.timeout) by hand (its cost showed in a payment's profile): the
        # timer cancels this task; a cancellation that is the timer's alone is the timeout.
        task = asyncio.current_task()
        assert task is not None
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        cancelling = task.cancelling()
        timer = asyncio.get_running_loop().call_later(self.timeout, expire)
        try:
            status, content, document = await call(self.simulator, path, payload, reference)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise _Failure(f"no answer: {TimeoutError()!r}", maybe_reached=True) from None
            raise
        except Exception as exc:
            if expired:
                task.uncancel()  # as asyncio.timeout leaves it whenever its timer went off
            raise _Failure(f"no answer: acquirer failed: {exc!r}", maybe_reached=True) from exc
        finally:
            timer.cancel()
        if expired:
            task.uncancel()  # answered as the timer went off: as asyncio.timeout leaves it
        if document is None or status >= 500:
            return self._reply(status, content)
        return _Reply(status, document)  # the document the body encodes: not parsed again
