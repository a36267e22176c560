"""Matching a settlement report against OncePay's books: a pure function, no I/O.

1. **Exact join** on the reference (OncePay chose it and sent it to the acquirer): a line whose
   reference names an operation is compared field by field (type, currency, amount, fee).
2. **Residual**: a line with an unknown reference may still carry OncePay's payment id
   (``order_id``); it is joined to the one unsettled operation of that payment with the same
   type, currency and amount, the lowest reference first. What is left is unknown to OncePay.
3. **What did not settle**: an operation neither joined nor settled earlier is missing once
   it is ``grace_days`` old; an approved authorization with no payment, on a payment that failed
   or was canceled, or that is not the payment's authorization, is orphaned; a payment still
   only authorized ``validity_days`` after its authorization is stale.

Deterministic: the same inputs give the same outcome, discrepancies sorted by reference, kind
and detail. Lines stream through once; memory holds the operations and the references seen."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from datetime import date

from oncepay.reconciliation.fees import FeeSchedule
from oncepay.reconciliation.records import (
    Authorization,
    Discrepancy,
    Hold,
    Kind,
    Operation,
    Outcome,
    Payment,
    ReportLine,
)

__all__ = [
    "DEFAULT_GRACE_DAYS",
    "DEFAULT_VALIDITY_DAYS",
    "EARLIEST_DAY",
    "MAX_GRACE_DAYS",
    "Books",
    "Matching",
    "Settle",
    "alert",
    "named_payment",
    "reconcile",
    "refine",
    "remediation_of",
    "without_in_flight",
]

# Card acquirers settle T+1 or T+2; three days leaves a weekend's slack before "missing".
DEFAULT_GRACE_DAYS = 3
# A quarter: a movement not settled by then is lost, not late (and a day minus it stays a day).
MAX_GRACE_DAYS = 90
# No settlement report predates the Unix epoch; earlier days only overflowed date arithmetic.
EARLIEST_DAY = date(1970, 1, 1)
# Card networks let an authorization stand about seven days for most merchants (longer for
# hotels and car rentals): past that a capture will likely be refused.
DEFAULT_VALIDITY_DAYS = 7
# Payment statuses whose authorization should no longer hold money at the acquirer.
_ENDED = frozenset({"failed", "canceled"})

# Receives each settled pair: the line and the operation it settles.
Settle = Callable[[ReportLine, Operation], None]

_REMEDIATION = {
    Kind.AMOUNT_MISMATCH: "compare the acquirer's line with the payment; book the difference "
    "or dispute it with the acquirer",
    Kind.CURRENCY_MISMATCH: "ask the acquirer why the line settled in another currency",
    Kind.UNKNOWN_AT_ONCEPAY: "find the operation at the acquirer; refund it if no payment "
    "of OncePay stands behind it",
    Kind.MISSING_AT_ACQUIRER: "ask the acquirer whether the operation happened; look it up "
    "by reference",
    Kind.DUPLICATE_SETTLEMENT: "claim the second settlement back from the acquirer",
    Kind.ORPHANED_AUTHORIZATION: "void the authorization at the acquirer (safe: no payment "
    "will capture it); if the acquirer refuses the void because it was captured, refund it "
    "there",
    Kind.FEE_MISMATCH: "check the acquirer's fee schedule; claim the difference",
    Kind.TYPE_MISMATCH: "ask the acquirer which movement this line is",
    Kind.STALE_AUTHORIZATION: "capture it now if the goods went out (the acquirer may refuse), "
    "else cancel the payment",
    Kind.SETTLED_ON_CANCELED_PAYMENT: "the customer was charged for a payment OncePay failed or "
    "canceled: refund it at the acquirer, or claim it back",
    Kind.REMEDIATION_WITHHELD: "too many automatic actions at once: find out why (a bug, a "
    "replayed batch), then act on each discrepancy by hand",
}
# The payment a reference of OncePay names: {payment}_a{attempt} or {payment}_capture.
_PAYMENT_REFERENCE = re.compile(r"^(pay_[0-9a-f]{24})_(?:a\d+|capture|void)$")


@dataclass(frozen=True, slots=True)
class Books:
    """OncePay's side of one reconciliation."""

    operations: Sequence[Operation]  # the unsettled ones, and those the report may settle
    payments: Mapping[str, Payment] = field(default_factory=dict)
    settled_before: frozenset[str] = frozenset()  # references settled by earlier reports
    holds: Sequence[Hold] = ()  # payments still authorized, for the stale ones


