"""Typed records the service passes between its layers: a merchant, and the rows of the
tables the operations work on, as typed views of SQLAlchemy's rows (``tests/payments/
test_records.py`` checks each view's fields against its table, so a renamed column fails)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "AttemptRow",
    "DeliveryRow",
    "EndpointRow",
    "EventRow",
    "Merchant",
    "PaymentRow",
    "RefundRow",
]


@dataclass(frozen=True, slots=True)
class Merchant:
    id: str
    name: str


class PaymentRow(Protocol):
    """A row of ``payments``."""

    seq: int
    id: str
    merchant_id: str
    amount: int
    currency: str
    payment_method: str
    capture_method: str  # "automatic" or "manual"
    description: str | None
    metadata: str  # a JSON object of strings
    status: str  # a PaymentStatus value
    amount_captured: int
    amount_refunded: int
    failure_code: str | None
    failure_message: str | None
    acquirer: str
    attempt: int
    authorization_id: str | None
    outcome_unknown: bool
    recovery_attempts: int
    escalated: bool
    pending_operation: str | None  # "capture:<amount>", "cancel", "refused:<code>"
    created_at: float
    updated_at: float
    amount_settled: int  # captured money the acquirer settled (SPEC §10)
    amount_refund_settled: int  # refunded money the acquirer settled
    settlement_fee: int  # what the acquirer kept on this payment's settled lines
    settled_at: float | None  # when its last line settled

    def _replace(self, **changes: Any) -> PaymentRow:
        """The row with ``changes`` (rows are named tuples)."""
        ...


class RefundRow(Protocol):
    """A row of ``refunds``."""

    seq: int
    id: str
    payment_id: str
    merchant_id: str
    amount: int
    currency: str
    status: str  # pending, succeeded, failed
    failure_code: str | None
    created_at: float
    updated_at: float


class EventRow(Protocol):
    """A row of ``events``."""

    seq: int
    id: str
    merchant_id: str
    type: str
    object_id: str
    data: str  # a JSON snapshot of the object after the change
    created_at: float
    traceparent: str | None  # the writing transaction's trace (tracing on; migration 8)


class EndpointRow(Protocol):
    """A row of ``webhook_endpoints``."""

    seq: int
    id: str
    merchant_id: str
    url: str
    events: str  # a JSON list of event types, or ["*"]
    description: str | None
    disabled: bool
    disabled_reason: str | None
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: float | None
    deleted: bool
    created_at: float
    updated_at: float


class DeliveryRow(Protocol):
    """A row of ``webhook_deliveries``."""

    seq: int
    id: str
    merchant_id: str
    event_id: str
    endpoint_id: str
    status: str  # pending, delivering, succeeded, dead, canceled
    attempts: int
    next_attempt_at: float
    locked_until: float | None
    lock_token: str | None
    last_status_code: int | None
    last_error: str | None
    created_at: float
    updated_at: float


class AttemptRow(Protocol):
    """A row of ``webhook_attempts``."""

    seq: int
    delivery_id: str
    attempt: int
    status_code: int | None
    latency_ms: float
    error: str | None
    created_at: float
