"""The money-moving requests, one module each, every one an
:class:`~oncepay.payments.phases.Operation`:
create a payment (authorize, and capture when automatic), capture, cancel, refund.

References sent to acquirers are derived from the objects, so a repeated call is the same call:
``{payment}_a{attempt}`` authorizes, ``{payment}_capture`` captures, ``{payment}_void`` voids,
the refund's own id refunds.
"""

from __future__ import annotations

from oncepay.payments.operations.cancel import Cancel
from oncepay.payments.operations.capture import Capture
from oncepay.payments.operations.create import CreatePayment
from oncepay.payments.operations.refund import CreateRefund
from oncepay.payments.phases import Operation

__all__ = ["Cancel", "Capture", "CreatePayment", "CreateRefund", "resume"]


def resume(op_name: str, object_id: str) -> Operation:
    """The operation a recovery point names, rebuilt for the recovery worker."""
    if op_name == "create":
        return CreatePayment()
    if op_name == "refund":
        return CreateRefund(payment_id="")
    return _FOLLOW_ONS[op_name](payment_id=object_id)


_FOLLOW_ONS: dict[str, type[Capture] | type[Cancel]] = {"capture": Capture, "cancel": Cancel}
