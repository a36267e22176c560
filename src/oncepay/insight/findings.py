"""What the analysis answers (SPEC §9): findings and learned TTLs, as the JSON contract has them.

This module sits at the bottom of the analysis: the kinds, the two result types, nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "KEY_PER_RETRY",
    "KEY_REUSE",
    "KINDS",
    "NO_BACKOFF",
    "REPLAY_STORM",
    "RETRY_AFTER_EXPIRY",
    "Finding",
    "TtlAdvice",
    "report",
]

KEY_PER_RETRY = "key_per_retry"
KEY_REUSE = "key_reuse"
REPLAY_STORM = "replay_storm"
RETRY_AFTER_EXPIRY = "retry_after_expiry"
NO_BACKOFF = "no_backoff"
KINDS = (KEY_PER_RETRY, KEY_REUSE, REPLAY_STORM, RETRY_AFTER_EXPIRY, NO_BACKOFF)


@dataclass(frozen=True, slots=True)
class Finding:
    """One anomaly of one tenant: ``events`` the decisions that are its evidence, seen between
    ``first_at`` and ``last_at``; ``detail`` says what happened and what to do."""

    tenant: str
    kind: str
    first_at: float
    last_at: float
    events: int
    detail: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TtlAdvice:
    """The TTL that covers a tenant's retries on a route; ``basis`` the retries observed."""

    tenant: str
    route: str
    ttl_seconds: int
    basis: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def report(findings: list[Finding], ttl: list[TtlAdvice]) -> dict[str, Any]:
    """The JSON document ``oncepay insight analyze --json`` prints."""
    return {
        "findings": [finding.as_json() for finding in findings],
        "ttl": [advice.as_json() for advice in ttl],
    }
