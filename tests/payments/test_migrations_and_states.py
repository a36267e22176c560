"""Migrations run exactly once when several processes start together; the state machine is
the table; the reaper purges expired keys."""

from __future__ import annotations

import asyncio
import multiprocessing
from multiprocessing.synchronize import Barrier

import pytest
from sqlalchemy import text

from oncepay.payments.errors import InvalidStateTransition
from oncepay.payments.recovery import reap
from oncepay.payments.states import TRANSITIONS, PaymentStatus, Transition, can, next_status
from oncepay.payments.storage.migrations import MIGRATIONS, migrate
from oncepay.storage.db import Database, read
from tests.payments.stack import Stack, drop_schema

PROCESSES = 4


async def _migrate_in_child(url: str, barrier: Barrier) -> list[int]:
    db = Database.from_url(url)
    try:
        await asyncio.to_thread(barrier.wait)  # every process starts migrating at once
        return await migrate(db)
    finally:
        await db.aclose()


def _child(url: str, barrier: Barrier, out: multiprocessing.Queue[list[int]]) -> None:
    out.put(asyncio.run(_migrate_in_child(url, barrier)))


@pytest.mark.slow
async def test_processes_starting_together_migrate_once(payments_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    out: multiprocessing.Queue[list[int]] = ctx.Queue()
    children = [
        ctx.Process(target=_child, args=(payments_url, barrier, out)) for _ in range(PROCESSES)
    ]
    for child in children:
        child.start()
    applied = [await asyncio.to_thread(out.get, True, 120) for _ in children]
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    try:
        # One process applied every migration; the others found them done.
        assert sorted(applied, key=len) == [[]] * (PROCESSES - 1) + [[v for v, _ in MIGRATIONS]]
        db = Database.from_url(payments_url)
        async with read(db) as conn:
            versions = list(
                (
                    await conn.execute(text("SELECT version FROM oncepay_schema_migrations"))
                ).scalars()
            )
        await db.aclose()
        assert sorted(versions) == [v for v, _ in MIGRATIONS]
    finally:
        await drop_schema(payments_url)


def test_every_move_outside_the_table_is_refused() -> None:
    for status in PaymentStatus:
        for transition in Transition:
            if (status, transition) in TRANSITIONS:
                assert next_status(status, transition) is TRANSITIONS[status, transition]
            else:
                with pytest.raises(InvalidStateTransition):
                    next_status(status, transition)


def test_which_requests_each_status_accepts() -> None:
    accepts = {s: {r for r in ("capture", "cancel", "refund") if can(s, r)} for s in PaymentStatus}
    assert accepts == {
        PaymentStatus.PROCESSING: set(),
        PaymentStatus.AUTHORIZED: {"capture", "cancel"},
        PaymentStatus.CAPTURED: {"refund"},
        PaymentStatus.PARTIALLY_REFUNDED: {"refund"},
        PaymentStatus.REFUNDED: set(),
        PaymentStatus.CANCELED: set(),
        PaymentStatus.FAILED: set(),
    }


async def test_the_reaper_purges_expired_keys(stack: Stack) -> None:
    first = (await stack.pay(key="old")).json()
    assert await reap(stack.services, now=stack.clock()) == 0  # not expired yet
    ttl = stack.services.settings.key_ttl
    assert await reap(stack.services, now=stack.clock() + ttl + 1) == 1
    assert await stack.count("oncepay_idempotency") == 0
    stack.clock.advance(ttl + 1)
    again = await stack.pay(key="old")  # a key past its TTL names a new request
    assert again.status_code == 201
    assert "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first["id"]
