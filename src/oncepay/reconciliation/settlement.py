"""Settlement in the ledger: a matched line moves its money from what the acquirer owes us to
settled funds, and books the acquirer's fee as an expense (SPEC §10).

    capture c, fee f :  DR settled_funds c - f   DR acquirer_fees f   CR acquirer_receivable c
    refund r, fee f  :  DR acquirer_receivable r   DR acquirer_fees f   CR settled_funds r + f

Each journal balances; a payout's lines therefore move exactly its net into settled funds.

Posting is once per reference: the guard row in ``reconciliation_settlements`` is inserted
first, and only the lines whose guard this transaction wrote are posted, in the same
transaction: a re-run, or a second run at the same time, posts nothing twice. A line whose
guard was written before is the same settlement read again when its type, amount, payout and
time are the guard's (skipped), and the money paid out twice otherwise (a
``duplicate_settlement``, :attr:`Posted.twice`: a second report file, or another day's report,
settling a reference again under a new payout). With the journal
the payment's settlement columns are added to and a ``payment.settled`` event is written (the
transactional outbox). The rows are built inside the database (:mod:`.bulk`): a batch's lines
are staged once (a TEMP table on SQLite, arrays in one statement on PostgreSQL) and every
guard, journal, entry and payment update is an ``INSERT … SELECT`` / ``UPDATE … FROM`` over
them, so a batch of 5,000 lines is a handful of statements and no Python work per written
row. The journal :func:`entries` describes is the one the SQL writes."""

from __future__ import annotations

import itertools
import json
import secrets
from collections import namedtuple
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import ledger
from oncepay.payments.models import payment_public
from oncepay.payments.records import PaymentRow
from oncepay.payments.storage.schema import ledger_entries, payments
from oncepay.payments.webhooks.outbox import fan_out
from oncepay.reconciliation import bulk
from oncepay.reconciliation.fees import FeeSchedule
from oncepay.reconciliation.matcher import remediation_of
from oncepay.reconciliation.records import Discrepancy, Kind, Operation, ReportLine
from oncepay.reconciliation.store import settlements
from oncepay.storage.db import Database, read, write, write_on

__all__ = [
    "ACQUIRER_FEES",
    "BATCH",
    "SETTLED_FUNDS",
    "check_payouts",
    "entries",
    "post_batch",
    "post_settlements",
    "without_settled",
]

SETTLED_FUNDS = ledger.SETTLED_FUNDS  # asset: money the acquirer paid out to us
ACQUIRER_FEES = ledger.ACQUIRER_FEES  # expense: what the acquirer kept
# The accounts a settlement journal moves, as the bulk statements take them.
_ACCOUNTS = (SETTLED_FUNDS, ACQUIRER_FEES, ledger.ACQUIRER_RECEIVABLE)
# Settled lines per transaction: big enough that a statement's round trip is spread over
# thousands of rows, small enough that SQLite's one writer is never held for long (a batch
# takes tens of milliseconds) and a PostgreSQL transaction stays small.
BATCH = 5000
# Payment ids per IN (...) list (SQLite allows 32,766 bound variables).
_IDS = 5000


def batch_ids(prefix: str) -> Iterator[str]:
    """Ids for one batch's rows, shaped like :func:`~oncepay.storage.ids.new_id`'s (24 hex
    digits): 64 random bits shared by the batch, then a counter. A batch's rows then sit next
    to each other in the primary key's and the other indexes' b-trees, so a batch of 5,000
    dirties a few pages, not 5,000 random ones (the write volume that made a million-line run
    grow faster than its size); unique across batches as 64 random bits are."""
    head = batch_head(prefix)
    return (f"{head}{n:08x}" for n in itertools.count())


def batch_head(prefix: str) -> str:
    """The shared part of a batch's ids (:func:`batch_ids`): 8 hex digits of counter follow."""
    return f"{prefix}_{secrets.token_hex(8)}"


def entries(line: ReportLine) -> ledger.Entries:
    """The settlement journal of one line (zero amounts left out: a free refund has no fee
    entry)."""
    if line.type == "capture":
        found = [
            (SETTLED_FUNDS, line.amount - line.fee),
            (ACQUIRER_FEES, line.fee),
            (ledger.ACQUIRER_RECEIVABLE, -line.amount),
        ]
    else:
        found = [
            (ledger.ACQUIRER_RECEIVABLE, line.amount),
            (ACQUIRER_FEES, line.fee),
            (SETTLED_FUNDS, -(line.amount + line.fee)),
        ]
    return [(account, amount) for account, amount in found if amount]