def reconcile(
    lines: Iterable[ReportLine],
    books: Books,
    authorizations: Iterable[Authorization] = (),
    *,
    as_of: date,
    grace_days: int = DEFAULT_GRACE_DAYS,
    fees: FeeSchedule | None = None,
    settle: Settle | None = None,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
) -> Outcome:
    """Match ``lines`` (one acquirer's report up to ``as_of``) against ``books``.

    Each settled (line, operation) pair goes to ``settle`` when given (a writer posting in
    batches keeps memory bounded), else into ``Outcome.settled``."""
    matching = Matching(books, fees=fees, settle=settle)
    for line in lines:
        matching.take(line)
    return matching.finish(
        authorizations, as_of=as_of, grace_days=grace_days, validity_days=validity_days
    )


class Matching:
    """:func:`reconcile` one line at a time: :meth:`take` each line as it is read, then
    :meth:`finish`. The pipeline posts the settled pairs in batches between lines (bounded
    memory); the outcome is the same as :func:`reconcile`'s over the same lines."""

    def __init__(
        self, books: Books, *, fees: FeeSchedule | None = None, settle: Settle | None = None
    ) -> None:
        self._run = _Run(books, fees, settle)

    def take(self, line: ReportLine) -> None:
        self._run.take(line)

    def finish(
        self,
        authorizations: Iterable[Authorization] = (),
        *,
        as_of: date,
        grace_days: int = DEFAULT_GRACE_DAYS,
        validity_days: int = DEFAULT_VALIDITY_DAYS,
    ) -> Outcome:
        """The residual join (its settled pairs go to ``settle`` too), then what did not
        settle; the outcome."""
        run = self._run
        run.settle_residual()
        run.find_missing(as_of, grace_days)
        run.find_orphans(authorizations)
        run.find_stale(as_of, validity_days)
        return run.outcome()


