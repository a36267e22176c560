"""RFC 9457 problem responses, mapped from the one exception tree in one place."""

from __future__ import annotations

import json
import math

from oncepay.errors import IdempotencyKeyReused, OncePayError, RequestInProgress

__all__ = ["PROBLEM_CONTENT_TYPE", "Problem", "problem_for"]

PROBLEM_CONTENT_TYPE = "application/problem+json"

# Stripe answers a reused key with 400 idempotency_error and a concurrent one with 409
# idempotency_key_in_use; the Stripe-compatible switch swaps only status and code.
_STRIPE = {
    IdempotencyKeyReused.code: (400, "idempotency_error"),
    RequestInProgress.code: (409, "idempotency_key_in_use"),
}


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
        self.status = status
        self.body = json.dumps(document, separators=(",", ":")).encode()
        self.headers = [
            ("content-type", PROBLEM_CONTENT_TYPE),
            ("content-length", str(len(self.body))),
            *headers,
        ]


def problem_for(error: OncePayError, *, stripe_compatible: bool = False) -> Problem:
    status, code = error.status, error.code
    if stripe_compatible and code in _STRIPE:
        status, code = _STRIPE[code]
    headers: list[tuple[str, str]] = []
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers.append(("retry-after", str(max(1, math.ceil(retry_after)))))
    return Problem(status, code, error.title, error.detail, headers)
