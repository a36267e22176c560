"""The exactly-once audit: what the clients were told, what the database holds, what the
acquirers did and what the webhook receiver handled, checked against each other.

Each check returns the violations it found; none may be found."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text

from oncepay.payments.ledger import check as ledger_check
from oncepay.payments.phases import parse_point
from oncepay.payments.storage.idempotency import IDEMPOTENCY_TABLE
from oncepay.payments.storage.schema import events, payments
from oncepay.reconciliation.settlement import check_payouts
from oncepay.storage.db import Database, read

__all__ = ["Evidence", "audit"]

APPROVED_STATUSES = {"authorized", "captured", "partially_refunded", "refunded", "canceled"}


@dataclass
class Evidence:
    """Everything the audit compares."""

    answers: dict[str, dict[str, Any] | None]  # key -> the client's final 201 body (None: none)
    operations: list[dict[str, Any]]  # every acquirer's operations, each with "acquirer"
    received: dict[str, Any]  # the webhook receiver's stats: arrived / handled per webhook-id
    movements: list[dict[str, Any]] = field(default_factory=list)  # settlement entries
    payments: list[Any] = field(default_factory=list)  # payments rows
    key_to_payment: dict[str, str] = field(default_factory=dict)  # from idempotency records
    event_ids: list[str] = field(default_factory=list)
    ledger: list[str] = field(default_factory=list)
    # Orders of the orphaned authorizations injected at the acquirers (chaos/reconcile.py):
    # money moved for them is the reconciliation's to find, not a violation here.
    injected: set[str] = field(default_factory=set)


async def gather(db: Database, merchant_id: str, evidence: Evidence) -> Evidence:
    async with read(db) as conn:
        evidence.payments = list(await conn.execute(select(payments)))
        rows = await conn.execute(
            text(
                f"SELECT idempotency_key, recovery_point FROM {IDEMPOTENCY_TABLE} "
                "WHERE scope = :scope AND recovery_point IS NOT NULL"
            ),
            {"scope": merchant_id},
        )
        for key, point in rows:
            parsed = parse_point(point)
            if parsed is not None and parsed[1] == "create":
                evidence.key_to_payment[key] = parsed[2]
        evidence.event_ids = list((await conn.execute(select(events.c.id))).scalars())
        # what `oncepay ledger check` checks: every payment, and every payout's lines
        found = await ledger_check(conn) + await check_payouts(conn)
        evidence.ledger = [f"{v.subject}: {v.problem}" for v in found]
    return evidence


def audit(evidence: Evidence) -> dict[str, list[str]]:
    """Violations by check; every list must be empty."""
    return {
        "authorized at most once per payment": _at_most_once(evidence),
        "every approved payment authorized exactly once": _approved_once(evidence),
        "no money moved for a payment that does not exist": _orphans(evidence),
        "captured and refunded amounts match the acquirers' settlements": _settled(evidence),
        "one payment per logical payment": _one_per_key(evidence),
        "client answers agree with the database": _answers_agree(evidence),
        "every client got a final answer": _all_answered(evidence),
        "no payment left processing": _none_processing(evidence),
        "ledger balances and matches every payment": evidence.ledger,
        "every event delivered, each handled once": _webhooks(evidence),
    }


def _approvals(evidence: Evidence) -> Counter[str]:
    return Counter(
        op["order_id"]
        for op in evidence.operations
        if op["type"] == "authorization" and op["status"] == "approved"
    )


def _at_most_once(evidence: Evidence) -> list[str]:
    return [
        f"{order}: {n} approved authorizations"
        for order, n in _approvals(evidence).items()
        if n > 1
    ]


def _approved_once(evidence: Evidence) -> list[str]:
    approvals = _approvals(evidence)
    found = []
    for row in evidence.payments:
        expected = 1 if row.status in APPROVED_STATUSES else 0
        if approvals.get(row.id, 0) != expected:
            found.append(f"{row.id} is {row.status} with {approvals.get(row.id, 0)} approvals")
    return found


def _orphans(evidence: Evidence) -> list[str]:
    known = {row.id for row in evidence.payments}
    return [
        f"{op['acquirer']} {op['type']} {op['reference']} for unknown order {op['order_id']}"
        for op in evidence.operations
        if op["status"] == "approved"
        and op["order_id"] not in known
        and op["order_id"] not in evidence.injected
    ]


def _settled(evidence: Evidence) -> list[str]:
    """Every capture and refund at the acquirers, summed per payment, against the payment."""
    moved: dict[tuple[str, str], int] = Counter()
    for entry in evidence.movements:
        moved[entry["order_id"], entry["type"]] += int(entry["amount"])
    found = []
    for row in evidence.payments:
        captured, refunded = moved.get((row.id, "capture"), 0), moved.get((row.id, "refund"), 0)
        if captured != row.amount_captured:
            found.append(
                f"{row.id}: the acquirers captured {captured}, "
                f"the payment says {row.amount_captured}"
            )
        if refunded != row.amount_refunded:
            found.append(
                f"{row.id}: the acquirers refunded {refunded}, "
                f"the payment says {row.amount_refunded}"
            )
    return found


def _one_per_key(evidence: Evidence) -> list[str]:
    linked = set(evidence.key_to_payment.values())
    return [
        f"{row.id} belongs to no logical payment (a second run?)"
        for row in evidence.payments
        if row.id not in linked
    ]


def _answers_agree(evidence: Evidence) -> list[str]:
    by_id = {row.id: row for row in evidence.payments}
    found = []
    for key, answer in evidence.answers.items():
        if answer is None:
            continue
        if evidence.key_to_payment.get(key) != answer["id"]:
            found.append(
                f"key {key}: told {answer['id']}, the key names {evidence.key_to_payment.get(key)}"
            )
            continue
        row = by_id.get(answer["id"])
        if row is None or row.status != answer["status"]:
            found.append(
                f"key {key}: told {answer['status']}, the database says "
                f"{row.status if row is not None else 'nothing'}"
            )
    return found


def _all_answered(evidence: Evidence) -> list[str]:
    return [f"key {key}: no final answer" for key, a in evidence.answers.items() if a is None]


def _none_processing(evidence: Evidence) -> list[str]:
    return [
        f"{row.id} still processing (outcome unknown: {bool(row.outcome_unknown)})"
        for row in evidence.payments
        if row.status == "processing"
    ]


def _webhooks(evidence: Evidence) -> list[str]:
    arrived, handled = evidence.received["arrived"], evidence.received["handled"]
    found = [f"{e}: never delivered" for e in evidence.event_ids if handled.get(e, 0) == 0]
    found += [f"{e}: handled {n} times" for e, n in handled.items() if n > 1]
    found += [f"{e}: handled but never arrived?" for e in handled if arrived.get(e, 0) == 0]
    return found


def summarise_operations(operations: list[dict[str, Any]]) -> dict[str, int]:
    return dict(Counter(f"{op['acquirer']}:{op['type']}:{op['status']}" for op in operations))
