"""A fee schedule: what an acquirer charges per settled line, in integer minor units.

A rate is a fixed part plus basis points of the amount, rounded half up; one rate per line
type (captures usually cost, refunds usually do not). The simulated acquirer charges by a
schedule and reconciliation checks each line's fee against the schedule it is given."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DEFAULT_SCHEDULE", "FeeRate", "FeeSchedule"]


@dataclass(frozen=True, slots=True)
class FeeRate:
    basis_points: int = 0  # 1 bp = 0.01 %
    fixed: int = 0  # minor units

    def of(self, amount: int) -> int:
        return self.fixed + (amount * self.basis_points + 5_000) // 10_000


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    capture: FeeRate = field(default_factory=FeeRate)
    refund: FeeRate = field(default_factory=FeeRate)

    def fee(self, line_type: str, amount: int) -> int:
        return (self.capture if line_type == "capture" else self.refund).of(amount)

    @staticmethod
    def net(line_type: str, amount: int, fee: int) -> int:
        """What the line adds to the payout: money in less the fee, or money out plus it."""
        return amount - fee if line_type == "capture" else -amount - fee


# 1.4 % + 25 minor units per capture, refunds free: a typical European card price.
DEFAULT_SCHEDULE = FeeSchedule(capture=FeeRate(basis_points=140, fixed=25))
