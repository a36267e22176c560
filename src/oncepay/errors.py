"""The one exception tree of OncePay.

Every error a client can see is split into what it must fix and what it may retry; the HTTP
layer turns each into an RFC 9457 problem response from the ``status`` and ``code`` carried
here, in one place.

    OncePayError
    ├── ClientError                    the request is wrong: fix it, do not retry as is
    │   ├── IdempotencyKeyMissing      400 idempotency_key_missing
    │   ├── IdempotencyKeyInvalid      400 idempotency_key_invalid
    │   ├── IdempotencyKeyReused       422 idempotency_key_reused
    │   ├── IdempotencyScopeMissing    400 idempotency_scope_missing (no principal to scope by)
    │   └── RequestTooLarge            413 request_too_large
    ├── RetryableError                 try again later with the same key
    │   ├── RequestInProgress          409 idempotency_request_in_progress
    │   ├── LeaseLost                  409 idempotency_lease_lost (a newer claim holds the key)
    │   └── StoreUnavailable           503 idempotency_store_unavailable
    └── ConfigurationError             a programming or deployment mistake, refused at start-up
                                       (one that surfaces mid-request is a 500 problem response
                                       whose detail stays in the log)
"""

from __future__ import annotations

__all__ = [
    "ClientError",
    "ConfigurationError",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyScopeMissing",
    "LeaseLost",
    "OncePayError",
    "RequestInProgress",
    "RequestTooLarge",
    "RetryableError",
    "StoreUnavailable",
]


class OncePayError(Exception):
    """Root of every error OncePay raises on purpose."""

    status: int = 500
    code: str = "internal_error"
    title: str = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title


class ClientError(OncePayError):
    """The request cannot succeed as sent; the client must change it."""

    status = 400
    code = "invalid_request"
    title = "Invalid request"


class RetryableError(OncePayError):
    """The request may succeed if sent again later with the same idempotency key."""

    status = 503
    code = "retry_later"
    title = "Try again later"
    retry_after: float | None = None


class ConfigurationError(OncePayError):
    """OncePay was set up wrongly (bad store URL, impossible TTL); raised at start-up where it
    can be found then, and answered as a 500 problem if it only shows during a request."""

    code = "configuration_error"
    title = "Configuration error"


class IdempotencyKeyMissing(ClientError):
    code = "idempotency_key_missing"
    title = "Idempotency-Key header is required"


class IdempotencyKeyInvalid(ClientError):
    code = "idempotency_key_invalid"
    title = "Idempotency-Key header is malformed"


class IdempotencyKeyReused(ClientError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency-Key was already used for a different request"


class IdempotencyScopeMissing(ClientError):
    """The header or cookie the keys are scoped by is absent: with no principal to scope it
    by, the key would share one scope with every other such request (and its answers)."""

    code = "idempotency_scope_missing"
    title = "The request names no principal to scope its Idempotency-Key by"


class RequestTooLarge(ClientError):
    status = 413
    code = "request_too_large"
    title = "Request body is too large"


class RequestInProgress(RetryableError):
    status = 409
    code = "idempotency_request_in_progress"
    title = "A request with this Idempotency-Key is still being processed"

    def __init__(self, detail: str | None = None, *, retry_after: float = 1.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class LeaseLost(RetryableError):
    """Completing, releasing or checkpointing with a fencing token that is no longer current.

    The worker's lease ran out and another request took the key over; whatever this worker
    computed must not be stored. A retry of the request replays the newer attempt's result.
    """

    status = 409
    code = "idempotency_lease_lost"
    title = "The idempotency lease was lost to a newer attempt"
    # The newer attempt is running or done: a retry a second later gets its 409 (with its own
    # Retry-After) or its stored answer.
    retry_after = 1.0


class StoreUnavailable(RetryableError):
    """The idempotency store could not be reached or failed; nothing was executed."""

    code = "idempotency_store_unavailable"
    title = "The idempotency store is unavailable"
    retry_after = 1.0
