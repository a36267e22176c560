"""Runs and discrepancies kept in the payments database, on SQLite and PostgreSQL: a run of
the same day with the same outcome writes nothing; a discrepancy is opened once however many
runs find it, and closed only with a note."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import Table, func, select

from oncepay.payments.storage.migrations import migrate
from oncepay.reconciliation import Outcome, reconcile
from oncepay.reconciliation.store import (
    DiscrepancyNotOpen,
    close,
    create_tables,
    discrepancies,
    open_discrepancies,
    runs,
    save_run,
)
from oncepay.storage.db import Database, read, write
from tests.payments.stack import database_url, drop_schema
from tests.reconciliation.books import DAY, SCHEDULE, clean_day
from tests.servers import require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgres":
        require_postgres()
    url = database_url(request.param, tmp_path)
    database = Database.from_url(url)
    await migrate(database)  # the payments schema (and PostgreSQL's schema of the test)
    async with write(database) as conn:
        await create_tables(conn, database)
    yield database
    await database.aclose()
    await drop_schema(url)


async def count(db: Database, table: Table) -> int:
    async with read(db) as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


def outcome_with_two_discrepancies(day: date = DAY) -> Outcome:
    books = clean_day(20)
    del books.lines[0]
    line = books.lines[1]  # pay_0000001_capture, once pay_0000000_capture is gone
    books.lines[1] = line._replace(amount=line.amount + 5, net=line.net + 5)
    return reconcile(books.lines, books.books(), as_of=day, grace_days=0, fees=SCHEDULE)


async def test_a_rerun_of_a_day_changes_nothing(db: Database) -> None:
    outcome = outcome_with_two_discrepancies()
    first = await save_run(db, "primary", DAY, outcome, now=1.0)
    again = await save_run(db, "primary", DAY, outcome, now=2.0)
    assert (first.opened, first.new_run) == (2, True)
    assert (again.run_id, again.opened, again.new_run) == (first.run_id, 0, False)
    assert (await count(db, runs), await count(db, discrepancies)) == (1, 2)


async def test_a_discrepancy_is_opened_once_across_runs_and_closed_with_a_note(
    db: Database,
) -> None:
    await save_run(db, "primary", DAY, outcome_with_two_discrepancies(), now=1.0)
    later = date(2026, 12, 2)
    second = await save_run(db, "primary", later, outcome_with_two_discrepancies(later), now=2.0)
    assert (second.new_run, second.opened) == (True, 0)
    found = await open_discrepancies(db, "primary")
    assert [(row["kind"], row["reference"]) for row in found] == [
        ("missing_at_acquirer", "pay_0000000_capture"),
        ("amount_mismatch", "pay_0000001_capture"),
    ]
    first_id = int(found[0]["id"])
    with pytest.raises(ValueError, match="with a note"):
        await close(db, first_id, "resolved", "  ", now=3.0)
    await close(db, first_id, "accepted", "booked by hand, ticket FIN-12", now=3.0)
    with pytest.raises(DiscrepancyNotOpen):
        await close(db, first_id, "resolved", "again", now=4.0)
    assert len(await open_discrepancies(db)) == 1
    # a closed discrepancy found again stays closed: a person already judged it
    third_day = date(2026, 12, 3)
    third = await save_run(
        db, "primary", third_day, outcome_with_two_discrepancies(third_day), now=5.0
    )
    assert third.opened == 0
    assert len(await open_discrepancies(db)) == 1
