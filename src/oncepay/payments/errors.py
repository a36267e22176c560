"""The payments service's errors, as branches of OncePay's one exception tree.

    ClientError
    ├── AuthenticationFailed       401 authentication_required / invalid_api_key
    ├── PermissionDenied           403 insufficient_scope (a restricted key, outside its scopes)
    ├── ResourceMissing            404 resource_missing (also: another merchant's object)
    ├── InvalidRequest             400 invalid_request (malformed JSON, fields, ids)
    ├── AmountTooLarge             400 amount_too_large (capture / refund above what is left)
    ├── InvalidStateTransition     409 invalid_state_transition (nothing changed)
    └── AcquirerRefused            402 acquirer_refused (the acquirer refused a capture/void)
    RetryableError
    ├── OperationInProgress        409 payment_operation_in_progress (capture vs. cancel)
    ├── OutcomeUnknown             409 payment_outcome_unknown (acquirer result not yet known)
    ├── AcquirerOutcomeUnknown     503 acquirer_outcome_unknown (this request; retry resumes)
    ├── RateLimited                429 rate_limited (before the key is claimed: nothing ran)
    └── DatabaseUnavailable        503 database_unavailable (the request resumes on retry)

Retryable answers are never stored under the idempotency key: a retry runs (or resumes) again.
"""

from __future__ import annotations

from oncepay.errors import ClientError, RetryableError

__all__ = [
    "AcquirerOutcomeUnknown",
    "AcquirerRefused",
    "AmountTooLarge",
    "AuthenticationFailed",
    "DatabaseUnavailable",
    "InvalidRequest",
    "InvalidStateTransition",
    "MethodNotAllowed",
    "OperationInProgress",
    "OperatorOnly",
    "OutcomeUnknown",
    "PermissionDenied",
    "RateLimited",
    "ResourceMissing",
    "UnsupportedMediaType",
]


class AuthenticationFailed(ClientError):
    status = 401
    code = "authentication_required"
    title = "A valid API key is required"

    def __init__(self, detail: str | None = None, *, code: str | None = None) -> None:
        super().__init__(detail)
        if code:
            self.code = code


class OperatorOnly(ClientError):
    status = 401
    code = "operator_token_required"
    title = "A valid operator token is required"


class PermissionDenied(ClientError):
    status = 403
    code = "insufficient_scope"
    title = "This API key may not do that"


class ResourceMissing(ClientError):
    status = 404
    code = "resource_missing"
    title = "No such object"


class InvalidRequest(ClientError):
    title = "The request is malformed"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"
    title = "The method is not allowed on this path"


class UnsupportedMediaType(ClientError):
    status = 415
    code = "unsupported_media_type"
    title = "The request body must be JSON"


class AmountTooLarge(ClientError):
    code = "amount_too_large"
    title = "The amount exceeds what is available"


class InvalidStateTransition(ClientError):
    status = 409
    code = "invalid_state_transition"
    title = "The payment's state does not allow this operation"


class AcquirerRefused(ClientError):
    """A capture or void the acquirer refused (its decline code in the detail): the answer,
    stored under the request's key like a decline."""

    status = 402
    code = "acquirer_refused"
    title = "The acquirer refused"


class OperationInProgress(RetryableError):
    status = 409
    code = "payment_operation_in_progress"
    title = "Another operation on this payment is in progress"
    retry_after = 1.0


class OutcomeUnknown(RetryableError):
    status = 409
    code = "payment_outcome_unknown"
    title = "The acquirer's answer for this payment is not known yet"
    retry_after = 5.0


class AcquirerOutcomeUnknown(RetryableError):
    code = "acquirer_outcome_unknown"
    title = "The acquirer's answer is not known yet"

    def __init__(self, detail: str | None = None, *, retry_after: float = 2.0) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DatabaseUnavailable(RetryableError):
    code = "database_unavailable"
    title = "The database could not be reached"
    retry_after = 2.0


class RateLimited(RetryableError):
    """Too many requests for a key or a merchant; ``headers`` are the RateLimit fields."""

    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(
        self, detail: str, *, retry_after: float, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(detail)
        self.retry_after = retry_after
        self.headers = headers
