"""A new payment's phases at once (payments/operations/onestatement.py): one statement each
on PostgreSQL, one raw transaction each on SQLite, taken instead of the SQLAlchemy
transactions, writing what they write, and resuming from every crash point as they do;
anything unusual between the phases falls back to the transactions.

tests/payments/test_recovery.py and test_regressions.py inject faults into the transactions'
own steps (through ``usual_way``); these tests inject them into the statements."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text

from oncepay.idempotency.engine import Execute
from oncepay.idempotency.stores._sql import topic
from oncepay.idempotency.stores.base import Watch
from oncepay.idempotency.stores.postgres import PostgresStore
from oncepay.payments import phases
from oncepay.payments.operations import CreatePayment, onestatement
from oncepay.payments.recovery import recover_once
from oncepay.storage.db import Database, read, write_raw
from tests.payments.stack import Stack

BODY = {"amount": 2500, "currency": "EUR", "payment_method": "pm_card_ok"}


class Crash(BaseException):
    """The process dies here (BaseException: nothing on the way catches it)."""


async def rows(stack: Stack, sql: str, **params: Any) -> list[Any]:
    async with read(stack.db) as conn:
        return list((await conn.execute(text(sql), params)).all())


async def record_of(stack: Stack, key: str) -> Any:
    return await stack.services.engine.store.get(stack.merchant.id, key)


async def assert_exactly_once(stack: Stack, payment: dict[str, Any]) -> None:
    assert payment["status"] == "captured"
    assert await stack.count("payments") == 1
    assert await stack.approved_authorizations(payment["id"]) == 1
    assert await stack.ledger_violations() == []
    kinds = [r.type for r in await rows(stack, "SELECT type FROM events ORDER BY seq")]
    assert kinds == ["payment.created", "payment.authorized", "payment.captured"]


@contextmanager
def usual_phases_refused(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, int]]:
    """Count the transactions' phases 1 and 2 (CreatePayment.start and .record)."""
    calls = {"start": 0, "record": 0}
    for name in calls:
        original = getattr(CreatePayment, name)

        def counting(original: Any = original, name: str = name) -> Any:
            async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
                calls[name] += 1
                return await original(self, *args, **kwargs)

            return counted

        monkeypatch.setattr(CreatePayment, name, counting())
    yield calls


# -- taken, and writing what the transactions write ------------------------------------------


