"""The configured acquirers, in order of preference, and the authorization rule across them:
retry the same acquirer with the same reference (harmless), and fail over to the next only when
the attempt is proven not to have authorized — never sent, or a fencing look-up found nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from oncepay.payments.acquirers.base import Acquirer, AcquirerAnswer, Outcome
from oncepay.payments.db import write
from oncepay.payments.schema import payments

if TYPE_CHECKING:
    from oncepay.idempotency.engine import Ticket
    from oncepay.payments.service import Services

__all__ = ["AcquirerSet", "reference"]

log = logging.getLogger("oncepay.payments")

FINAL = {Outcome.APPROVED, Outcome.DECLINED}


def reference(payment_id: str, attempt: int) -> str:
    return f"{payment_id}_a{attempt}"


class AcquirerSet:
    def __init__(self, acquirers: Sequence[Acquirer]) -> None:
        if not acquirers:
            raise ValueError("at least one acquirer is needed")
        self._by_name = {a.name: a for a in acquirers}
        self._order = list(acquirers)

    def __getitem__(self, name: str) -> Acquirer:
        return self._by_name[name]

    def __iter__(self) -> Iterator[Acquirer]:
        return iter(self._order)

    def choose(self) -> Acquirer:
        """The first acquirer whose breaker lets calls through (the primary when all are open:
        its call then fails fast and the payment fails cleanly)."""
        return next((a for a in self._order if a.available()), self._order[0])

    async def authorize(
        self, svc: Services, row: Any, ticket: Ticket, *, ask_first: bool
    ) -> AcquirerAnswer:
        """Authorize payment ``row`` (a payments row) on some acquirer, exactly once.
        ``ticket`` fences each move to a next attempt: a holder that lost its lease raises
        :class:`~oncepay.errors.LeaseLost` instead of moving on."""
        name, attempt = row.acquirer, row.attempt
        tried: set[str] = set()
        while True:
            acquirer, ref = self[name], reference(row.id, attempt)
            if ask_first:  # an earlier attempt may have reached the acquirer: ask before acting
                answer = await acquirer.lookup(ref)
                ask_first = False
                if answer.outcome is not Outcome.NOT_FOUND:
                    return answer
                healthy = True  # it answered; the attempt just never happened
            else:
                answer = await acquirer.authorize(
                    reference=ref, order_id=row.id, amount=row.amount, currency=row.currency,
                    payment_method=row.payment_method, capture=row.capture_method == "automatic",
                )  # fmt: skip
                if answer.outcome in FINAL:
                    return answer
                if not answer.never_sent:
                    looked = await acquirer.lookup(ref)
                    if looked.outcome is not Outcome.NOT_FOUND:
                        return looked
                healthy = False
                tried.add(name)
            successor = self._successor(name, tried, stay=healthy)
            if successor is None:
                log.warning("payment %s: no acquirer could take it (%s)", row.id, answer.detail)
                return AcquirerAnswer(
                    Outcome.DECLINED, name, ref, decline_code="acquirer_unavailable"
                )
            if not await _advance(svc, ticket, row.id, attempt, successor.name):
                return AcquirerAnswer(
                    Outcome.UNKNOWN, name, ref, detail="a newer attempt took over"
                )
            name, attempt = successor.name, attempt + 1

    def _successor(self, current: str, tried: set[str], *, stay: bool) -> Acquirer | None:
        if stay and self[current].available():
            return self[current]
        return next((a for a in self._order if a.name not in tried and a.available()), None)

    async def aclose(self) -> None:
        for acquirer in self._order:
            await acquirer.aclose()


async def _advance(
    svc: Services, ticket: Ticket, payment_id: str, attempt: int, acquirer: str
) -> bool:
    """Move a still-processing payment to its next attempt, in a transaction fenced by the
    request's ticket (which also renews its lease); False if someone else moved it first."""
    async with write(svc.db) as conn:
        assert ticket.recovery_point is not None  # phase 1 committed before any acquirer call
        await svc.engine.acheckpoint_in(conn, ticket, ticket.recovery_point)
        result = await conn.execute(
            update(payments)
            .where(payments.c.id == payment_id, payments.c.attempt == attempt,
                   payments.c.status == "processing")
            .values(attempt=attempt + 1, acquirer=acquirer, updated_at=time.time())
        )  # fmt: skip
        return bool(result.rowcount)
