"""The recent acquirer attempts of this process, per payment, for the operator's timeline
(docs/dashboard.md): each attempt's acquirer, operation, reference, outcome, latency and the
breaker's state when it was sent. In memory and bounded (the last :data:`PAYMENTS` payments
this process called an acquirer for); the durable record of a payment is its rows, and with
tracing on every attempt is a span too (docs/observability.md)."""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from typing import NamedTuple

__all__ = ["PAYMENTS", "Attempt", "attempts_of", "record"]

PAYMENTS = 10_000  # payments remembered; older ones are forgotten first
_PER_PAYMENT = 50  # attempts kept per payment (a storm of retries keeps its last ones)
_PAYMENT = re.compile(r"pay_[0-9a-f]+")


class Attempt(NamedTuple):  # a tuple: made on every acquirer call, cheaper than a dataclass
    at: float
    acquirer: str
    operation: str
    reference: str
    retry: bool
    outcome: str  # "answered", or why not: "failed: …"
    seconds: float
    breaker: str  # the breaker's state when the attempt was sent


_journal: OrderedDict[str, list[Attempt]] = OrderedDict()
_lock = threading.Lock()


def record(attempt: Attempt) -> None:
    found = _PAYMENT.search(attempt.reference)
    if found is None:
        return
    payment = found.group()
    with _lock:
        kept = _journal.get(payment)
        if kept is None:  # a payment's first attempt, the usual case: no list copied
            _journal[payment] = [attempt]
            while len(_journal) > PAYMENTS:
                _journal.popitem(last=False)
            return
        _journal.move_to_end(payment)
        kept.append(attempt)
        if len(kept) > _PER_PAYMENT:
            del kept[: len(kept) - _PER_PAYMENT]


def attempts_of(payment_id: str) -> list[Attempt]:
    with _lock:
        return list(_journal.get(payment_id, ()))


def now() -> float:
    return time.time()
