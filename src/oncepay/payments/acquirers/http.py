"""``HttpAcquirer``: the :class:`~oncepay.payments.acquirers.base.Acquirer` protocol over HTTP,
spoken to the simulated acquirer (``oncepay acquirer``) or anything with its API.

Each call is one logical request that may take several HTTP attempts, all with the same
reference as ``Idempotency-Key`` — harmless, since the acquirer answers a repeat with the first
answer. What happens to an attempt:

=========================================  ========  ===============  ======================
attempt ends with                          retried?  breaker          may have reached it?
=========================================  ========  ===============  ======================
2xx                                        no        success          yes
4xx                                        never     success          yes
5xx                                        yes       failure          yes
timeout, read error, dropped connection    yes       failure          yes
connection refused / connect timeout       yes       failure          no
breaker open                               no        (not sent)       no
first attempt throttled locally            no        (not sent)       no
=========================================  ========  ===============  ======================

Retry control (:mod:`.control`; docs/acquirer.md): a retry is made only while the attempts
last, the acquirer is not degraded (:mod:`.health`), its retry budget has room (:mod:`.budget`)
and adaptive throttling lets it through (:mod:`.throttle`); otherwise the last failure stands.
When the attempts end the answer is ``UNKNOWN``, with ``never_sent=True`` only when no attempt
may have reached the acquirer: then, and only then, failing over needs no look-up. Backoff
between attempts is capped exponential with full jitter (tenacity's
``wait_random_exponential``), its base stretched to the acquirer's recent p50 latency
(:class:`.health.wait_stretched`). Each attempt is bounded by ``timeout`` twice over: httpx's
own timeouts and ``asyncio.timeout`` (httpx's ASGI transport, used for an embedded acquirer,
ignores the former).

Answers map to outcomes so:

* authorize 201 → ``APPROVED`` / ``DECLINED`` (with ``decline_code``) from the body's status;
* capture, void, refund 201 → ``APPROVED``; any 4xx of theirs → ``DECLINED`` with the problem's
  ``code`` as ``decline_code`` (``already_captured``, ``amount_exceeds_refundable``, …);
* 409 ``reference_fenced`` on any operation → ``NOT_FOUND``: a look-up fenced the reference, so
  the operation provably did not and will not happen;
* lookup 200 → ``APPROVED`` / ``DECLINED`` from the stored answer; 404 fenced → ``NOT_FOUND``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from starlette.types import ASGIApp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from oncepay.http._cookies import NoCookies
from oncepay.payments import tracing
from oncepay.payments.acquirers import journal
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.acquirers.breaker import BreakerState, CircuitBreaker
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.health import Health, wait_stretched
from oncepay.payments.metrics import (
    ACQUIRER_ATTEMPTS,
    ACQUIRER_CALLS,
    ACQUIRER_LATENCY,
    ACQUIRER_RETRIES,
    ACQUIRER_THROTTLE_PROBABILITY,
    ACQUIRER_THROTTLED,
    labelled,
)

__all__ = ["DEFAULT_ATTEMPTS", "DEFAULT_TIMEOUT", "HttpAcquirer"]

# An acquirer answers an authorization in a few hundred milliseconds, a slow one in a second
# or two; five seconds per attempt means it is not coming, and three attempts (plus backoff)
# keep a payment request well under the 30 s a client of ours waits.
DEFAULT_TIMEOUT = 5.0
DEFAULT_ATTEMPTS = 3
# An acquirer whose recent p90 reaches this share of the attempt timeout is degraded: a good
# share of its attempts are about to time out, each an unknown outcome to look up.
SLOW_SHARE_OF_TIMEOUT = 0.8
KEY_HEADER = "Idempotency-Key"


class _Failure(Exception):
    """An attempt that did not produce an answer; retried."""

    def __init__(self, detail: str, *, maybe_reached: bool) -> None:
        super().__init__(detail)
        self.detail = detail
        self.maybe_reached = maybe_reached


class _Refused(Exception):
    """The breaker is open: nothing was sent."""


class _Throttled(Exception):
    """Adaptive throttling rejected the first attempt locally: nothing was sent."""


@dataclass(frozen=True, slots=True)
class _Reply:
    status: int
    body: dict[str, Any]


class _EmbeddedTransport(httpx.ASGITransport):
    """An in-process acquirer: an exception from the app (a dropped connection, a bug) is
    what a remote caller would see as a broken connection, so it becomes one."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.HTTPError:
            raise
        except Exception as exc:
            raise httpx.RemoteProtocolError(
                f"acquirer app failed: {exc!r}", request=request
            ) from exc


