"""The payment state machine, as data (SPEC §5).

Each allowed move is one row of :data:`TRANSITIONS`: (from status, transition) -> to status.
Handlers ask :func:`next_status`; anything not in the table is an
:class:`~oncepay.payments.errors.InvalidStateTransition` and nothing changes. Settlement, when
it arrives, is one more transition and one more status: rows, not code.
"""

from __future__ import annotations

from enum import StrEnum

from oncepay.payments.errors import InvalidStateTransition

__all__ = ["TRANSITIONS", "PaymentStatus", "Transition", "can", "next_status", "require"]


class PaymentStatus(StrEnum):
    PROCESSING = "processing"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    CANCELED = "canceled"
    FAILED = "failed"


class Transition(StrEnum):
    AUTHORIZE = "authorize"
    FAIL = "fail"
    CAPTURE = "capture"
    CANCEL = "cancel"
    REFUND_PART = "refund_part"
    REFUND_ALL = "refund_all"


S, T = PaymentStatus, Transition

TRANSITIONS: dict[tuple[PaymentStatus, Transition], PaymentStatus] = {
    (S.PROCESSING, T.AUTHORIZE): S.AUTHORIZED,
    (S.PROCESSING, T.FAIL): S.FAILED,
    (S.AUTHORIZED, T.CAPTURE): S.CAPTURED,
    (S.AUTHORIZED, T.CANCEL): S.CANCELED,
    (S.CAPTURED, T.REFUND_PART): S.PARTIALLY_REFUNDED,
    (S.CAPTURED, T.REFUND_ALL): S.REFUNDED,
    (S.PARTIALLY_REFUNDED, T.REFUND_PART): S.PARTIALLY_REFUNDED,
    (S.PARTIALLY_REFUNDED, T.REFUND_ALL): S.REFUNDED,
}

# What a client asks for, and the transitions that may follow from it: a refund request is
# allowed where either kind of refund is.
_REQUESTS = {
    "capture": (T.CAPTURE,),
    "cancel": (T.CANCEL,),
    "refund": (T.REFUND_PART, T.REFUND_ALL),
}


def can(status: PaymentStatus, request: str) -> bool:
    """Whether a payment in ``status`` accepts a ``capture``, ``cancel`` or ``refund``."""
    return any((status, t) in TRANSITIONS for t in _REQUESTS[request])


def next_status(status: PaymentStatus, transition: Transition) -> PaymentStatus:
    try:
        return TRANSITIONS[status, transition]
    except KeyError:
        raise InvalidStateTransition(
            f"a payment that is {status} cannot {transition.replace('_', ' ')}"
        ) from None


def require(status: PaymentStatus, request: str) -> None:
    """Raise :class:`InvalidStateTransition` unless ``status`` accepts ``request``."""
    if not can(status, request):
        allowed = sorted({s for (s, t) in TRANSITIONS if t in _REQUESTS[request]})
        raise InvalidStateTransition(
            f"cannot {request} a payment that is {status}; "
            f"only a payment that is {' or '.join(allowed)} can be"
        )
