"""The double-entry ledger (SPEC §5).

Every money movement is one journal transaction of entries that sum to zero per currency;
debits are positive, credits negative. Balances are sums of entries; entries are only ever
inserted (the database refuses updates and deletes, see ``migrations``).

Accounts, per merchant and currency; each payment's entries carry its id, so its balances are
sums over its own entries:

    card_authorizations   asset      what the card networks have promised for open authorizations
    authorized_funds      liability  the same money, held for the merchant until captured or voided
    acquirer_receivable   asset      captured money the acquirer owes us (until settlement)
    merchant_payable      liability  captured money, net of refunds, that we owe the merchant
    settled_funds         asset      money the acquirer settled (paid out) to us, net of fees
    acquirer_fees         expense    what the acquirer kept for settling

    authorize a  :  DR card_authorizations a    CR authorized_funds a
    void         :  reverses the open hold
    capture c    :  reverses the open hold, then DR acquirer_receivable c   CR merchant_payable c
    refund r     :  DR merchant_payable r       CR acquirer_receivable r
    settle       :  see ``oncepay.reconciliation.settlement`` (receivable -> settled funds + fee)
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import tracing
from oncepay.payments.records import PaymentRow
from oncepay.payments.states import PaymentStatus
from oncepay.payments.storage.schema import ledger_entries, payments, refunds
from oncepay.storage.db import Database, read
from oncepay.storage.ids import new_id
from oncepay.storage.raw import Sql, raw

__all__ = ["Violation", "audit", "authorize", "capture", "check", "refund", "release_hold"]

CARD_AUTHORIZATIONS = "card_authorizations"
AUTHORIZED_FUNDS = "authorized_funds"
ACQUIRER_RECEIVABLE = "acquirer_receivable"
MERCHANT_PAYABLE = "merchant_payable"
SETTLED_FUNDS = "settled_funds"
ACQUIRER_FEES = "acquirer_fees"

Entries = list[tuple[str, int]]

# Raw statements (storage/raw.py): through SQLAlchemy Core a posting cost more than
# the database's work (bench/e2e/PROFILE.md).
_INSERT_TRANSACTION = Sql(
    "INSERT INTO ledger_transactions (id, merchant_id, payment_id, refund_id, kind, created_at) "
    "VALUES ($1, $2, $3, $4, $5, $6)"
)
_INSERT_ENTRY = Sql(
    "INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, currency, "
    "amount) VALUES ($1, $2, $3, $4, $5, $6)"
)


async def post(
    conn: AsyncConnection,
    *,
    merchant_id: str,
    payment_id: str,
    currency: str,
    kind: str,
    entries: Entries,
    refund_id: str | None = None,
) -> str:
    """Write one journal transaction; its entries must balance."""
    if sum(amount for _, amount in entries) != 0:
        raise ValueError(f"unbalanced journal transaction {kind}: {entries}")
    transaction_id = new_id("txn")
    db = await raw(conn)
    await db.run(
        _INSERT_TRANSACTION, transaction_id, merchant_id, payment_id, refund_id, kind, time.time()
    )
    await db.many(
        _INSERT_ENTRY,
        [
            (transaction_id, merchant_id, payment_id, account, currency, amount)
            for account, amount in entries
        ],
    )
    if tracing.ENABLED:
        tracing.ledger_posting(
            transaction_id,
            kind=kind,
            payment_id=payment_id,
            currency=currency,
            entries=len(entries),
        )
    return transaction_id


def authorize(amount: int) -> Entries:
    return [(CARD_AUTHORIZATIONS, amount), (AUTHORIZED_FUNDS, -amount)]


def release_hold(amount: int) -> Entries:
    return [(AUTHORIZED_FUNDS, amount), (CARD_AUTHORIZATIONS, -amount)]


def capture(authorized: int, captured: int) -> Entries:
    return [
        *release_hold(authorized),
        (ACQUIRER_RECEIVABLE, captured),
        (MERCHANT_PAYABLE, -captured),
    ]


def refund(amount: int) -> Entries:
    return [(MERCHANT_PAYABLE, amount), (ACQUIRER_RECEIVABLE, -amount)]


# -- the check -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    subject: str  # a transaction or payment id
    problem: str


_HELD = {PaymentStatus.AUTHORIZED}
_CAPTURED = {PaymentStatus.CAPTURED, PaymentStatus.PARTIALLY_REFUNDED, PaymentStatus.REFUNDED}


def expected_balances(row: PaymentRow) -> tuple[int, int]:
    """(held, payable) that a payment's status and amounts imply."""
    status = PaymentStatus(row.status)
    held = row.amount if status in _HELD else 0
    payable = row.amount_captured - row.amount_refunded if status in _CAPTURED else 0
    return held, payable