async def test_a_new_payment_takes_two_statements_and_no_transaction(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No phase of the transactions runs and no SQLAlchemy transaction is opened: exactly
    two statements go out on PostgreSQL, on connections outside any transaction; two raw
    transactions run on SQLite."""
    sent: list[str] = []
    if stack.db.is_sqlite:
        real_raw = write_raw

        @asynccontextmanager
        async def watched_raw(db: Database) -> AsyncIterator[Any]:
            async with real_raw(db) as conn:
                sent.append("raw transaction" if conn.in_transaction else "none")
                yield conn

        monkeypatch.setattr(onestatement, "write_raw", watched_raw)
    else:
        pool = stack.db.statements
        assert pool is not None
        real = pool.fetch

        async def watched(statement: str, *args: Any) -> Any:
            async with pool.connection() as conn:
                sent.append("transaction" if conn.is_in_transaction() else "autocommit")
            return await real(statement, *args)

        monkeypatch.setattr(pool, "fetch", watched)

    async def no_transaction(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a phase opened a transaction")

    monkeypatch.setattr(phases, "write", no_transaction)
    with usual_phases_refused(monkeypatch) as calls:
        response = await stack.post("/v1/payments", BODY, key="two")
    assert response.status_code == 201, response.text
    assert calls == {"start": 0, "record": 0}
    assert sent == 2 * ["raw transaction" if stack.db.is_sqlite else "autocommit"]
    await assert_exactly_once(stack, response.json())
    record = await record_of(stack, "two")
    assert record.state == "completed"
    assert record.recovery_point == f"finished:create:{response.json()['id']}"
    replay = await stack.post("/v1/payments", BODY, key="two")
    assert replay.content == response.content
    assert replay.headers["idempotent-replayed"] == "true"


def _same_shape(value: Any) -> Any:
    """Ids and times replaced by placeholders, so two payments' documents compare."""
    if isinstance(value, str):
        return re.sub(r"\b[a-z]{2,4}_[0-9a-f]{24}\b", "<id>", value)
    if isinstance(value, float):
        return "<time>"
    if isinstance(value, dict):
        return {k: ("<time>" if k in {"created"} else _same_shape(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_same_shape(v) for v in value]
    return value


async def _written(stack: Stack, payment_id: str, key: str) -> dict[str, Any]:
    """Everything a payment wrote, ids and times aside."""
    (payment,) = await rows(stack, "SELECT * FROM payments WHERE id = :p", p=payment_id)
    events = await rows(
        stack, "SELECT * FROM events WHERE object_id = :p ORDER BY seq", p=payment_id
    )
    deliveries = await rows(
        stack,
        "SELECT e.type, d.endpoint_id, d.status, d.attempts, d.next_attempt_at = e.created_at "
        "AS due, d.merchant_id FROM webhook_deliveries AS d JOIN events AS e ON e.id = "
        "d.event_id WHERE e.object_id = :p ORDER BY e.type, d.endpoint_id",
        p=payment_id,
    )
    journals = await rows(
        stack,
        "SELECT t.kind, t.refund_id, n.account, n.currency, n.amount FROM ledger_transactions "
        "AS t JOIN ledger_entries AS n ON n.transaction_id = t.id WHERE t.payment_id = :p "
        "ORDER BY t.seq, n.seq",
        p=payment_id,
    )
    (record,) = await rows(
        stack,
        "SELECT state, recovery_point, response_status, response_headers, response_body, "
        "lease_expires_at - created_at AS lease, expires_at - created_at AS ttl "
        "FROM oncepay_idempotency WHERE idempotency_key = :k",
        k=key,
    )
    row = payment._asdict()
    for name in ("seq", "id", "created_at", "updated_at", "authorization_id"):
        row.pop(name)
    return {
        "payment": row,
        "events": [
            (e.type, e.merchant_id, e.traceparent, _same_shape(json.loads(e.data))) for e in events
        ],
        "deliveries": [tuple(d) for d in deliveries],
        "journals": [tuple(j) for j in journals],
        "record": (
            record.state,
            _same_shape(record.recovery_point),
            record.response_status,
            record.response_headers,
            _same_shape(json.loads(bytes(record.response_body))),
            record.lease,
            record.ttl,
        ),
    }


CAPTURED = ("payment.created", "payment.authorized", "payment.captured")


@pytest.mark.parametrize(
    ("fields", "kinds"),
    [
        pytest.param({}, CAPTURED, id="captured"),
        pytest.param({"capture_method": "manual"}, CAPTURED[:2], id="authorized"),
        pytest.param(
            {"payment_method": "pm_card_declined"},
            ("payment.created", "payment.failed"),
            id="declined",
        ),
        pytest.param(
            {"description": "O'Brien; --", "metadata": {"order": "7", "ü": "\u00e9"}},
            CAPTURED,
            id="description-and-metadata",
        ),
    ],
)
async def test_the_statements_write_what_the_transactions_write(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, fields: dict[str, Any], kinds: tuple[str, ...]
) -> None:
    """The same request, once each way: the same payment row, events (data included),
    deliveries (to the endpoints subscribed to each type, not to a disabled or deleted one),
    journal entries and idempotency record, ids and times aside."""
    endpoints = {}
    for name, events in (("all", None), ("captured", ["payment.captured"]),
                         ("failed", ["payment.failed", "payment.created"]),
                         ("disabled", None), ("deleted", None)):  # fmt: skip
        body: dict[str, Any] = {"url": f"https://hooks.example/{name}"}
        if events is not None:
            body["events"] = events
        created = await stack.post("/v1/webhook_endpoints", body)
        assert created.status_code == 201, created.text
        endpoints[name] = created.json()["id"]
    await stack.post(f"/v1/webhook_endpoints/{endpoints['disabled']}", {"disabled": True})
    assert (await stack.client.delete(f"/v1/webhook_endpoints/{endpoints['deleted']}")).is_success
    body = {**BODY, **fields}
    fast = await stack.post("/v1/payments", body, key="fast")
    with monkeypatch.context() as patch:
        patch.setattr(onestatement, "usable", lambda *args, **kwargs: False)
        with usual_phases_refused(patch) as calls:
            usual = await stack.post("/v1/payments", body, key="usual")
        assert calls == {"start": 1, "record": 1}  # the transactions did run
    assert (fast.status_code, usual.status_code) == (201, 201), (fast.text, usual.text)
    assert _same_shape(fast.json()) == _same_shape(usual.json())
    written = await _written(stack, fast.json()["id"], "fast")
    assert written == await _written(stack, usual.json()["id"], "usual")
    # ... and what they write is right: the events in order, each delivered to exactly the
    # enabled endpoints subscribed to its type.
    assert tuple(kind for kind, *_ in written["events"]) == kinds
    wanted = {
        "all": set(kinds),
        "captured": {"payment.captured"} & set(kinds),
        "failed": {"payment.failed", "payment.created"} & set(kinds),
    }
    delivered = {(kind, endpoint) for kind, endpoint, *_ in written["deliveries"]}
    assert delivered == {
        (kind, endpoints[name]) for name, wanted_kinds in wanted.items() for kind in wanted_kinds
    }
    assert len(written["deliveries"]) == len(delivered)
    assert await stack.ledger_violations() == []


async def test_a_delivery_id_looks_like_every_other_id(stack: Stack) -> None:
    await stack.post("/v1/webhook_endpoints", {"url": "https://hooks.example/x"})
    await stack.post("/v1/payments", BODY, key="ids")
    ids = [r.id for r in await rows(stack, "SELECT id FROM webhook_deliveries")]
    assert len(set(ids)) == 3
    assert all(re.fullmatch(r"whd_[0-9a-f]{24}", i) for i in ids)
    for delivery_id in ids:  # ... and the API finds each by it
        found = await stack.client.get(f"/v1/webhook_deliveries/{delivery_id}")
        assert found.status_code == 200, found.text
        assert found.json()["id"] == delivery_id


# -- every crash point resumes ---------------------------------------------------------------


@contextmanager
def statement_fault(
    monkeypatch: pytest.MonkeyPatch, which: int, *, after: bool, error: BaseException | None
) -> Iterator[None]:
    """The ``which``-th statement (1: phase 1, 2: phase 2; on SQLite its raw transaction)
    raises ``error``, before it is sent or after it committed (its acknowledgement lost);
    None: the database's own "connection lost" error (:data:`LOST`)."""
    count = {"n": 0}
    real_once, real_raw = Database.once, write_raw

    async def faulty_once(db: Database, *args: Any) -> Any:
        count["n"] += 1
        if count["n"] != which:
            return await real_once(db, *args)
        if after:
            await real_once(db, *args)
        raise error or LOST["postgresql"]

    @asynccontextmanager
    async def faulty_raw(db: Database) -> AsyncIterator[Any]:
        count["n"] += 1
        if count["n"] != which:
            async with real_raw(db) as conn:
                yield conn
            return
        if not after:
            raise error or LOST["sqlite"]
        async with real_raw(db) as conn:
            yield conn
        raise error or LOST["sqlite"]

    with monkeypatch.context() as patch:
        patch.setattr(Database, "once", faulty_once)
        patch.setattr(onestatement, "write_raw", faulty_raw)
        yield


LOST: dict[str, Exception] = {
    "postgresql": asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
    "sqlite": sqlite3.OperationalError("disk I/O error"),
}


async def test_a_crash_before_phase_1s_statement_leaves_nothing(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with statement_fault(monkeypatch, 1, after=False, error=Crash()), pytest.raises(Crash):
        await stack.post("/v1/payments", BODY, key="k")
    assert await record_of(stack, "k") is None
    assert (await stack.count("payments"), await stack.count("events")) == (0, 0)
    response = await stack.post("/v1/payments", BODY, key="k")
    assert response.status_code == 201, response.text
    await assert_exactly_once(stack, response.json())


@pytest.mark.parametrize("after", [False, True], ids=["failed", "committed-answer-lost"])
async def test_phase_1s_statement_failing_keeps_the_key_and_resumes(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, after: bool
) -> None:
    """The statement failed, or committed with its acknowledgement lost: either way a 503,
    nothing released (if it committed, a release would let a retry make a second payment);
    once the lease lapses the retry starts afresh or resumes, into one payment."""
    with statement_fault(monkeypatch, 1, after=after, error=None):
        lost = await stack.post("/v1/payments", BODY, key="k")
    assert (lost.status_code, lost.json()["code"]) == (503, "database_unavailable")
    assert stack.sent() == 0  # no acquirer call after a phase 1 whose outcome is unknown
    record = await record_of(stack, "k")
    if after:
        assert record.state == "executing"
        assert record.recovery_point.startswith("payment_created:create:pay_")
        assert (await stack.post("/v1/payments", BODY, key="k")).status_code == 409
    else:
        assert record is None
    stack.expire_leases()
    retry = await stack.post("/v1/payments", BODY, key="k")
    assert retry.status_code == 201, retry.text
    await assert_exactly_once(stack, retry.json())  # one authorization, however often asked


@pytest.mark.parametrize("way", ["retry", "worker"])
@pytest.mark.parametrize(
    ("which", "after", "error"),
    [
        pytest.param(2, False, Crash(), id="crash-after-the-answer"),
        pytest.param(2, False, None, id="phase-2-failed"),
    ],
)
async def test_a_failure_before_phase_2_commits_resumes_from_payment_created(
    stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
    which: int,
    after: bool,
    error: BaseException | None,
    way: str,
) -> None:
    with statement_fault(monkeypatch, which, after=after, error=error):
        if isinstance(error, Crash):
            with pytest.raises(Crash):
                await stack.post("/v1/payments", BODY, key="k")
        else:
            lost = await stack.post("/v1/payments", BODY, key="k")
            assert (lost.status_code, lost.json()["code"]) == (503, "database_unavailable")
    record = await record_of(stack, "k")
    assert record.state == "executing"
    assert record.recovery_point.startswith("payment_created:create:pay_")
    (status,) = await rows(stack, "SELECT status FROM payments")
    assert status.status == "processing"
    assert await stack.count("ledger_entries") == 0
    stack.expire_leases()
    if way == "worker":
        assert dict((await recover_once(stack.services, now=stack.clock())).results) == {
            "finished": 1
        }
    resumed = await stack.post("/v1/payments", BODY, key="k")
    assert resumed.status_code == 201, resumed.text
    await assert_exactly_once(stack, resumed.json())


async def test_phase_2_committed_with_its_answer_lost_replays_the_stored_answer(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    with statement_fault(monkeypatch, 2, after=True, error=None):
        lost = await stack.post("/v1/payments", BODY, key="k")
    assert (lost.status_code, lost.json()["code"]) == (503, "database_unavailable")
    record = await record_of(stack, "k")
    assert record.state == "completed"
    retry = await stack.post("/v1/payments", BODY, key="k")
    assert retry.status_code == 201, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.content == record.response.body
    await assert_exactly_once(stack, retry.json())
    assert stack.sent() == 1


# -- anything unusual between the phases: the transaction decides ----------------------------


async def test_a_lost_lease_writes_nothing_and_the_new_holder_finishes(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During the acquirer call the lease lapses and another holder takes the key over: the
    statement writes nothing, the transaction's fence tells the stale holder 409, and the
    new holder finishes the one payment."""
    real_call = CreatePayment.call

    async def call_then_taken_over(self: Any, svc: Any, *args: Any, **kwargs: Any) -> Any:
        answer = await real_call(self, svc, *args, **kwargs)
        stack.expire_leases()
        record = await record_of(stack, "k")
        taken = await svc.engine.begin(stack.merchant.id, "k", record.fingerprint)
        assert isinstance(taken, Execute)
        assert taken.ticket.resumed
        return answer

    monkeypatch.setattr(CreatePayment, "call", call_then_taken_over)
    with usual_phases_refused(monkeypatch) as calls:
        stale = await stack.post("/v1/payments", BODY, key="k")
    assert (stale.status_code, stale.json()["code"]) == (409, "idempotency_lease_lost"), stale.text
    assert calls["record"] == 0  # fenced before it ran
    (payment,) = await rows(stack, "SELECT status FROM payments")
    assert payment.status == "processing"
    assert await stack.count("ledger_entries") == 0
    monkeypatch.undo()
    stack.expire_leases()
    assert dict((await recover_once(stack.services, now=stack.clock())).results) == {"finished": 1}
    replay = await stack.post("/v1/payments", BODY, key="k")
    assert replay.status_code == 201, replay.text
    await assert_exactly_once(stack, replay.json())


async def test_a_failover_moves_the_payment_and_the_transaction_records_it(
    two_acquirers: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary refuses before acting, so the payment moves to its second attempt on the
    secondary: no longer as phase 1 left it, the statement writes nothing and the
    transaction's phase 2 records the answer."""
    await two_acquirers.faults("primary", error_rate=1.0, operations=["authorize"])
    with usual_phases_refused(monkeypatch) as calls:
        response = await two_acquirers.pay(key="k")
    assert response.status_code == 201, response.text
    assert response.json()["acquirer"] == "secondary"
    assert calls == {"start": 0, "record": 1}
    (payment,) = await rows(two_acquirers, "SELECT attempt, status FROM payments")
    assert (payment.attempt, payment.status) == (2, "captured")
    assert await two_acquirers.ledger_violations() == []
    assert await two_acquirers.approved_authorizations(response.json()["id"]) == 1


@pytest.mark.postgres
async def test_a_payment_locked_elsewhere_is_not_waited_for(
    postgres_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another transaction holds the payment's row lock when phase 2 comes (SKIP LOCKED: a
    statement that waited would keep its older snapshot): the statement writes nothing, the
    transaction waits for the lock as it always has, and records the answer."""
    pg = postgres_stack  # its row locks
    holder = await asyncpg.connect(pg.db.url, server_settings={"search_path": pg.db.schema or ""})
    locked = asyncio.Event()
    real_call, real_record = CreatePayment.call, CreatePayment.record

    async def call_then_lock(self: Any, svc: Any, object_id: str, *args: Any) -> Any:
        answer = await real_call(self, svc, object_id, *args)
        await holder.execute("BEGIN")
        await holder.execute("SELECT 1 FROM payments WHERE id = $1 FOR UPDATE", object_id)
        locked.set()
        return answer

    async def release_then_record(self: Any, *args: Any) -> Any:
        await holder.execute("COMMIT")  # the transaction would wait for it: let it go now
        return await real_record(self, *args)

    monkeypatch.setattr(CreatePayment, "call", call_then_lock)
    try:
        with usual_phases_refused(monkeypatch) as calls:
            monkeypatch.setattr(CreatePayment, "record", release_then_record)
            response = await pg.post("/v1/payments", BODY, key="k")
    finally:
        await holder.close()
    assert locked.is_set()
    assert response.status_code == 201, response.text
    assert calls["start"] == 0
    await assert_exactly_once(pg, response.json())


@pytest.mark.postgres
async def test_phase_2s_statement_notifies_only_a_key_a_waiter_marked(
    postgres_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service answers a retry in flight 409 rather than waiting, so its keys go
    unmarked and its statement sends no ``NOTIFY`` (the store's docstring says what one
    costs); a waiter on the same table (wait mode, in another app) marks its key, and the
    statement wakes it. Notifications come in commit order: the first is the marked key's."""
    pg = postgres_stack
    store = pg.services.engine.store
    assert isinstance(store, PostgresStore)
    watches = AsyncExitStack()
    opened: list[Watch] = []
    real_call = CreatePayment.call

    async def call_while_watched(self: Any, svc: Any, *args: Any) -> Any:
        answer = await real_call(self, svc, *args)
        if not opened and (await record_of(pg, "marked")) is not None:
            opened.append(await watches.enter_async_context(store.watch(pg.merchant.id, "marked")))
        return answer

    monkeypatch.setattr(CreatePayment, "call", call_while_watched)
    listener = await asyncpg.connect(pg.db.url)
    payloads: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener(store.channel, lambda *args: payloads.put_nowait(args[-1]))
    try:
        async with watches:
            with usual_phases_refused(monkeypatch) as calls:
                plain = await pg.post("/v1/payments", BODY, key="plain")
                marked = await pg.post("/v1/payments", BODY, key="marked")
            assert (plain.status_code, marked.status_code) == (201, 201), marked.text
            assert calls == {"start": 0, "record": 0}
            (watch,) = opened
            await asyncio.wait_for(watch.wait(600), 10)
        ours = {topic(pg.merchant.id, key) for key in ("plain", "marked")}
        first = await asyncio.wait_for(payloads.get(), 10)
        while first not in ours:  # another test's, on the same table name's channel
            first = await asyncio.wait_for(payloads.get(), 10)
    finally:
        await listener.close()
    assert first == topic(pg.merchant.id, "marked")
    assert topic(pg.merchant.id, "plain") not in [
        payloads.get_nowait() for _ in range(payloads.qsize())
    ]


@pytest.mark.postgres
async def test_phase_2s_statement_finds_the_payment_by_its_id(postgres_stack: Stack) -> None:
    """The plan the server keeps for phase 2 (generic, as a prepared statement gets) reaches
    the payment through its id alone: with ``status`` in the locking scan's condition it took
    the dashboard's (status, seq) index, every processing entry on every payment."""
    pg = postgres_stack
    await pg.post("/v1/payments", BODY, key="k")  # the tables exist
    conn = await asyncpg.connect(pg.db.url, server_settings={"search_path": pg.db.schema or ""})
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute("PREPARE phase_2 AS " + onestatement._made("oncepay_idempotency")[1])
        arguments = ", ".join(["NULL"] * 27)
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE phase_2({arguments})"))
    finally:
        await conn.close()
    scans = re.findall(r"Scan using (\w+) on payments\b", plan)
    assert scans, plan
    assert set(scans) == {"payments_id_key"}, plan


async def test_many_requests_with_one_key_at_once_make_one_payment(stack: Stack) -> None:
    answers = await asyncio.gather(
        *(stack.post("/v1/payments", BODY, key="same") for _ in range(24))
    )
    codes = sorted({a.status_code for a in answers})
    assert set(codes) <= {201, 409}, [a.text for a in answers if a.status_code not in {201, 409}]
    created = [a for a in answers if a.status_code == 201]
    assert created
    assert len({a.content for a in created}) == 1
    await assert_exactly_once(stack, created[0].json())