class HttpAcquirer:
    """One acquirer over HTTP, with retries and a circuit breaker (see the module doc)."""

    def __init__(
        self,
        name: str,
        base_url: str = "http://acquirer",
        *,
        app: ASGIApp | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff: wait_base | None = None,
        breaker: CircuitBreaker | None = None,
        control: RetryControl | None = None,
    ) -> None:
        if attempts < 1 or timeout <= 0:
            raise ValueError("need attempts >= 1 and timeout > 0")
        self.name = name
        self.timeout = timeout
        self.attempts = attempts
        self.control = control = control or RetryControl()
        self.health = Health(slow=SLOW_SHARE_OF_TIMEOUT * timeout, clock=control.clock)
        self.budget = control.new_budget()
        self.throttle = control.new_throttle()
        self._probability_shown: float | None = None  # the throttle's gauge as last set
        self.backoff = backoff or self._default_backoff()
        self.breaker = breaker or CircuitBreaker(name)
        self._app = app
        transport = _EmbeddedTransport(app=app) if app is not None else None
        # No cookie state: each call stands alone, and a cookie a proxy or load balancer in
        # front of the acquirer set must not pin or change later calls.
        self._client = httpx.AsyncClient(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout),
            cookies=NoCookies(),
        )

    # --- the Acquirer protocol ------------------------------------------------------------

    async def authorize(
        self,
        *,
        reference: str,
        order_id: str,
        amount: int,
        currency: str,
        payment_method: str,
        capture: bool,
    ) -> AcquirerAnswer:
        payload = {
            "reference": reference,
            "order_id": order_id,
            "amount": amount,
            "currency": currency,
            "payment_method": payment_method,
            "capture": capture,
        }
        return await self._call("authorize", "/v1/authorizations", payload, reference)

    async def capture(
        self, *, reference: str, authorization_id: str, amount: int
    ) -> AcquirerAnswer:
        path = f"/v1/authorizations/{quote(authorization_id, safe='')}/capture"
        return await self._call(
            "capture", path, {"reference": reference, "amount": amount}, reference
        )

    async def void(self, *, reference: str, authorization_id: str) -> AcquirerAnswer:
        path = f"/v1/authorizations/{quote(authorization_id, safe='')}/void"
        return await self._call("void", path, {"reference": reference}, reference)

    async def refund(self, *, reference: str, authorization_id: str, amount: int) -> AcquirerAnswer:
        path = f"/v1/authorizations/{quote(authorization_id, safe='')}/refunds"
        return await self._call(
            "refund", path, {"reference": reference, "amount": amount}, reference
        )

    async def lookup(self, reference: str) -> AcquirerAnswer:
        return await self._call("lookup", "/v1/lookups", {"reference": reference}, reference)

    def available(self) -> bool:
        """False while the breaker is open, or (adaptive) while recent attempts show the
        acquirer degraded: failing half of them, or slow at p90."""
        if not self.breaker.available():
            return False
        return not (self.control.adaptive and self.health.degraded())

    async def aclose(self) -> None:
        await self._client.aclose()
        # An embedded app never runs its lifespan, so whoever embeds it closes what it holds:
        # the simulator's database.
        embedded = getattr(getattr(self._app, "state", None), "simulator", None)
        if embedded is not None:
            await embedded.aclose()

    # --- one logical call -----------------------------------------------------------------

    def _default_backoff(self) -> wait_base:
        base, cap = self.control.backoff_base, self.control.backoff_cap
        if self.control.adaptive:
            return wait_stretched(self.health, base=base, cap=cap)
        return wait_random_exponential(multiplier=base, max=cap)

    @tracing.traced_call  # a span per logical call (no-op with tracing off)
    async def _call(
        self, operation: str, path: str, payload: dict[str, Any], reference: str
    ) -> AcquirerAnswer:
        reached = False
        gate: _RetryGate | None = None

        async def attempt() -> _Reply:
            nonlocal reached
            assert gate is not None
            try:
                return await self._attempt(operation, path, payload, reference, gate.retrying)
            except _Failure as failure:
                reached = reached or failure.maybe_reached
                labelled(ACQUIRER_CALLS, self.name, operation, "error").inc()
                raise
            finally:
                gate.attempt_done()

        budget = self.budget
        if budget is not None:
            budget.active += 1  # RetryBudget.request() inline: a call on every payment
        try:
            try:  # the first attempt outside tenacity and its gate: most calls need no other
                reply = await self._attempt(operation, path, payload, reference, False)
            except _Failure as failure:
                reached = failure.maybe_reached
                labelled(ACQUIRER_CALLS, self.name, operation, "error").inc()
                gate = _RetryGate(self)
                reply = await self._retried(attempt, gate, failure)
        except _Refused:
            answer = self._unknown(reference, "circuit breaker open", never_sent=not reached)
            return self._count(operation, answer, "breaker_open" if not reached else None)
        except _Throttled:
            detail = "rejected locally by adaptive throttling: the acquirer is failing"
            answer = self._unknown(reference, detail, never_sent=True)
            return self._count(operation, answer, "throttled")
        except _Failure as failure:
            return self._count(operation, self._unknown(reference, failure.detail, not reached))
        finally:
            if budget is not None:
                budget.active -= 1
        return self._count(operation, self._answer(operation, reference, reply))

    async def _retried(
        self, attempt: Callable[[], Awaitable[_Reply]], gate: _RetryGate, first: _Failure
    ) -> _Reply:
        """The retries after a first attempt that failed, by tenacity: it is handed that
        failure as its own first attempt's (the attempt already counted and accounted for), so
        its stop policy (the gate), backoff and attempt numbers are what they would be had it
        made that attempt itself."""
        pending: _Failure | None = first

        async def replayed_then_attempt() -> _Reply:
            nonlocal pending
            if pending is not None:
                failure, pending = pending, None
                raise failure
            return await attempt()

        retrying = AsyncRetrying(
            stop=gate,
            wait=self.backoff,
            retry=retry_if_exception_type(_Failure),
            reraise=True,
        )
        reply: _Reply = await retrying(replayed_then_attempt)
        return reply

    @tracing.traced_attempt  # a span per attempt (no-op with tracing off)
    async def _attempt(
        self, operation: str, path: str, payload: dict[str, Any], reference: str, retry: bool
    ) -> _Reply:
        if not self.breaker.allow():
            raise _Refused
        probe = self.breaker.state is BreakerState.HALF_OPEN  # the breaker's own test: sent
        if not retry and not probe and not self._admitted():
            raise _Throttled
        labelled(ACQUIRER_ATTEMPTS, self.name, "retry" if retry else "first").inc()
        breaker = str(self.breaker.state)
        started = time.perf_counter()
        failed = True
        outcome = "answered"
        try:
            reply = await self._send(path, payload, reference)
            failed = False
        except _Failure as failure:
            outcome = f"failed: {failure.detail}"
            self.breaker.record_failure()
            raise
        finally:
            seconds = time.perf_counter() - started
            labelled(ACQUIRER_LATENCY, self.name, operation).observe(seconds)
            self.health.observe(seconds, failed=failed)
            if self.throttle is not None:  # counted now that its outcome is known
                self.throttle.record(accepted=not failed)
            journal.record(  # the operator's timeline of the payment
                journal.Attempt(
                    journal.now(), self.name, operation, reference, retry, outcome, seconds, breaker
                )
            )
        self.breaker.record_success()
        return reply

    def _admitted(self) -> bool:
        """Adaptive throttling's verdict on one attempt (always yes without a throttle)."""
        if self.throttle is None:
            return True
        admitted, probability = self.throttle.decide()
        if probability != self._probability_shown:  # the gauge set only when it moves
            labelled(ACQUIRER_THROTTLE_PROBABILITY, self.name).set(probability)
            self._probability_shown = probability
        if not admitted:
            labelled(ACQUIRER_THROTTLED, self.name).inc()
        return admitted

    async def _send(self, path: str, payload: dict[str, Any], reference: str) -> _Reply:
        """One HTTP attempt; every way it can fail becomes a :class:`_Failure`."""
        headers = {KEY_HEADER: reference}
        tracing.inject(headers)  # traceparent, with tracing on
        try:
            async with asyncio.timeout(self.timeout):
                response = await self._client.post(path, json=payload, headers=headers)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _Failure(f"not sent: {exc!r}", maybe_reached=False) from exc
        except (httpx.TransportError, TimeoutError) as exc:
            raise _Failure(f"no answer: {exc!r}", maybe_reached=True) from exc
        return self._reply(response.status_code, response.content)

    @staticmethod
    def _reply(status: int, content: bytes) -> _Reply:
        """An answer as it arrived: a 5xx, or a body that is no JSON object, is a failure."""
        if status >= 500:
            raise _Failure(f"acquirer answered {status}", maybe_reached=True)
        try:
            body = json.loads(content)
        except ValueError as exc:
            raise _Failure(
                "acquirer answered something that is not JSON", maybe_reached=True
            ) from exc
        if not isinstance(body, dict):
            raise _Failure("acquirer answered JSON that is not an object", maybe_reached=True)
        return _Reply(status, body)

    # --- answers --------------------------------------------------------------------------

    def _answer(self, operation: str, reference: str, reply: _Reply) -> AcquirerAnswer:
        body = reply.body
        if reply.status == 409 and body.get("code") == "reference_fenced":
            return self._result(Outcome.NOT_FOUND, reference, detail="reference fenced")
        if operation == "lookup":
            return self._lookup_answer(reference, reply)
        if reply.status >= 400:
            return self._refusal(reference, body)
        return self._stored_answer(reference, body)

    def _lookup_answer(self, reference: str, reply: _Reply) -> AcquirerAnswer:
        body = reply.body
        if reply.status == 404 and body.get("fenced") is True:
            return self._result(Outcome.NOT_FOUND, reference, detail="fenced by this look-up")
        if reply.status == 200:
            return self._stored_answer(reference, body)
        detail = f"look-up answered {reply.status} {body.get('code')}"
        return self._unknown(reference, detail, never_sent=False)

    def _stored_answer(self, reference: str, body: dict[str, Any]) -> AcquirerAnswer:
        """An operation's own answer (fresh, or stored and returned by a look-up)."""
        authorization_id = body.get("authorization_id") or body.get("id")
        if body.get("object") == "authorization" and body.get("status") == "declined":
            return self._result(
                Outcome.DECLINED,
                reference,
                authorization_id=authorization_id,
                decline_code=body.get("decline_code"),
            )
        if body.get("status") == "approved":
            return self._result(Outcome.APPROVED, reference, authorization_id=authorization_id)
        return self._unknown(reference, f"unexpected answer {body!r}"[:200], never_sent=False)

    def _refusal(self, reference: str, body: dict[str, Any]) -> AcquirerAnswer:
        code = str(body.get("code") or "refused")
        return self._result(
            Outcome.DECLINED, reference, decline_code=code, detail=body.get("detail")
        )

    def _result(self, outcome: Outcome, reference: str, **fields: Any) -> AcquirerAnswer:
        return AcquirerAnswer(outcome, self.name, reference, **fields)

    def _unknown(self, reference: str, detail: str, never_sent: bool) -> AcquirerAnswer:
        return self._result(Outcome.UNKNOWN, reference, detail=detail, never_sent=never_sent)

    def _count(
        self, operation: str, answer: AcquirerAnswer, label: str | None = None
    ) -> AcquirerAnswer:
        labelled(ACQUIRER_CALLS, self.name, operation, label or answer.outcome.value).inc()
        return answer


