"""A retrying HTTP client that makes retries safe: ``Client`` and ``AsyncClient``.

Both are ``httpx`` clients. Every unsafe request gets a fresh ``Idempotency-Key`` (unless the
caller passes one) and *the same key on every retry*, so a retried payment is a replay, never a
second charge. What is retried, with capped exponential backoff and full jitter:

* connection errors and timeouts (the request may or may not have arrived: the key decides);
* 5xx answers, 429 (rate limited) and 409s (SPEC §4), but a 409 whose problem ``code`` says
  the conflict is final (``invalid_state_transition``) — honouring ``Retry-After``;

and nothing else: any other 4xx is the caller's to fix. Attempts are bounded by count and by
total time; the number used is in ``response.extensions["oncepay.attempts"]``.

    async with AsyncClient(base_url="https://api.example.com") as client:
        response = await client.post("/v1/payments", json={...})
"""

from __future__ import annotations

import email.utils
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_attempt,
    stop_after_delay,
)

__all__ = ["ATTEMPTS", "AsyncClient", "Client", "RetryPolicy"]

ATTEMPTS = "oncepay.attempts"
KEY_HEADER = "Idempotency-Key"
# 409s that mean "not yet" rather than "never": OncePay's, and Stripe's in-use key.
# 409 codes that say a conflict is final: retrying the request cannot help.
FINAL_CONFLICTS = frozenset({"invalid_state_transition"})
# ... and those that say the key's first request is still running (kept: documentation, and
# callers that want to tell the two apart).
TRANSIENT_CONFLICTS = frozenset(
    {
        "idempotency_request_in_progress",
        "idempotency_key_in_use",
        "idempotency_lease_lost",
        "payment_operation_in_progress",
        "payment_outcome_unknown",
    }
)


def transient_conflict(response: httpx.Response) -> bool:
    """Whether a 409 is worth retrying (SPEC §4 retries 409s): all are but those whose problem
    ``code`` says the conflict is final (:data:`FINAL_CONFLICTS`: the payment can no longer do
    that, so a retry would get the same answer). A 409 with ``Retry-After`` always is; a bare
    409, or one in another shape, is too. A streamed body not read yet is not read here."""
    if "retry-after" in response.headers:
        return True
    try:
        document = response.json()
    except (httpx.ResponseNotRead, ValueError):
        return True
    return not (isinstance(document, dict) and document.get("code") in FINAL_CONFLICTS)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to retry. The defaults ride out a restart of the service behind a
    load balancer (a few seconds) without holding a caller for more than half a minute."""

    attempts: int = 6
    total: float = 30.0
    base: float = 0.1  # the first backoff window: short, most blips last milliseconds
    cap: float = 5.0  # no single wait longer than this, whatever the exponent says
    unsafe_methods: frozenset[str] = field(
        default_factory=lambda: frozenset({"POST", "PATCH", "PUT", "DELETE"})
    )
    random: Callable[[], float] = random.random

    def retryable(self, response: httpx.Response) -> bool:
        status = response.status_code
        if status == 409:
            return transient_conflict(response)
        return status >= 500 or status == 429

    def backoff(self, state: RetryCallState) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2**n)], or the
        server's ``Retry-After`` when it names one; never past the total budget."""
        window = min(self.cap, self.base * 2 ** (state.attempt_number - 1))
        delay = self.random() * window
        outcome = state.outcome
        if outcome is not None and not outcome.failed:
            hinted = retry_after(outcome.result())
            if hinted is not None:
                delay = hinted
        remaining = self.total - float(state.seconds_since_start or 0.0)
        return float(max(0.0, min(delay, remaining)))


def retry_after(response: httpx.Response) -> float | None:
    """Seconds named by ``Retry-After`` (delta-seconds or an HTTP-date), if any."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _retrying_kwargs(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "stop": stop_after_attempt(policy.attempts) | stop_after_delay(policy.total),
        "wait": policy.backoff,
        "retry": retry_if_exception_type(httpx.TransportError) | retry_if_result(policy.retryable),
        # Out of attempts: hand back the last answer (or raise the last error), not RetryError.
        "retry_error_callback": lambda state: state.outcome.result(),
    }


def _prepare(policy: RetryPolicy, request: httpx.Request) -> None:
    if request.method in policy.unsafe_methods and KEY_HEADER not in request.headers:
        request.headers[KEY_HEADER] = str(uuid.uuid4())


class AsyncClient(httpx.AsyncClient):
    """``httpx.AsyncClient`` whose ``send`` retries safely (see the module docstring)."""

    def __init__(self, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry = retry or RetryPolicy()

    async def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        _prepare(self.retry, request)
        attempts = 0
        last: httpx.Response | None = None

        async def attempt() -> httpx.Response:
            nonlocal attempts, last
            if last is not None:  # a retried answer: free its connection (stream=True)
                await last.aclose()
            attempts += 1
            last = await super(AsyncClient, self).send(request, **kwargs)
            return last

        response: httpx.Response = await AsyncRetrying(**_retrying_kwargs(self.retry))(attempt)
        response.extensions[ATTEMPTS] = attempts
        return response


class Client(httpx.Client):
    """``httpx.Client`` whose ``send`` retries safely (see the module docstring)."""

    def __init__(self, *, retry: RetryPolicy | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.retry = retry or RetryPolicy()

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        _prepare(self.retry, request)
        attempts = 0
        last: httpx.Response | None = None

        def attempt() -> httpx.Response:
            nonlocal attempts, last
            if last is not None:  # a retried answer: free its connection (stream=True)
                last.close()
            attempts += 1
            last = super(Client, self).send(request, **kwargs)
            return last

        response: httpx.Response = Retrying(**_retrying_kwargs(self.retry))(attempt)
        response.extensions[ATTEMPTS] = attempts
        return response
