"""The authorization rule across acquirers: retry the same acquirer with the same reference
(harmless), and fail over to the next only when the attempt is proven not to have authorized
— never sent, or a fencing look-up found nothing.

Where a payment goes is decided from each acquirer's health, not only from its breaker: the
pool passes over an acquirer that is degraded (failing half its recent attempts, or slow), and
an attempt its client's adaptive throttling rejected locally was never sent, so it moves on to
the next acquirer without a look-up. An unknown outcome is never guessed: it is looked up, and
stays unknown (for recovery) when the look-up cannot be made.

The loop is given only what it needs: the acquirers, the payment, and a way to move the
payment to its next attempt (a fenced transaction the caller owns)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.records import PaymentRow

__all__ = ["Advance", "authorize", "reference"]

log = logging.getLogger("oncepay.payments")

FINAL = {Outcome.APPROVED, Outcome.DECLINED}

# (payment id, attempt it is at, acquirer of the next attempt) -> whether the move happened;
# False when someone else moved the payment first.
Advance = Callable[[str, int, str], Awaitable[bool]]


def reference(payment_id: str, attempt: int) -> str:
    return f"{payment_id}_a{attempt}"


async def authorize(
    pool: AcquirerPool, row: PaymentRow, advance: Advance, *, ask_first: bool
) -> AcquirerAnswer:
    """Authorize payment ``row`` (a payments row) on some acquirer, exactly once."""
    name, attempt = row.acquirer, row.attempt
    tried: set[str] = set()
    while True:
        acquirer, ref = pool[name], reference(row.id, attempt)
        if ask_first:  # an earlier attempt may have reached the acquirer: ask before acting
            answer = await acquirer.lookup(ref)
            ask_first = False
            if answer.outcome is not Outcome.NOT_FOUND:
                return answer
            healthy = True  # it answered; the attempt just never happened
        else:
            answer = await acquirer.authorize(
                reference=ref,
                order_id=row.id,
                amount=row.amount,
                currency=row.currency,
                payment_method=row.payment_method,
                capture=row.capture_method == "automatic",
            )
            if answer.outcome in FINAL:
                return answer
            if not answer.never_sent:
                looked = await acquirer.lookup(ref)
                if looked.outcome is not Outcome.NOT_FOUND:
                    return looked
            healthy = False
            tried.add(name)
        successor = pool.successor(name, tried, stay=healthy)
        if successor is None:
            log.warning("payment %s: no acquirer could take it (%s)", row.id, answer.detail)
            return AcquirerAnswer(Outcome.DECLINED, name, ref, decline_code="acquirer_unavailable")
        if not await advance(row.id, attempt, successor.name):
            return AcquirerAnswer(Outcome.UNKNOWN, name, ref, detail="a newer attempt took over")
        name, attempt = successor.name, attempt + 1