async def check(conn: AsyncConnection) -> list[Violation]:
    """Every invariant of the ledger and of each payment against it."""
    violations = [
        Violation(tx, f"entries sum to {total} {currency}, not 0")
        for tx, currency, total in await conn.execute(
            select(
                ledger_entries.c.transaction_id,
                ledger_entries.c.currency,
                func.sum(ledger_entries.c.amount),
            )
            .group_by(ledger_entries.c.transaction_id, ledger_entries.c.currency)
            .having(func.sum(ledger_entries.c.amount) != 0)
        )
    ]
    balances: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for payment_id, account, total in await conn.execute(
        select(
            ledger_entries.c.payment_id, ledger_entries.c.account, func.sum(ledger_entries.c.amount)
        ).group_by(ledger_entries.c.payment_id, ledger_entries.c.account)
    ):
        balances[payment_id][account] = int(total)
    refunded = {
        payment_id: int(total)
        for payment_id, total in await conn.execute(
            select(refunds.c.payment_id, func.sum(refunds.c.amount))
            .where(refunds.c.status == "succeeded")
            .group_by(refunds.c.payment_id)
        )
    }
    for row in await conn.execute(select(payments)):
        payment = cast(PaymentRow, row)
        found = _check_payment(payment, balances.get(payment.id, {}), refunded.get(payment.id, 0))
        violations.extend(found)
    return violations


def _check_payment(row: PaymentRow, balance: dict[str, int], refunded: int) -> list[Violation]:
    found: list[Violation] = []
    held, payable = expected_balances(row)
    actual_held = -balance.get(AUTHORIZED_FUNDS, 0)
    actual_payable = -balance.get(MERCHANT_PAYABLE, 0)
    if actual_held != held:
        found.append(
            Violation(row.id, f"{row.status}: authorized_funds {actual_held}, expected {held}")
        )
    if actual_payable != payable:
        found.append(
            Violation(
                row.id, f"{row.status}: merchant_payable {actual_payable}, expected {payable}"
            )
        )
    found.extend(_check_settlement(row, balance))
    if int(refunded) != row.amount_refunded:
        found.append(
            Violation(
                row.id, f"refunds sum to {refunded}, amount_refunded is {row.amount_refunded}"
            )
        )
    status = PaymentStatus(row.status)
    if status is PaymentStatus.REFUNDED and row.amount_refunded != row.amount_captured:
        found.append(Violation(row.id, "refunded, but not all captured money was refunded"))
    if (
        status is PaymentStatus.PARTIALLY_REFUNDED
        and not 0 < row.amount_refunded < row.amount_captured
    ):
        found.append(Violation(row.id, "partially_refunded with refunds outside (0, captured)"))
    return found


def _check_settlement(row: PaymentRow, balance: dict[str, int]) -> list[Violation]:
    """Settlement moved the acquirer's settled money out of the receivable into settled funds
    and booked its fees; what is left in the receivable is what it still owes."""
    settled, refunded, fee = row.amount_settled, row.amount_refund_settled, row.settlement_fee
    expected = {
        SETTLED_FUNDS: settled - refunded - fee,
        ACQUIRER_FEES: fee,
        ACQUIRER_RECEIVABLE: row.amount_captured - row.amount_refunded - settled + refunded,
    }
    found = [
        Violation(row.id, f"{account} {balance.get(account, 0)}, expected {amount}")
        for account, amount in expected.items()
        if balance.get(account, 0) != amount
    ]
    if not (0 <= settled <= row.amount_captured and 0 <= refunded <= row.amount_refunded):
        found.append(
            Violation(row.id, f"settled {settled} and refunds settled {refunded} exceed the moves")
        )
    return found


async def audit(db: Database) -> tuple[list[Violation], int]:
    """Every violation of the ledger's invariants, and how many payments were checked, read
    in one transaction (``oncepay ledger check``)."""
    async with read(db) as conn:
        count = (await conn.execute(select(func.count()).select_from(payments))).scalar()
        return await check(conn), int(count or 0)
