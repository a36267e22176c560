"""The matcher's typed inputs and outputs, frozen: a settlement line, OncePay's operations and
payments, the acquirer's authorizations, and the discrepancies found. Amounts are integers in
minor units; days are UTC dates."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import NamedTuple

__all__ = [
    "Authorization",
    "Discrepancy",
    "Hold",
    "Kind",
    "Operation",
    "Outcome",
    "Payment",
    "ReportLine",
]


class Kind(StrEnum):
    """Discrepancy kinds: the SPEC's six first, then the ones a finance team also needs."""

    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    UNKNOWN_AT_ONCEPAY = "unknown_at_oncepay"
    MISSING_AT_ACQUIRER = "missing_at_acquirer"
    DUPLICATE_SETTLEMENT = "duplicate_settlement"
    ORPHANED_AUTHORIZATION = "orphaned_authorization"
    FEE_MISMATCH = "fee_mismatch"  # the fee, or net = amount - fee, differs from the schedule
    TYPE_MISMATCH = "type_mismatch"  # a capture reported as a refund, or the other way round
    STALE_AUTHORIZATION = "stale_authorization"  # held past the acquirer's validity, uncaptured
    # Money settled for a payment OncePay failed or canceled: the customer paid for nothing.
    SETTLED_ON_CANCELED_PAYMENT = "settled_on_canceled_payment"
    # A run that would take more remediation actions than the cap took none: one alert.
    REMEDIATION_WITHHELD = "remediation_withheld"


class ReportLine(NamedTuple):
    """One settled movement as the acquirer reports it (``line`` counts from 1, the header).

    A named tuple rather than a frozen dataclass: as immutable, and built four times faster,
    which is a second per million lines of a report."""

    line: int
    reference: str
    type: str  # capture|refund
    amount: int  # > 0, minor units
    currency: str
    fee: int
    net: int  # signed: what the line adds to its payout
    settled_at: str
    payout_id: str
    order_id: str = ""  # OncePay's payment id when the report carries it (the residual join)


class Operation(NamedTuple):
    """Money OncePay moved at the acquirer: a capture (``{payment}_capture``) or a refund (the
    refund's id), on the UTC day it happened.

    A named tuple, like :class:`ReportLine`: a run builds one per movement of the books
    before it can match anything (a million at 1M lines), three times faster than a frozen
    dataclass."""

    reference: str
    payment_id: str
    type: str  # capture|refund
    amount: int
    currency: str
    day: date
    merchant_id: str = ""  # the payment's merchant, when read from the books (for posting)


@dataclass(frozen=True, slots=True)
class Hold:
    """A payment OncePay still holds as authorized (never captured nor canceled), from the
    UTC day it was authorized: past the acquirer's validity window its money is gone."""

    payment_id: str
    reference: str  # the authorization's, ``{payment}_a{attempt}``
    amount: int
    currency: str
    day: date


@dataclass(frozen=True, slots=True)
class Payment:
    """What OncePay believes of a payment, for judging the acquirer's authorizations."""

    id: str
    status: str
    authorization_id: str | None


@dataclass(frozen=True, slots=True)
class Authorization:
    """An authorization the acquirer approved (and did not void) on the reconciled day."""

    id: str
    reference: str
    order_id: str  # the payment id OncePay sent
    amount: int
    currency: str
    # Voided since (by reconciliation's own remediation: other voided ones are not fed in).
    voided: bool = False


@dataclass(frozen=True, slots=True)
class Discrepancy:
    kind: Kind
    reference: str
    payment_id: str | None
    detail: str
    remediation: str

    def as_json(self) -> dict[str, str | None]:
        return {
            "kind": self.kind.value,
            "reference": self.reference,
            "payment_id": self.payment_id,
            "detail": self.detail,
            "remediation": self.remediation,
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    matched: int
    discrepancies: tuple[Discrepancy, ...]
    settled: tuple[tuple[ReportLine, Operation], ...] = ()  # what a run would post
    orphans: tuple[Authorization, ...] = ()  # what remediation may void

    def as_json(self) -> dict[str, object]:
        """The SPEC §10 document, ``{"matched": N, "discrepancies": [...]}``."""
        return {
            "matched": self.matched,
            "discrepancies": [d.as_json() for d in self.discrepancies],
        }
