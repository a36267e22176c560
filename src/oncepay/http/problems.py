"""RFC 9457 problem responses, mapped from the one exception tree in one place."""

from __future__ import annotations

import json
import math

from oncepay.errors import (
    ClientError,
    IdempotencyKeyReused,
    OncePayError,
    RequestInProgress,
    RetryableError,
    StoreUnavailable,
)

__all__ = ["PROBLEM_CONTENT_TYPE", "Problem", "problem_for"]

PROBLEM_CONTENT_TYPE = "application/problem+json"

# Stripe's error object, for the Stripe-compatible switch: a reused key is 400 with type
# idempotency_error and no code; a key in use is 409, type invalid_request_error, code
# idempotency_key_in_use. Every other error keeps its own status and code under Stripe's type
# for it: invalid_request_error (the client must fix it) or api_error (the rest).
_STRIPE: dict[str, tuple[int, str, str | None]] = {
    IdempotencyKeyReused.code: (400, "idempotency_error", None),
    RequestInProgress.code: (409, "invalid_request_error", "idempotency_key_in_use"),
}
# A 500 of ours (a configuration error found mid-request) says what went wrong in the log; the
# client learns only that nothing ran.
_INTERNAL_DETAIL = "the idempotency layer failed before the request ran; nothing was executed"
# A store outage's own text names the store's address ("cannot connect to Redis at
# 10.0.3.7:6379"): that is for the log (the gate writes it there), not for any client.
_STORE_DETAIL = "the idempotency store could not be reached; nothing was executed: retry later"


class Problem:
    """A problem response ready to send: status, headers and a JSON body."""

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, code: str, title: str, detail: str, headers: list[tuple[str, str]]
    ) -> None:
        document = {
            "type": f"urn:oncepay:problem:{code}",
            "title": title,
            "status": status,
            "detail": detail,
            "code": code,
        }
        self._fill(status, PROBLEM_CONTENT_TYPE, _json(document), headers)

    @classmethod
    def stripe(
        cls, status: int, kind: str, code: str | None, message: str, headers: list[tuple[str, str]]
    ) -> Problem:
        """Stripe's error object, ``{"error": {"type", "code"?, "message"}}``, as JSON."""
        error = {"type": kind, **({"code": code} if code else {}), "message": message}
        problem = cls.__new__(cls)
        problem._fill(status, "application/json", _json({"error": error}), headers)
        return problem

    def _fill(
        self, status: int, content_type: str, body: bytes, headers: list[tuple[str, str]]
    ) -> None:
        self.status = status
        self.body = body
        self.headers = [
            ("content-type", content_type),
            ("content-length", str(len(body))),
            *headers,
        ]


def problem_for(error: OncePayError, *, stripe_compatible: bool = False) -> Problem:
    headers: list[tuple[str, str]] = []
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(retry_after)))))
    if error.status == 401:  # RFC 9110 §15.5.2: a 401 names how to authenticate
        headers.append(("www-authenticate", 'Bearer realm="oncepay"'))
    internal = error.status >= 500 and not isinstance(error, RetryableError)
    if isinstance(error, StoreUnavailable):
        detail = _STORE_DETAIL
    else:
        detail = _INTERNAL_DETAIL if internal else error.detail
    if stripe_compatible:
        kind = "invalid_request_error" if isinstance(error, ClientError) else "api_error"
        status, kind, code = _STRIPE.get(error.code, (error.status, kind, error.code))
        return Problem.stripe(status, kind, code, detail, headers)
    return Problem(error.status, error.code, error.title, detail, headers)


def _json(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()