class _Run:
    """One matching pass's state; private to :func:`reconcile`."""

    def __init__(self, books: Books, fees: FeeSchedule | None, settle: Settle | None) -> None:
        self.by_reference = {op.reference: op for op in books.operations}
        self.books, self.fees = books, fees
        self.seen: set[str] = set(books.settled_before)
        self.settled: list[tuple[ReportLine, Operation]] = []
        self.matched = 0
        self.settle = settle or (lambda line, op: self.settled.append((line, op)))
        self.residual: list[ReportLine] = []
        self.found: list[Discrepancy] = []
        self.orphans: list[Authorization] = []

    def take(self, line: ReportLine) -> None:
        if line.reference in self.seen:
            self._open(Kind.DUPLICATE_SETTLEMENT, line, _payment_of(self, line), "settled twice")
            return
        op = self.by_reference.get(line.reference)
        if op is None:
            self.seen.add(line.reference)
            self.residual.append(line)
        else:
            self.seen.add(op.reference)  # the books' string: the line's copy is not kept
            kind, amount, fee, fees = line.type, line.amount, line.fee, self.fees
            if (  # the common case, a clean line, checked inline: a million go through here
                kind == op.type
                and amount == op.amount
                and line.currency == op.currency
                and line.net == FeeSchedule.net(kind, amount, fee)
                and (fees is None or fee == fees.fee(kind, amount))
                and (fee >= 0 or kind != "capture")  # a negative capture fee: _check_fee
            ):
                self.matched += 1
                self.settle(line, op)
            else:  # every difference, in _compare's order
                self._compare(line, op)

    def _compare(self, line: ReportLine, op: Operation) -> None:
        """Every difference of a joined line is reported; the line settles its operation
        only when nothing but the fee differs from the schedule (a ``net`` that is not
        ``amount - fee`` leaves the money paid out in doubt: it settles nothing)."""
        clean = True
        if line.type != op.type:
            clean = self._open(Kind.TYPE_MISMATCH, line, op.payment_id, f"{op.type} at OncePay")
        if line.currency != op.currency:
            detail = f"{line.currency} settled, {op.currency} at OncePay"
            clean = self._open(Kind.CURRENCY_MISMATCH, line, op.payment_id, detail)
        if line.amount != op.amount:
            detail = f"{line.amount} settled, {op.amount} at OncePay"
            net = FeeSchedule.net(line.type, line.amount, line.fee)
            if line.net != net:
                detail += f" (and its net {line.net} is not amount less fee {line.fee}: {net})"
            clean = self._open(Kind.AMOUNT_MISMATCH, line, op.payment_id, detail)
        # The fee of a line of the wrong type, currency or amount means nothing of its own: the
        # line has its discrepancy already (one a line, as a labelled check counts them).
        if clean:
            clean = self._check_fee(line, op.payment_id)
        if clean:
            self._settle(line, op)

    def _check_fee(self, line: ReportLine, payment_id: str | None) -> bool:
        """Open a ``fee_mismatch`` for a fee off the schedule or a ``net`` that is not
        ``amount - fee``; False for the latter: the ledger could not book the line as the
        payout carries it (``oncepay ledger check`` checks both), so it must not settle."""
        net = FeeSchedule.net(line.type, line.amount, line.fee)
        if line.net != net:
            detail = f"net {line.net} is not amount {line.amount} less fee {line.fee} ({net})"
            return self._open(Kind.FEE_MISMATCH, line, payment_id, detail)
        if line.fee < 0 and line.type == "capture":
            # Whatever the schedule: an acquirer that "kept" less than nothing paid out more
            # than the customer was charged. The line settles; the difference is not ignored.
            detail = f"fee {line.fee} is negative: {line.net} paid out for {line.amount} captured"
            self._open(Kind.FEE_MISMATCH, line, payment_id, detail)
        elif self.fees is not None and line.fee != self.fees.fee(line.type, line.amount):
            detail = f"fee {line.fee}, the schedule says {self.fees.fee(line.type, line.amount)}"
            self._open(Kind.FEE_MISMATCH, line, payment_id, detail)
        return True

    def settle_residual(self) -> None:
        unsettled = self._unsettled_by_payment()
        for line in self.residual:
            candidates = unsettled.get(line.order_id, [])
            op = next((op for op in candidates if _same_movement(line, op)), None)
            if op is None:
                self._open(Kind.UNKNOWN_AT_ONCEPAY, line, line.order_id or None, "no operation")
                continue
            candidates.remove(op)
            self.seen.add(op.reference)
            if self._check_fee(line, op.payment_id):
                self._settle(line, op)

    def _unsettled_by_payment(self) -> dict[str, list[Operation]]:
        """The unsettled operations of the payments the residual lines name, lowest
        reference first (only those: a million operations are not sorted for a few lines)."""
        named = {line.order_id for line in self.residual if line.order_id}
        if not named:
            return {}
        wanted = (op for op in self.by_reference.values() if op.payment_id in named)
        unsettled: dict[str, list[Operation]] = {}
        for op in sorted(wanted, key=lambda op: op.reference):
            if op.reference not in self.seen:
                unsettled.setdefault(op.payment_id, []).append(op)
        return unsettled

    def find_missing(self, as_of: date, grace_days: int) -> None:
        for op in self.by_reference.values():
            age = (as_of - op.day).days
            if op.reference not in self.seen and age >= grace_days:
                detail = f"{op.type} of {op.amount} {op.currency} on {op.day}, {age} days ago"
                self.found.append(
                    _discrepancy(Kind.MISSING_AT_ACQUIRER, op.reference, op.payment_id, detail)
                )

    def find_orphans(self, authorizations: Iterable[Authorization]) -> None:
        for auth in authorizations:
            payment = self.books.payments.get(auth.order_id)
            reason = _orphaned(auth, payment)
            if reason:
                self.orphans.append(auth)
                detail = f"authorization {auth.id} of {auth.amount} {auth.currency}: {reason}"
                if payment is None and auth.order_id:  # the acquirer's order id is evidence,
                    detail += f" (its order id: {auth.order_id})"  # not a payment of ours
                payment_id = auth.order_id if payment is not None else None
                self.found.append(
                    _discrepancy(Kind.ORPHANED_AUTHORIZATION, auth.reference, payment_id, detail)
                )

    def find_stale(self, as_of: date, validity_days: int) -> None:
        for hold in self.books.holds:
            age = (as_of - hold.day).days
            if age >= validity_days:
                detail = f"authorized {hold.amount} {hold.currency} on {hold.day}, {age} days ago"
                found = _discrepancy(
                    Kind.STALE_AUTHORIZATION, hold.reference, hold.payment_id, detail
                )
                self.found.append(found)

    def _settle(self, line: ReportLine, op: Operation) -> None:
        self.matched += 1
        self.settle(line, op)

    def _open(self, kind: Kind, line: ReportLine, payment_id: str | None, detail: str) -> bool:
        where = f"line {line.line}: {line.type} {line.amount} {line.currency}; {detail}"
        self.found.append(_discrepancy(kind, line.reference, payment_id, where))
        return False

    def outcome(self) -> Outcome:
        ordered = sorted(self.found, key=lambda d: (d.reference, d.kind.value, d.detail))
        orphans = tuple(sorted(self.orphans, key=lambda auth: auth.reference))
        return Outcome(self.matched, tuple(ordered), tuple(self.settled), orphans)