@dataclass
class Posted:
    """What a run posted now (a re-run posts nothing), and the lines it did not post because
    an earlier run settled their reference differently (another payout or time): the money
    paid out twice, one ``duplicate_settlement`` each (:func:`settled_twice`)."""

    lines: int = 0
    payments: int = 0
    twice: list[Discrepancy] = field(default_factory=list)


async def post_settlements(
    db: Database,
    acquirer: str,
    settled: Sequence[tuple[ReportLine, Operation]],
    *,
    now: float,
    posted: Posted | None = None,
) -> Posted:
    """Post each settled pair once, a batch per transaction; ``posted`` adds up across calls
    (the pipeline calls this every :data:`BATCH` pairs as the report streams through)."""
    posted = Posted() if posted is None else posted
    for start in range(0, len(settled), BATCH):
        batch = settled[start : start + BATCH]
        if db.is_sqlite and all(op.merchant_id for _, op in batch):
            await _post_staged_ahead(db, acquirer, batch, now, posted)
            continue
        async with write(db) as conn:
            await post_batch(conn, db, acquirer, batch, now, posted)
    return posted


async def _post_staged_ahead(
    db: Database,
    acquirer: str,
    batch: Sequence[tuple[ReportLine, Operation]],
    now: float,
    posted: Posted,
) -> None:
    """SQLite, the payments' merchants known (read with the books): the batch is staged on a
    connection of its own before the write lock is asked for, so that it is staged while the
    batch before it writes (the pipeline has two batches in flight), and the write lock is
    held only for SQLite's own work."""
    rows = _staged(batch, None, now, batch_head("txn"))
    if not rows:
        return
    async with db.engine.connect() as conn:
        await bulk.stage_sqlite(conn, rows)
        async with write_on(db, conn):
            lines, payments_settled, reach = await _settle_sqlite(conn, None, acquirer, now)
            await _fan_out(conn, reach, now)
            if lines < len(rows):
                posted.twice += await _settled_before(conn, db, batch, rows)
    posted.lines += lines
    posted.payments += payments_settled


async def _settle_sqlite(
    conn: AsyncConnection, rows: list[tuple[Any, ...]] | None, acquirer: str, now: float
) -> tuple[int, int, list[tuple[str, str, str]]]:
    return await bulk.settle_sqlite(
        conn,
        rows,
        acquirer=acquirer,
        now=now,
        event_head=batch_head("evt"),
        accounts=_ACCOUNTS,
        snapshot=_SNAPSHOT,
        rewrite=_event_json,
    )


async def without_settled(
    db: Database, batch: Sequence[tuple[ReportLine, Operation]]
) -> tuple[list[tuple[ReportLine, Operation]], list[Discrepancy]]:
    """``batch`` less the pairs whose reference is settled already, read in a read-only
    transaction: a re-run then stages and writes nothing for them (the batch's own
    transaction still checks every guard it writes, so a run settling them meanwhile is
    harmless). With them, the ``duplicate_settlement`` of each pair whose reference an
    earlier run settled differently (:func:`settled_twice`), as posting finds it."""
    async with read(db) as conn:
        done = await bulk.settlements_of(conn, db, sorted({op.reference for _, op in batch}))
    if not done:
        return list(batch), []
    kept: list[tuple[ReportLine, Operation]] = []
    twice: list[Discrepancy] = []
    for line, op in batch:
        guard = done.get(op.reference)
        if guard is None:
            kept.append((line, op))
        elif not _same_settlement(line, guard):
            twice.append(settled_twice(line, op, guard))
    return kept, twice


def settled_twice(line: ReportLine, op: Operation, guard: Sequence[Any]) -> Discrepancy:
    """The ``duplicate_settlement`` of ``line``, whose operation an earlier run settled as
    ``guard`` (:data:`.bulk.GUARD`: type, amount, payout, time, journal) in another payout or
    at another time: the line and the settlement before are its evidence."""
    kind, amount, payout, settled_at, journal = guard
    named = "" if op.reference == line.reference else f" (as {op.reference})"
    detail = (
        f"line {line.line}: {line.type} {line.amount} {line.currency}; settled twice: "
        f"payout {line.payout_id} at {line.settled_at}{named}, settled before in payout "
        f"{payout} at {settled_at} ({kind} {amount}, journal {journal})"
    )
    return Discrepancy(
        Kind.DUPLICATE_SETTLEMENT,
        line.reference,
        op.payment_id,
        detail,
        remediation_of(Kind.DUPLICATE_SETTLEMENT),
    )