class _RetryGate(stop_base):
    """One logical call's retries, as tenacity's stop policy: after a failed attempt, retry
    only while attempts remain, the acquirer is not degraded, the budget has room and adaptive
    throttling admits it. A granted retry holds its budget slot until its attempt ends."""

    def __init__(self, acquirer: HttpAcquirer) -> None:
        self.acquirer = acquirer
        self.retrying = False  # the coming attempt is a retry
        self._holding = False

    def __call__(self, retry_state: RetryCallState) -> bool:
        acquirer = self.acquirer
        if retry_state.attempt_number >= acquirer.attempts:
            return True
        self.retrying = True
        health = acquirer.health
        if acquirer.control.adaptive and (health.failing() or health.degraded()):
            return self._deny("degraded")  # failures come together: retrying is waste
        budget = acquirer.budget
        if budget is not None and not budget.try_retry():
            return self._deny("budget_denied")
        self._holding = budget is not None
        if not acquirer._admitted():
            self.attempt_done()
            return self._deny("throttled")
        labelled(ACQUIRER_RETRIES, acquirer.name, "made").inc()
        return False

    def attempt_done(self) -> None:
        if self._holding and self.acquirer.budget is not None:
            self.acquirer.budget.retry_done()
        self._holding = False

    def _deny(self, decision: str) -> bool:
        labelled(ACQUIRER_RETRIES, self.acquirer.name, decision).inc()
        return True
