"""The payments stack the reconciliation tests run against, on SQLite and on PostgreSQL (under
CI a missing PostgreSQL fails the test, it does not skip it). A file that needs another stack
defines its own ``stack`` fixture."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.payments.stack import Stack, database_url, running_stack
from tests.servers import require_postgres


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def stack(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Stack]:
    if request.param == "postgres":
        require_postgres()
    async with running_stack(database_url(request.param, tmp_path), tmp_path) as running:
        yield running