def _same_settlement(line: ReportLine, guard: Sequence[Any]) -> bool:
    """``line`` is the settlement ``guard`` keeps, read again (a re-run of its report, or the
    same day read from another source): the same type, amount and payout, settled at the same
    second however the time is written (``Z`` or ``+00:00``, with or without its fraction:
    Stripe's and Adyen's reports give whole seconds, the simulator's milliseconds)."""
    if tuple(guard[:3]) != (line.type, line.amount, line.payout_id):
        return False
    if guard[3] == line.settled_at:
        return True
    before, now = _parsed_time(guard[3]), _parsed_time(line.settled_at)
    return before is not None and now is not None and int(before) == int(now)


async def _settled_before(
    conn: AsyncConnection,
    db: Database,
    batch: Sequence[tuple[ReportLine, Operation]],
    rows: Sequence[Sequence[Any]],
) -> list[Discrepancy]:
    """After a batch posted fewer lines than it staged (``rows``): the staged lines whose
    guard another transaction wrote (its journal is not the row's), read in the batch's
    transaction; the ``duplicate_settlement`` of each that guard settled differently. A first
    run never comes here: nothing is read when every staged line posted."""
    journal = bulk.SETTLING.index("transaction_id")
    staged = {row[0]: row[journal] for row in rows}
    guards = await bulk.settlements_of(conn, db, sorted(staged))
    twice = []
    for line, op in batch:
        mine = staged.pop(op.reference, None)  # the first line of a reference was staged
        guard = guards.get(op.reference)
        if mine is None or guard is None or guard[-1] == mine:
            continue  # not staged (its payment unknown), or posted now
        if not _same_settlement(line, guard):
            twice.append(settled_twice(line, op, guard))
    return twice


async def post_batch(
    conn: AsyncConnection,
    db: Database,
    acquirer: str,
    batch: Sequence[tuple[ReportLine, Operation]],
    now: float,
    posted: Posted,
) -> None:
    """One transaction's worth: guards, journals, payments' settlement columns, events."""
    if all(op.merchant_id for _, op in batch):  # read with the books: no query
        owners = {op.payment_id: op.merchant_id for _, op in batch}
    else:
        owners = await _owners(conn, {op.payment_id for _, op in batch})
    txn_head = batch_head("txn")
    rows = _staged(batch, owners, now, txn_head)
    if db.is_sqlite:
        lines, payments_settled, reach = await _settle_sqlite(conn, rows, acquirer, now)
        await _fan_out(conn, reach, now)
    else:
        lines, found = await bulk.settle_postgres(
            conn,
            rows,
            acquirer=acquirer,
            now=now,
            txn_head=txn_head,
            accounts=_ACCOUNTS,
            returning=_SNAPSHOT,
        )
        changed = [cast(PaymentRow, _Snapshot(*row)) for row in found]
        await _settled_events(conn, db, changed, now)
        payments_settled = len(changed)
    if lines < len(rows):
        posted.twice += await _settled_before(conn, db, batch, rows)
    posted.lines += lines
    posted.payments += payments_settled


def _staged(
    batch: Sequence[tuple[ReportLine, Operation]],
    owners: dict[str, str] | None,
    now: float,
    txn_head: str,
) -> list[tuple[Any, ...]]:
    """The batch's lines as :data:`.bulk.SETTLING` rows: those of payments that exist, each
    reference once (the first line that names it), each with its journal's id (``txn_head``
    and the row's place). ``owners``: payment id -> merchant id; ``None``: each operation's own
    (read with the books, every one set)."""
    rows: list[tuple[Any, ...]] = []
    add = rows.append
    seen: set[str] = set()
    times: dict[str, float] = {}  # a report repeats its few settlement times
    for line, op in batch:
        reference = op.reference
        if reference in seen:
            continue
        merchant = op.merchant_id if owners is None else owners.get(op.payment_id)
        if merchant is None:
            continue
        seen.add(reference)
        settled_at = line.settled_at
        at = times.get(settled_at)
        if at is None:
            at = times[settled_at] = _posix(settled_at, now)
        add(
            (
                reference,
                op.payment_id,
                merchant,
                reference if op.type == "refund" else None,
                line.type,
                line.currency,
                line.payout_id,
                line.amount,
                line.fee,
                line.net,
                settled_at,
                at,
                f"{txn_head}{len(rows):08x}",  # from 00000000, in the rows' order
            )
        )
    return rows


