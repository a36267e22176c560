"""OncePay: exactly-once payment APIs.

Import the toolkit from here (``Engine``, ``store_from_url``, ``idempotent``, ``CachedStore``,
``TtlPolicy``, the errors) and the HTTP surfaces from ``oncepay.http``; every other module is
internal and may move.
"""

from oncepay.errors import (
    ClientError,
    ConfigurationError,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    LeaseLost,
    OncePayError,
    RequestInProgress,
    RequestTooLarge,
    RetryableError,
    StoreUnavailable,
)
from oncepay.idempotency import (
    Decision,
    Engine,
    Execute,
    InProgress,
    Invalid,
    Record,
    RecordState,
    Replay,
    Reused,
    Store,
    StoredResponse,
    Ticket,
    fingerprint,
    parse_key,
    scope_from_authorization,
    store_from_url,
)
from oncepay.idempotency.decorator import idempotent
from oncepay.idempotency.stores.cached import CachedStore
from oncepay.insight.ttl_policy import TtlPolicy

__version__ = "0.1.0.dev0"

__all__ = [
    "CachedStore",
    "ClientError",
    "ConfigurationError",
    "Decision",
    "Engine",
    "Execute",
    "IdempotencyKeyInvalid",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "InProgress",
    "Invalid",
    "LeaseLost",
    "OncePayError",
    "Record",
    "RecordState",
    "Replay",
    "RequestInProgress",
    "RequestTooLarge",
    "RetryableError",
    "Reused",
    "Store",
    "StoreUnavailable",
    "StoredResponse",
    "Ticket",
    "TtlPolicy",
    "__version__",
    "fingerprint",
    "idempotent",
    "parse_key",
    "scope_from_authorization",
    "store_from_url",
]
