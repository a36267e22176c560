"""The idempotency core: keys, fingerprints, records, the engine and the stores.

It imports no web framework and no payments code; ``oncepay.http`` adapts it to HTTP.
"""

from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Decision,
    Engine,
    Execute,
    InProgress,
    Invalid,
    Replay,
    Reused,
    Ticket,
)
from oncepay.idempotency.keys import fingerprint, parse_key, scope_from_authorization
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, RecordState, StoredResponse
from oncepay.idempotency.stores import Store, store_from_url

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TTL",
    "Claim",
    "ClaimOutcome",
    "Decision",
    "Engine",
    "Execute",
    "InProgress",
    "Invalid",
    "Record",
    "RecordState",
    "Replay",
    "Reused",
    "Store",
    "StoredResponse",
    "Ticket",
    "fingerprint",
    "parse_key",
    "scope_from_authorization",
    "store_from_url",
]