def _event_json(row: tuple[Any, ...]) -> str:
    return _dumps(payment_public(cast(PaymentRow, _Snapshot(*row))))


_dumps = json.JSONEncoder(separators=(",", ":")).encode


async def _fan_out(conn: AsyncConnection, events: Iterable[Sequence[Any]], now: float) -> None:
    """The webhook deliveries of ``payment.settled`` events (event id, merchant id): the
    merchant's endpoints are asked once per merchant and transaction."""
    unsubscribed: set[str] = set()
    for event_id, merchant, *_ in events:
        if merchant not in unsubscribed:
            reached = await fan_out(
                conn, merchant_id=merchant, event_id=event_id, event_type="payment.settled", now=now
            )
            if not reached:
                unsubscribed.add(merchant)


async def _owners(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str]:
    """payment id -> merchant id, for the payments that exist."""
    wanted, found = sorted(ids), dict[str, str]()
    for start in range(0, len(wanted), _IDS):
        query = select(payments.c.id, payments.c.merchant_id).where(
            payments.c.id.in_(wanted[start : start + _IDS])
        )
        found.update((pid, merchant) for pid, merchant in (await conn.execute(query)).all())
    return found


_EVENT = ("id", "merchant_id", "type", "object_id", "data", "created_at")

# The columns of a payment its ``payment.settled`` event shows (``payment_public``), read back
# by the update that adds the settled money (no second look-up of the rows).
_Snapshot = namedtuple(
    "_Snapshot",
    [
        "id",
        "merchant_id",
        "amount",
        "currency",
        "status",
        "capture_method",
        "payment_method",
        "description",
        "metadata",
        "amount_captured",
        "amount_refunded",
        "failure_code",
        "failure_message",
        "outcome_unknown",
        "acquirer",
        "created_at",
        "amount_settled",
        "amount_refund_settled",
        "settlement_fee",
        "settled_at",
    ],
)
_SNAPSHOT: tuple[str, ...] = _Snapshot._fields


def _posix(settled_at: str, default: float) -> float:
    found = _parsed_time(settled_at)
    return default if found is None else found  # an unreadable time is kept as written


@lru_cache(maxsize=4096)  # a report repeats its few settlement times a million times
def _parsed_time(settled_at: str) -> float | None:
    """``settled_at`` as a Unix time; a time written without an offset is UTC (never the
    machine's local time zone)."""
    try:
        parsed = datetime.fromisoformat(settled_at)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


async def _settled_events(
    conn: AsyncConnection, db: Database, changed: Sequence[PaymentRow], now: float
) -> None:
    """A ``payment.settled`` event per payment, and their webhook deliveries (the outbox):
    the merchant's endpoints are asked once per merchant and transaction."""
    event_ids = batch_ids("evt")
    rows = [
        (
            next(event_ids),
            row.merchant_id,
            "payment.settled",
            row.id,
            _dumps(payment_public(row)),
            now,
        )
        for row in changed
    ]
    await bulk.insert(conn, db, "events", _EVENT, rows)
    await _fan_out(conn, rows, now)


async def check_payouts(conn: AsyncConnection) -> list[ledger.Violation]:
    """Each settled line's net is its amount less (or, for a refund, plus) its fee, and each
    payout's lines moved exactly the payout's net into settled funds."""
    found = []
    lines = select(
        settlements.c.reference,
        settlements.c.type,
        settlements.c.amount,
        settlements.c.fee,
        settlements.c.net,
    )
    for reference, kind, amount, fee, net in await conn.execute(lines):
        if net != FeeSchedule.net(kind, amount, fee):
            found.append(
                ledger.Violation(reference, f"net {net} is not {kind} {amount} less {fee}")
            )
    nets = dict(
        (
            await conn.execute(
                select(settlements.c.payout_id, func.sum(settlements.c.net)).group_by(
                    settlements.c.payout_id
                )
            )
        ).all()
    )
    moved = select(settlements.c.payout_id, func.sum(ledger_entries.c.amount)).join(
        ledger_entries, ledger_entries.c.transaction_id == settlements.c.transaction_id
    )
    moved = moved.where(ledger_entries.c.account == SETTLED_FUNDS).group_by(settlements.c.payout_id)
    posted = dict((await conn.execute(moved)).all())
    for payout, net in sorted(nets.items()):
        if int(posted.get(payout) or 0) != int(net):
            detail = f"lines sum to net {net}, settled_funds moved {posted.get(payout) or 0}"
            found.append(ledger.Violation(payout, detail))
    return found
