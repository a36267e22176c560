"""A generated day of business: OncePay's operations and the acquirer's clean report for
them, with fees from the schedule, to plant discrepancies into."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

from oncepay.reconciliation import (
    Authorization,
    Books,
    FeeRate,
    FeeSchedule,
    Hold,
    Operation,
    Payment,
    ReportLine,
)

DAY = date(2026, 12, 1)
SCHEDULE = FeeSchedule(capture=FeeRate(basis_points=140, fixed=25))


@dataclass
class Day:
    operations: list[Operation] = field(default_factory=list)
    lines: list[ReportLine] = field(default_factory=list)
    payments: dict[str, Payment] = field(default_factory=dict)
    authorizations: list[Authorization] = field(default_factory=list)
    holds: list[Hold] = field(default_factory=list)

    def books(self, settled_before: frozenset[str] = frozenset()) -> Books:
        return Books(self.operations, self.payments, settled_before, self.holds)


def line_for(op: Operation, number: int, **changes: object) -> ReportLine:
    fee = SCHEDULE.fee(op.type, op.amount)
    line = ReportLine(
        line=number,
        reference=op.reference,
        type=op.type,
        amount=op.amount,
        currency=op.currency,
        fee=fee,
        net=FeeSchedule.net(op.type, op.amount, fee),
        settled_at=f"{op.day}T12:00:00Z",
        payout_id=f"po_{op.day}_{op.currency}",
        order_id=op.payment_id,
    )
    return line._replace(**changes)  # type: ignore[arg-type]


def clean_day(payments: int, day: date = DAY) -> Day:
    """``payments`` captured payments, every tenth also partly refunded, all settled."""
    generated = Day()
    for n in range(payments):
        pid = f"pay_{n:07d}"
        currency = ("EUR", "USD", "JPY")[n % 3]
        auth = f"auth_{n:07d}"
        generated.payments[pid] = Payment(pid, "captured", auth)
        generated.authorizations.append(Authorization(auth, f"{pid}_a1", pid, 1000 + n, currency))
        generated.operations.append(
            Operation(f"{pid}_capture", pid, "capture", 1000 + n, currency, day)
        )
        if n % 10 == 0:
            generated.operations.append(Operation(f"re_{n:07d}", pid, "refund", 300, currency, day))
    generated.lines = [line_for(op, i) for i, op in enumerate(generated.operations, start=2)]
    return generated
