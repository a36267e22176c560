"""Typed records the service passes between its layers: a merchant, and the rows of the
tables the operations work on, as typed views of SQLAlchemy's rows (``tests/payments/
test_records.py`` checks each view's fields against its table, so a renamed column fails)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Merchant", "PaymentRow", "RefundRow"]


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
