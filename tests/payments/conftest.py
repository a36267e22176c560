"""Fixtures of the payments tests: every test that takes ``stack`` runs on SQLite and on
PostgreSQL (which fails under CI=true when the server is missing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from oncepay.payments.operations import onestatement
from tests.payments.stack import Stack, database_url, running_stack
from tests.servers import require_postgres


@pytest.fixture(
    params=[pytest.param("sqlite", id="sqlite"),
            pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]
)  # fmt: skip
def payments_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        require_postgres()
    return database_url(request.param, tmp_path)


@pytest.fixture
async def stack(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path) as running:
        yield running


@pytest.fixture
async def two_acquirers(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, acquirers=("primary", "secondary")) as s:
        yield s


@pytest.fixture
async def sqlite_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """SQLite only (its writer, its raw transactions)."""
    async with running_stack(database_url("sqlite", tmp_path), tmp_path) as running:
        yield running


@pytest.fixture
async def postgres_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """PostgreSQL only (its row locks, its waits inside a statement)."""
    require_postgres()
    async with running_stack(database_url("postgres", tmp_path), tmp_path) as running:
        yield running


@pytest.fixture
def usual_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new payment's phases as transactions on PostgreSQL too, as on SQLite: there they are
    one statement each (operations/onestatement.py), which the tests that inject faults into
    a transaction's steps (the claim, the checkpoint, the completion) would never reach.
    tests/payments/test_one_statement.py injects the same faults into the statements."""
    monkeypatch.setattr(onestatement, "usable", lambda *args, **kwargs: False)
