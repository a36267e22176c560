"""A new payment's two phases at once (SPEC §5; issue 18): on PostgreSQL one statement each,
on SQLite one raw transaction each.

The usual way (:mod:`oncepay.payments.phases`) runs a phase as a SQLAlchemy transaction of
several statements: on PostgreSQL ``BEGIN``, the key's claim, the payment, the recovery point,
``COMMIT`` before the acquirer call, and ``BEGIN``, the fence, the payment locked, the
completion, ``COMMIT`` after it (10 round trips, each ~0.1 ms of the API's CPU on this
machine); on SQLite the same statements without the round trips, but through SQLAlchemy's
transaction machinery (begin, commit, greenlet hops: bench/e2e/PROFILE.md). For the commonest
request — a new key creating a payment whose acquirer answers at once — each phase here is

* on **PostgreSQL** one statement of data-modifying ``WITH`` queries, sent outside any
  transaction (:meth:`~oncepay.storage.db.Database.once`): the server runs it whole or not at
  all, so it is its own transaction, committed with no ``BEGIN``/``COMMIT`` round trips (2
  round trips a payment);
* on **SQLite** one transaction on the writer's own ``sqlite3`` connection
  (:func:`~oncepay.storage.db.write_raw`: the same writer lock, ``BEGIN IMMEDIATE`` and group
  commit as every write, without SQLAlchemy around it), four statements before the call and
  seven after.

Both write exactly the rows the usual way writes, and leave the idempotency record exactly as
it does, so a crash at any point resumes as before:

* **Phase 1** inserts the key's executing record already at ``payment_created:create:<id>``
  (the usual way inserts it, then moves it there, in one transaction: the same committed
  state), the payment, its ``payment.created`` event and that event's deliveries. A key that
  has a record inserts nothing at all (PostgreSQL: every part reads from the claim's
  ``RETURNING``; SQLite: the claim's row count decides), and the gate decides as always.
* **Phase 2** first checks the record at this request's fence and the payment *as phase 1
  left it* (``updated_at`` unchanged, still processing) — on PostgreSQL by locking both
  ``SKIP LOCKED``, on SQLite under its write lock — and only then moves the payment,
  completes the record (at ``finished``, with the stored response), posts both
  journals and writes the events and their deliveries. When a check fails — the lease lost
  to a takeover, the payment moved on (a failover to another acquirer, say) or, on
  PostgreSQL, held by another transaction — nothing is written and the usual phase 2 runs
  instead, which decides as it always has.

Webhook deliveries are fanned out by the statement itself (an ``INSERT … SELECT`` over the
merchant's enabled endpoints subscribed to the event's type), in the statement's snapshot, so
an endpoint committed before it gets the event and one committed after does not, as with the
usual transaction. On PostgreSQL phase 2 takes its own locks ``SKIP LOCKED``; the one wait
left is a new delivery's foreign-key check on an endpoint row that the endpoint's own update
holds at that moment, after the endpoints were read — as in the usual transaction, and the
delivery worker cancels a delivery to an endpoint disabled meanwhile. Phase 1's claim can wait
for one thing only: a concurrent first
request with the same key whose phase 1 has not committed yet. When that one commits, nothing is
inserted (the gate answers); when it rolls back, this claim inserts, and an endpoint created
during that wait (milliseconds) does not get this payment's ``payment.created`` (the usual
transaction would read the endpoints after the wait). Left so: it takes a crashed or failed
first attempt, a retry racing it with the same key and an endpoint created in between.
Delivery ids come from the database (an MD5 of ``gen_random_uuid()``'s 122 random bits on
PostgreSQL 13+, ``randomblob()`` on SQLite), shaped as every id (``whd_`` and 24 hex digits).

On PostgreSQL a statement sent is the server's to finish: if the process dies while its phase 1
waits (above), the server may still commit it afterwards. That is the "committed, its answer
lost" case every phase already has: the key stays locked and resumes once its lease lapses
(tests/payments/test_one_statement_review_processes.py kills a server at that point).

Not taken (the usual way runs): a Redis tier in front of the store, tracing on (its spans come
from the usual code), every other outcome of the call (unknown, or after a failover) and every
other operation.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple

from oncepay._jsontext import encoder
from oncepay.http.gate import Claimable
from oncepay.idempotency.engine import Ticket
from oncepay.idempotency.records import StoredResponse, next_fence
from oncepay.idempotency.stores.postgres import NOTIFY_WAITERS, PostgresStore, _Names
from oncepay.idempotency.stores.sqlite import SQLiteStore
from oncepay.payments import ledger, tracing
from oncepay.payments.acquirers.base import AcquirerAnswer, Outcome
from oncepay.payments.context import Services
from oncepay.payments.models import PaymentCreate
from oncepay.payments.operations.common import PAYMENTS, RESOLVED, payment_json, payment_reply
from oncepay.payments.records import PaymentRow
from oncepay.payments.reply import Reply
from oncepay.payments.states import PaymentStatus, Transition, next_status
from oncepay.payments.storage.idempotency import OneWriter
from oncepay.payments.storage.schema import payments
from oncepay.storage.db import write_raw
from oncepay.storage.ids import new_id

__all__ = ["claim_and_start", "failure_message", "record", "usable"]

S, T = PaymentStatus, Transition

# The payment's columns phase 1 sets; the rest take their defaults (as create.py's insert).
_COLUMNS = (
    "id, merchant_id, amount, currency, payment_method, capture_method, description, metadata, "
    "status, amount_captured, amount_refunded, acquirer, attempt, outcome_unknown, "
    "recovery_attempts, escalated, created_at, updated_at"
)

# One delivery per enabled endpoint of the merchant subscribed to the event's type (outbox.py's
# fan_out, as SQL); ``{events}`` is a CTE returning the events' (id, type).
_FAN_OUT = (
    "INSERT INTO webhook_deliveries (id, merchant_id, event_id, endpoint_id, status, attempts, "
    "next_attempt_at, created_at, updated_at) "
    "SELECT 'whd_' || left(md5(gen_random_uuid()::text), 24), w.merchant_id, "
    "v.id, w.id, 'pending', 0, {now}, {now}, {now} "
    "FROM {events} AS v JOIN webhook_endpoints AS w ON w.merchant_id = {merchant} "
    "AND NOT w.disabled AND NOT w.deleted "
    "AND (w.events::jsonb ? v.type OR w.events::jsonb ? '*') ORDER BY v.seq, w.seq"
)

_PHASE_ONE = (
    # $1 scope, $2 key, $3 fingerprint, $4 fence, $5 now, $6 lease until, $7 expires at,
    # $8 recovery point; $9 payment id, $10 merchant, $11 amount, $12 currency, $13 method,
    # $14 capture method, $15 description, $16 metadata, $17 status, $18 acquirer;
    # $19 event id, $20 event data, $21 the rows' time (the record's is the engine's clock)
    "WITH k AS (INSERT INTO {idem} (scope, idempotency_key, fingerprint, state, fence, "
    "created_at, lease_expires_at, expires_at, recovery_point) "
    "VALUES ($1, $2, $3, 'executing', $4, $5, $6, $7, $8) "
    "ON CONFLICT (scope, idempotency_key) DO NOTHING RETURNING fence), "
    f"p AS (INSERT INTO payments ({_COLUMNS}) "
    "SELECT $9, $10, $11, $12, $13, $14, $15, $16, $17, 0, 0, $18, 1, FALSE, 0, FALSE, $21, $21 "
    "FROM k RETURNING {payment}), "
    "e AS (INSERT INTO events (id, merchant_id, type, object_id, data, created_at) "
    "SELECT $19, $10, 'payment.created', $9, $20, $21 FROM k RETURNING seq, id, type), "
    "d AS (" + _FAN_OUT.format(now="$21", events="e", merchant="$10") + ") "
    "SELECT {payment} FROM p"
)

_PHASE_TWO = (
    # $1 scope, $2 key, $3 fence, $4 payment id, $5 its updated_at after phase 1, $6 now,
    # $7 recovery point, $8 lease until, $9 status, $10 headers, $11 body; the payment's
    # $12 status, $13 acquirer, $14 authorization id, $15 amount captured, $16 failure code,
    # $17 failure message; $18 merchant, $19 currency; journals $20 ids, $21 kinds; entries
    # $22 journal ids, $23 accounts, $24 amounts; events $25 ids, $26 types, $27 data
    "WITH k AS (SELECT 1 FROM {idem} WHERE scope = $1 AND idempotency_key = $2 AND fence = $3 "
    "AND state = 'executing' FOR UPDATE SKIP LOCKED), "
    # The payment locked by its id alone, then checked: with ``status`` in the locking scan's
    # condition the planner took the dashboard's (status, seq) index at an equal estimate and
    # walked every processing entry, dead ones too, on each payment. The locked row is the
    # latest version (READ COMMITTED), as the condition would have seen.
    "l AS (SELECT updated_at, status FROM payments WHERE id = $4 FOR UPDATE SKIP LOCKED), "
    "p AS (UPDATE payments SET status = $12, acquirer = $13, authorization_id = $14, "
    "amount_captured = $15, failure_code = $16, failure_message = $17, "
    "outcome_unknown = FALSE, recovery_attempts = 0, escalated = FALSE, "
    "pending_operation = NULL, updated_at = $6 "
    "WHERE id = $4 AND EXISTS (SELECT 1 FROM k) "
    "AND EXISTS (SELECT 1 FROM l WHERE updated_at = $5 AND status = 'processing') RETURNING 1), "
    "done AS (UPDATE {idem} SET state = 'completed', recovery_point = $7, "
    "lease_expires_at = $8, response_status = $9, response_headers = $10, "
    "response_body = $11 WHERE scope = $1 AND idempotency_key = $2 AND fence = $3 "
    "AND state = 'executing' AND EXISTS (SELECT 1 FROM p) "
    "RETURNING scope, idempotency_key, waited), "
    "t AS (INSERT INTO ledger_transactions (id, merchant_id, payment_id, kind, created_at) "
    "SELECT x.i, $18, $4, x.kind, $6 FROM done, unnest($20::text[], $21::text[]) "
    "WITH ORDINALITY AS x(i, kind, n) ORDER BY x.n), "
    "n AS (INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, "
    "currency, amount) SELECT y.t, $18, $4, y.a, $19, y.v FROM done, "
    "unnest($22::text[], $23::text[], $24::bigint[]) WITH ORDINALITY AS y(t, a, v, n) "
    "ORDER BY y.n), "
    "e AS (INSERT INTO events (id, merchant_id, type, object_id, data, created_at) "
    "SELECT z.i, $18, z.ty, $4, z.d, $6 FROM done, "
    "unnest($25::text[], $26::text[], $27::text[]) WITH ORDINALITY AS z(i, ty, d, n) "
    "ORDER BY z.n RETURNING seq, id, type), "
    "d AS ("
    + _FAN_OUT.format(now="$6", events="e", merchant="$18")
    + ") "
    + NOTIFY_WAITERS  # the store's notification, for a record a waiter marked
)

# json.dumps(metadata) as the usual way writes it (its default separators), built once.
_metadata_text = encoder(separators=(", ", ": "))

_FAILURES = {
    "card_declined": "The card was declined.",
    "insufficient_funds": "The card has insufficient funds.",
    "acquirer_unavailable": "No acquirer could take the payment; no money moved.",
}


def failure_message(code: str | None) -> str:
    """What a failed payment says of its failure code."""
    return _FAILURES.get(code or "", "The payment failed.")


async def claim_and_start(
    svc: Services, claimable: Claimable, merchant_id: str, params: PaymentCreate
) -> tuple[Ticket, PaymentRow] | None:
    """The key's claim and phase 1, one statement (the caller checked :func:`usable`); None,
    with nothing written, when the key has a record."""
    engine = svc.engine
    now, clock = time.time(), engine.clock()
    ttl = engine.ttl if claimable.ttl is None else claimable.ttl
    fence = next_fence(None, clock)
    payment_id = new_id("pay")
    point = f"payment_created:create:{payment_id}"
    metadata = _metadata_text(params.metadata)
    acquirer = svc.acquirers.choose().name
    # The row as the insert makes it (its seq aside), for the event's data: the same document
    # the usual way makes from the row its insert returns.
    draft = _draft(payment_id, merchant_id, params, metadata, acquirer, now)
    event_id, data = new_id("evt"), payment_json(draft)
    whose = (claimable.tenant, claimable.key, claimable.fingerprint)
    claim = (*whose, fence, clock, clock + engine.lease, clock + ttl, point)
    payment = (payment_id, merchant_id, params.amount, params.currency, params.payment_method,
               params.capture_method, params.description, metadata, S.PROCESSING.value,
               acquirer)  # fmt: skip
    if svc.db.is_sqlite:
        made = await _start_sqlite(svc, claim, payment, event_id, data, now)
        if made is None:
            return None
        row: PaymentRow = PAYMENTS.one(made, integers_as_booleans=True)
    else:
        # $1-$8 the claim, $9-$18 the payment, $19 the event's id, $20 its data, $21 the time
        found = await svc.db.once(_statements(svc)[0], *claim, *payment, event_id, data, now)
        if not found:
            return None
        row = PAYMENTS.make(*found[0])
    ticket = Ticket(*whose, fence, clock + ttl, recovery_point=point)
    return ticket, row


async def _start_sqlite(
    svc: Services,
    claim: tuple[Any, ...],
    payment: tuple[Any, ...],
    event_id: str,
    data: str,
    now: float,
) -> Any | None:
    """Phase 1 on SQLite: one transaction of four statements on the writer's own connection;
    the new payment row, or None (nothing written) when the key has a record."""
    sql = _sqlite_statements(svc)
    async with write_raw(svc.db) as conn:
        if not conn.execute(sql.claim, claim).rowcount:
            return None  # an empty transaction commits
        row = conn.execute(sql.payment, (*payment, now)).fetchone()
        merchant_id = payment[1]
        conn.execute(sql.event, (event_id, merchant_id, "payment.created", payment[0], data, now))
        conn.execute(sql.fan_out, (event_id, now, merchant_id, "payment.created"))
        return row


async def record(
    svc: Services, ticket: Ticket, row: PaymentRow, answer: AcquirerAnswer
) -> Reply | None:
    """Phase 2 of an approval or a decline of the payment ``row`` as phase 1 of this request
    left it: the reply, stored under the key; None, with nothing written, when the record or
    the payment is no longer as phase 1 left them (the caller runs the usual phase 2)."""
    assert answer.outcome is not Outcome.UNKNOWN
    now, before = time.time(), row.updated_at
    journals: list[tuple[str, str]] = []
    entries: list[tuple[str, str, int]] = []
    events: list[tuple[str, str, str]] = []
    if answer.outcome is Outcome.APPROVED:
        row = _moved(
            row,
            T.AUTHORIZE,
            now,
            acquirer=answer.acquirer,
            authorization_id=answer.authorization_id,
        )
        _post(journals, entries, "authorization", ledger.authorize(row.amount))
        events.append((new_id("evt"), "payment.authorized", payment_json(row)))
        if row.capture_method == "automatic":
            _post(journals, entries, "capture", ledger.capture(row.amount, row.amount))
            row = _moved(row, T.CAPTURE, now, amount_captured=row.amount, pending_operation=None)
            events.append((new_id("evt"), "payment.captured", payment_json(row)))
    else:
        code = answer.decline_code or "acquirer_unavailable"
        message = failure_message(code)
        row = _moved(
            row, T.FAIL, now, failure_code=code, failure_message=message, acquirer=answer.acquirer
        )
        events.append((new_id("evt"), "payment.failed", payment_json(row)))
    reply = payment_reply(201, row)
    stored = tracing.stored(reply)
    lease_until = svc.engine.clock() + svc.engine.lease  # the lease on the engine's clock
    called = f"finished:create:{row.id}"
    if svc.db.is_sqlite:
        done = await _finish_sqlite(svc, ticket, row, before, now, called, lease_until, stored,
                                    journals, entries, events)  # fmt: skip
        return reply if done else None
    found = await svc.db.once(
        _statements(svc)[1],
        ticket.scope,
        ticket.key,
        ticket.fence,
        row.id,
        before,
        now,
        called,
        lease_until,
        stored.status,
        stored.headers_json(),
        stored.body,
        row.status,
        row.acquirer,
        row.authorization_id,
        row.amount_captured,
        row.failure_code,
        row.failure_message,
        row.merchant_id,
        row.currency,
        [journal for journal, _ in journals],
        [kind for _, kind in journals],
        [journal for journal, _, _ in entries],
        [account for _, account, _ in entries],
        [amount for _, _, amount in entries],
        [event for event, _, _ in events],
        [kind for _, kind, _ in events],
        [data for _, _, data in events],
    )
    return reply if found else None


async def _finish_sqlite(svc: Services, ticket: Ticket, row: PaymentRow, before: float,
                         now: float, called: str, lease_until: float, stored: StoredResponse,
                         journals: list[tuple[str, str]], entries: list[tuple[str, str, int]],
                         events: list[tuple[str, str, str]]) -> bool:  # fmt: skip
    """Phase 2 on SQLite: one transaction on the writer's own connection (SQLite's write
    lock excludes every other writer, so the checks hold to its end); False, nothing written,
    when the record or the payment is no longer as phase 1 left them."""
    sql = _sqlite_statements(svc)
    key = (ticket.scope, ticket.key, ticket.fence)
    merchant_id = row.merchant_id
    async with write_raw(svc.db) as conn:
        held, same = conn.execute(sql.check, (*key, row.id, before)).fetchone()
        if not (held and same):
            return False
        conn.execute(sql.settle, (row.status, row.acquirer, row.authorization_id,
                                  row.amount_captured, row.failure_code, row.failure_message,
                                  now, row.id))  # fmt: skip
        headers = stored.headers_json()
        completion = (called, lease_until, stored.status, headers, stored.body, *key)
        if not conn.execute(sql.complete, completion).rowcount:
            raise AssertionError("the record held by this transaction was not completed")
        conn.executemany(
            sql.journal, [(journal, merchant_id, row.id, kind, now) for journal, kind in journals]
        )
        conn.executemany(
            sql.entry,
            [(journal, merchant_id, row.id, account, row.currency, amount)
             for journal, account, amount in entries],
        )  # fmt: skip
        conn.executemany(
            sql.event,
            [(event, merchant_id, kind, row.id, data, now) for event, kind, data in events],
        )
        conn.executemany(
            sql.fan_out, [(event, now, merchant_id, kind) for event, kind, _ in events]
        )
    return True


def usable(svc: Services, ttl: float | None = None) -> bool:
    """Whether this process takes the statements: PostgreSQL, the store a table in the same
    database (no Redis tier), tracing off; for a claim with the TTL ``ttl`` (None: the
    engine's), a lease shorter than it too (the usual claim refuses any other)."""
    engine, store = svc.engine, svc.engine.store
    if tracing.ENABLED:
        return False
    if svc.db.is_sqlite:
        if type(store) is not OneWriter or type(store.store) is not SQLiteStore:
            return False
    elif type(store) is not PostgresStore:
        return False
    return 0 < engine.lease < (engine.ttl if ttl is None else ttl)


class _Lite(NamedTuple):
    """The SQLite statements, for one idempotency table."""

    claim: str
    payment: str
    event: str
    fan_out: str
    check: str
    settle: str
    complete: str
    journal: str
    entry: str


def _sqlite_statements(svc: Services) -> _Lite:
    store = svc.engine.store
    assert isinstance(store, OneWriter)
    assert isinstance(store.store, SQLiteStore)
    return _made_sqlite(store.store.table)


@functools.cache
def _made_sqlite(table: str) -> _Lite:
    idem = f'"{table}"'
    key = "scope = ? AND idempotency_key = ? AND fence = ? AND state = 'executing'"
    return _Lite(
        claim=f"INSERT INTO {idem} (scope, idempotency_key, fingerprint, state, fence, "
        "created_at, lease_expires_at, expires_at, recovery_point) "
        "VALUES (?, ?, ?, 'executing', ?, ?, ?, ?, ?) "
        "ON CONFLICT (scope, idempotency_key) DO NOTHING",
        payment=f"INSERT INTO payments ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, "
        "?, 1, 0, 0, 0, ?11, ?11) RETURNING "
        + ", ".join(column.name for column in payments.columns),
        event="INSERT INTO events (id, merchant_id, type, object_id, data, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        # ?1 event id, ?2 now, ?3 merchant, ?4 event type
        fan_out="INSERT INTO webhook_deliveries (id, merchant_id, event_id, endpoint_id, status, "
        "attempts, next_attempt_at, created_at, updated_at) "
        "SELECT 'whd_' || lower(hex(randomblob(12))), w.merchant_id, ?1, w.id, 'pending', 0, "
        "?2, ?2, ?2 FROM webhook_endpoints AS w WHERE w.merchant_id = ?3 "
        "AND NOT w.disabled AND NOT w.deleted "
        "AND EXISTS (SELECT 1 FROM json_each(w.events) WHERE value IN (?4, '*')) "
        "ORDER BY w.seq",
        check=f"SELECT EXISTS (SELECT 1 FROM {idem} WHERE scope = ?1 AND idempotency_key = ?2 "
        "AND fence = ?3 AND state = 'executing'), EXISTS (SELECT 1 FROM payments "
        "WHERE id = ?4 AND updated_at = ?5 AND status = 'processing')",
        settle="UPDATE payments SET status = ?, acquirer = ?, authorization_id = ?, "
        "amount_captured = ?, failure_code = ?, failure_message = ?, outcome_unknown = 0, "
        "recovery_attempts = 0, escalated = 0, pending_operation = NULL, updated_at = ? "
        "WHERE id = ?",
        complete=f"UPDATE {idem} SET state = 'completed', recovery_point = ?, "
        "lease_expires_at = ?, response_status = ?, response_headers = ?, response_body = ? "
        f"WHERE {key}",
        journal="INSERT INTO ledger_transactions (id, merchant_id, payment_id, kind, created_at) "
        "VALUES (?, ?, ?, ?, ?)",
        entry="INSERT INTO ledger_entries (transaction_id, merchant_id, payment_id, account, "
        "currency, amount) VALUES (?, ?, ?, ?, ?, ?)",
    )


def _statements(svc: Services) -> tuple[str, str]:
    store = svc.engine.store
    assert isinstance(store, PostgresStore)
    return _made(store.table)


@functools.cache
def _made(table: str) -> tuple[str, str]:
    """Both statements for the idempotency table ``table`` (as the store names it)."""
    names = _Names.derive(table)
    columns = ", ".join(column.name for column in payments.columns)
    return (
        _PHASE_ONE.format(idem=names.table, payment=columns),
        _PHASE_TWO.format(idem=names.table, channel=f"'{names.channel}'"),
    )


# Every column of a payment, None: what _draft fills in.
_BLANK: dict[str, Any] = dict.fromkeys(column.name for column in payments.columns)


def _draft(
    payment_id: str,
    merchant_id: str,
    params: PaymentCreate,
    metadata: str,
    acquirer: str,
    now: float,
) -> PaymentRow:
    values = _BLANK.copy()
    values.update(
        seq=0,
        id=payment_id,
        merchant_id=merchant_id,
        amount=params.amount,
        currency=params.currency,
        payment_method=params.payment_method,
        capture_method=params.capture_method,
        description=params.description,
        metadata=metadata,
        status=S.PROCESSING.value,
        amount_captured=0,
        amount_refunded=0,
        acquirer=acquirer,
        attempt=1,
        outcome_unknown=False,
        recovery_attempts=0,
        escalated=False,
        created_at=now,
        updated_at=now,
        amount_settled=0,
        amount_refund_settled=0,
        settlement_fee=0,
    )
    row: PaymentRow = PAYMENTS.make(**values)
    return row


def _moved(row: PaymentRow, transition: Transition, now: float, **values: Any) -> PaymentRow:
    """``row`` moved by ``transition`` with ``values``, its outcome known (common.resolve)."""
    status = next_status(S(row.status), transition)
    return row._replace(status=status.value, **values, **RESOLVED, updated_at=now)


def _post(
    journals: list[tuple[str, str]],
    entries: list[tuple[str, str, int]],
    kind: str,
    postings: ledger.Entries,
) -> None:
    """One journal transaction (ledger.post's, with its check that the entries balance)."""
    if sum(amount for _, amount in postings) != 0:
        raise ValueError(f"unbalanced journal transaction {kind}: {postings}")
    journal = new_id("txn")
    journals.append((journal, kind))
    entries.extend((journal, account, amount) for account, amount in postings)
