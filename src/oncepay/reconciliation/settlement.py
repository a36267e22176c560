"""Settlement in the ledger: a matched line moves its money from what the acquirer owes us to
settled funds, and books the acquirer's fee as an expense (SPEC §10).

    capture c, fee f :  DR settled_funds c - f   DR acquirer_fees f   CR acquirer_receivable c
    refund r, fee f  :  DR acquirer_receivable r   DR acquirer_fees f   CR settled_funds r + f

Each journal balances (``ledger.post`` refuses one that does not); the accounts are new, so
the invariants ``oncepay ledger check`` verifies (held and payable per payment) are untouched.
Posting is once per reference: a guard row in ``reconciliation_settlements`` is written in the
same transaction as the journal, and a reference already there is skipped, so re-running a
day posts nothing twice."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import ledger
from oncepay.payments.storage.schema import payments
from oncepay.reconciliation.records import Operation, ReportLine
from oncepay.reconciliation.store import settlements
from oncepay.storage.db import Database, write

__all__ = ["ACQUIRER_FEES", "SETTLED_FUNDS", "entries", "post_settlements"]

SETTLED_FUNDS = "settled_funds"  # asset: money the acquirer paid out to us
ACQUIRER_FEES = "acquirer_fees"  # expense: what the acquirer kept
# Settled pairs per transaction: bounded transactions on SQLite's single writer.
BATCH = 1000


def entries(line: ReportLine) -> ledger.Entries:
    if line.type == "capture":
        return [
            (SETTLED_FUNDS, line.amount - line.fee),
            (ACQUIRER_FEES, line.fee),
            (ledger.ACQUIRER_RECEIVABLE, -line.amount),
        ]
    return [
        (ledger.ACQUIRER_RECEIVABLE, line.amount),
        (ACQUIRER_FEES, line.fee),
        (SETTLED_FUNDS, -(line.amount + line.fee)),
    ]


async def post_settlements(
    db: Database, settled: Sequence[tuple[ReportLine, Operation]], *, now: float
) -> int:
    """Post each settled pair once; return how many were posted now."""
    posted = 0
    for start in range(0, len(settled), BATCH):
        async with write(db) as conn:
            posted += await _post_batch(conn, settled[start : start + BATCH], now)
    return posted


async def _post_batch(
    conn: AsyncConnection, batch: Sequence[tuple[ReportLine, Operation]], now: float
) -> int:
    references = [op.reference for _, op in batch]
    query = select(settlements.c.reference).where(settlements.c.reference.in_(references))
    done = set((await conn.execute(query)).scalars())
    ids = sorted({op.payment_id for _, op in batch})
    owners = select(payments.c.id, payments.c.merchant_id).where(payments.c.id.in_(ids))
    merchant_of = {row.id: row.merchant_id for row in (await conn.execute(owners)).all()}
    posted = 0
    for line, op in batch:
        if op.reference in done:
            continue
        done.add(op.reference)
        await _post_one(conn, line, op, merchant_of[op.payment_id], now)
        posted += 1
    return posted


async def _post_one(
    conn: AsyncConnection, line: ReportLine, op: Operation, merchant_id: str, now: float
) -> None:
    refund_id = op.reference if op.type == "refund" else None
    transaction_id = await ledger.post(
        conn,
        merchant_id=merchant_id,
        payment_id=op.payment_id,
        currency=op.currency,
        kind="settlement",
        entries=entries(line),
        refund_id=refund_id,
    )
    await conn.execute(
        settlements.insert().values(
            reference=op.reference,
            payment_id=op.payment_id,
            payout_id=line.payout_id,
            amount=line.amount,
            fee=line.fee,
            net=line.net,
            settled_at=line.settled_at,
            transaction_id=transaction_id,
            created_at=now,
        )
    )
