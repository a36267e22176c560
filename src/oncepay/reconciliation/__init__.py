"""Reconciliation: an acquirer's settlement report against OncePay's books (SPEC §10).

Layers, arrows down: ``report`` reads a CSV through a ``mapping`` into typed ``records``;
``matcher`` is a pure function from those records (and OncePay's operations, payments and the
acquirer's authorizations) to an :class:`~oncepay.reconciliation.records.Outcome`; ``fees`` and
``money`` hold the integer arithmetic; ``errors`` what a report can be refused for."""

from __future__ import annotations

from oncepay.reconciliation.errors import ReportError
from oncepay.reconciliation.fees import FeeRate, FeeSchedule
from oncepay.reconciliation.mapping import MAPPINGS, ColumnMapping
from oncepay.reconciliation.matcher import DEFAULT_GRACE_DAYS, Books, reconcile
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
from oncepay.reconciliation.report import read_report

__all__ = [
    "DEFAULT_GRACE_DAYS",
    "MAPPINGS",
    "Authorization",
    "Books",
    "ColumnMapping",
    "Discrepancy",
    "FeeRate",
    "FeeSchedule",
    "Hold",
    "Kind",
    "Operation",
    "Outcome",
    "Payment",
    "ReportError",
    "ReportLine",
    "read_report",
    "reconcile",
]