def _payment_of(run: _Run, line: ReportLine) -> str | None:
    op = run.by_reference.get(line.reference)
    return op.payment_id if op else (line.order_id or None)


def _same_movement(line: ReportLine, op: Operation) -> bool:
    return (line.type, line.amount, line.currency) == (op.type, op.amount, op.currency)


def _orphaned(auth: Authorization, payment: Payment | None) -> str:
    if payment is None:
        return "no payment at OncePay"
    if payment.status in _ENDED:
        return f"the payment is {payment.status}"
    if payment.authorization_id not in (None, auth.id):
        return f"the payment holds authorization {payment.authorization_id}"
    return ""


def _discrepancy(kind: Kind, reference: str, payment_id: str | None, detail: str) -> Discrepancy:
    return Discrepancy(kind, reference, payment_id, detail, _REMEDIATION[kind])


def named_payment(found: Discrepancy) -> str | None:
    """The payment a discrepancy names: its own, or the one its reference is derived from."""
    if found.payment_id:
        return found.payment_id
    named = _PAYMENT_REFERENCE.match(found.reference)
    return named.group(1) if named else None


def refine(outcome: Outcome, payments: Mapping[str, Payment]) -> Outcome:
    """Money settled for a payment OncePay knows but failed or canceled is not "unknown": it
    is :attr:`Kind.SETTLED_ON_CANCELED_PAYMENT`. ``payments`` are those the unknown lines
    name (:func:`named_payment`); order stays deterministic."""
    refined = [_refined(found, payments) for found in outcome.discrepancies]
    ordered = tuple(sorted(refined, key=lambda d: (d.reference, d.kind.value, d.detail)))
    return Outcome(outcome.matched, ordered, outcome.settled, outcome.orphans)


def _refined(found: Discrepancy, payments: Mapping[str, Payment]) -> Discrepancy:
    payment = payments.get(named_payment(found) or "")
    if found.kind is not Kind.UNKNOWN_AT_ONCEPAY:
        return found
    if payment is None:
        if found.payment_id is None:
            return found
        # The line names a payment OncePay does not have: evidence, not a payment id.
        detail = f"{found.detail} (the line names payment {found.payment_id}, not at OncePay)"
        return Discrepancy(found.kind, found.reference, None, detail, found.remediation)
    if payment.status not in _ENDED:  # the payment it names, as evidence
        return Discrepancy(found.kind, found.reference, payment.id, found.detail, found.remediation)
    detail = f"{found.detail}: the payment is {payment.status} at OncePay"
    return _discrepancy(Kind.SETTLED_ON_CANCELED_PAYMENT, found.reference, payment.id, detail)


def remediation_of(kind: Kind) -> str:
    return _REMEDIATION[kind]


def alert(kind: Kind, reference: str, detail: str) -> Discrepancy:
    """A discrepancy that names no line nor payment (the withheld remediation's alert)."""
    return _discrepancy(kind, reference, None, detail)


def without_in_flight(outcome: Outcome, in_flight: Set[str]) -> Outcome:
    """Money the acquirer settled for a payment whose call OncePay has not booked yet (it is
    in flight: the answer is being committed, or recovery is asking the acquirer, SPEC §5) is
    not unknown: a run in the middle of the day would otherwise open a discrepancy for it that
    no later run closes. It is left out, unmatched; the next run matches it. (The chaos audit,
    which reconciles while payments are in flight, found this.)"""
    kept = tuple(
        found
        for found in outcome.discrepancies
        if found.kind is not Kind.UNKNOWN_AT_ONCEPAY or named_payment(found) not in in_flight
    )
    if len(kept) == len(outcome.discrepancies):
        return outcome
    return Outcome(outcome.matched, kept, outcome.settled, outcome.orphans)
