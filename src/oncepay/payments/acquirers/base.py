"""What the payments service needs from an acquirer, whatever speaks to it.

Every operation that moves money carries a ``reference`` chosen by the payments service and
derived from the payment (``pay_…_a1`` for the first authorization attempt, ``re_…`` for a
refund); the reference doubles as the operation's idempotency key at the acquirer, so
repeating a call is harmless and answers what the first call answered.

An answer is one of three outcomes:

* ``APPROVED`` / ``DECLINED`` — the acquirer said so; final.
* ``UNKNOWN``  — we could not learn the answer (timeout, dropped connection, 5xx after the
  retries); the operation may or may not have happened. Only :meth:`Acquirer.lookup` can
  settle it.

:meth:`Acquirer.lookup` is a *fencing* look-up: when the acquirer has no record of the
reference it also bars the reference, so a request still on its way can never authorize
later. ``NOT_FOUND`` is therefore proof that the operation did not and will not happen,
which is what makes failover to another acquirer safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = ["Acquirer", "AcquirerAnswer", "Outcome"]


class Outcome(StrEnum):
    APPROVED = "approved"
    DECLINED = "declined"
    UNKNOWN = "unknown"
    NOT_FOUND = "not_found"  # only from lookup: proven not to have happened, and fenced


@dataclass(frozen=True, slots=True)
class AcquirerAnswer:
    outcome: Outcome
    acquirer: str  # the acquirer's configured name ("primary", "secondary", …)
    reference: str
    authorization_id: str | None = None  # the acquirer's id, for capture / void / refund
    decline_code: str | None = None  # card_declined, insufficient_funds, …
    detail: str | None = None  # why UNKNOWN, for logs and events
    never_sent: bool = False  # UNKNOWN only: the request provably never reached the acquirer
    # (connection refused, breaker open): safe to fail over without a look-up


class Acquirer(Protocol):
    """One acquirer, as the payments service calls it. Implementations retry transient
    failures themselves (same reference, so harmlessly) and never raise for an acquirer's
    failure: they answer ``UNKNOWN``."""

    name: str

    async def authorize(
        self,
        *,
        reference: str,
        order_id: str,  # the payment id: the same on every attempt and acquirer, for audits
        amount: int,
        currency: str,
        payment_method: str,
        capture: bool,
    ) -> AcquirerAnswer: ...

    async def capture(
        self, *, reference: str, authorization_id: str, amount: int
    ) -> AcquirerAnswer: ...

    async def void(self, *, reference: str, authorization_id: str) -> AcquirerAnswer: ...

    async def refund(
        self, *, reference: str, authorization_id: str, amount: int
    ) -> AcquirerAnswer: ...

    async def lookup(self, reference: str) -> AcquirerAnswer:
        """The outcome of the operation named ``reference``: APPROVED/DECLINED if it happened,
        NOT_FOUND (and fenced) if it did not, UNKNOWN if the acquirer cannot be asked."""
        ...

    def available(self) -> bool:
        """False while this acquirer's circuit breaker is open."""
        ...

    async def aclose(self) -> None: ...
