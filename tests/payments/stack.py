"""A payments service for tests: the real API app and real databases (SQLite files, or a
PostgreSQL schema of its own), with simulated acquirers in-process whose faults the test sets
through their admin API. The idempotency engine runs on a clock the test moves, so lease
expiry is a step of the test, not a sleep."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from oncepay.payments.acquirers.breaker import breaker_for
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.api.app import create_app
from oncepay.payments.bootstrap import start
from oncepay.payments.context import Services
from oncepay.payments.ledger import check
from oncepay.payments.merchants import Merchant, create_merchant
from oncepay.payments.settings import Settings
from oncepay.simulator import create_app as create_simulator
from oncepay.storage.db import Database, read
from tests.clock import FakeClock
from tests.payments.acquirer_helpers import CountingApp
from tests.servers import POSTGRES_URL

# Test acquirer calls: a short timeout so an injected stall turns into an unknown outcome
# quickly, and two attempts so retries are exercised without slowing every fault test.
TEST_ACQUIRER_TIMEOUT = 0.5
TEST_ACQUIRER_ATTEMPTS = 2
TEST_LEASE = 30.0
BACKOFF = [2.0, 4.0, 8.0]


def database_url(backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'payments.db'}"
    return f"{POSTGRES_URL}?schema=oncepay_pay_{uuid.uuid4().hex[:10]}"


async def drop_schema(url: str) -> None:
    db = Database.from_url(url)
    if db.schema:
        from sqlalchemy import text

        async with db.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
    await db.aclose()


@dataclass
class Stack:
    services: Services
    client: httpx.AsyncClient
    api_key: str
    merchant: Merchant
    clock: FakeClock
    simulators: dict[str, httpx.AsyncClient] = field(default_factory=dict)
    simulator_apps: dict[str, CountingApp] = field(default_factory=dict)
    _keys: int = 0

    def sent(self, acquirer: str = "primary") -> int:
        """HTTP requests the payments service sent to an acquirer so far (the test's own admin
        requests go around the count)."""
        return self.simulator_apps[acquirer].requests

    @property
    def db(self) -> Database:
        return self.services.db

    def new_key(self) -> str:
        self._keys += 1
        return f"key-{self._keys}-{uuid.uuid4().hex[:8]}"

    async def post(self, path: str, body: Any = None, *, key: str | None = None,
                   **headers: str) -> httpx.Response:  # fmt: skip
        sent = {"Idempotency-Key": key or self.new_key(), **headers}
        if body is None:
            return await self.client.post(path, headers=sent)
        return await self.client.post(path, json=body, headers=sent)

    async def pay(self, *, key: str | None = None, **fields: Any) -> httpx.Response:
        body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok", **fields}
        return await self.post("/v1/payments", body, key=key)

    async def faults(self, acquirer: str = "primary", **faults: Any) -> None:
        response = await self.simulators[acquirer].put("/admin/faults", json=faults)
        assert response.status_code == 200, response.text

    async def operations(
        self, payment_id: str | None, acquirer: str = "primary"
    ) -> list[dict[str, Any]]:
        """The acquirer's operations for one payment (all of them for None)."""
        params = {} if payment_id is None else {"order_id": payment_id}
        response = await self.simulators[acquirer].get("/admin/operations", params=params)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["operations"]
        return found

    async def approved_authorizations(self, payment_id: str) -> int:
        """Authorizations approved for a payment, over every acquirer."""
        total = 0
        for name in self.simulators:
            operations = await self.operations(payment_id, name)
            total += sum(
                1
                for op in operations
                if op["type"] == "authorization" and op["status"] == "approved"
            )
        return total

    async def ledger_violations(self) -> list[Any]:
        async with read(self.db) as conn:
            return await check(conn)

    async def count(self, table: str) -> int:
        from sqlalchemy import text

        async with read(self.db) as conn:
            return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())

    def expire_leases(self) -> None:
        self.clock.advance(TEST_LEASE + 1)


@asynccontextmanager
async def running_stack(
    url: str,
    tmp_path: Path,
    *,
    acquirers: tuple[str, ...] = ("primary",),
    control: RetryControl | None = None,
    **overrides: Any,
) -> AsyncIterator[Stack]:
    settings = Settings(
        database_url=url,
        run_worker=False,
        lease=TEST_LEASE,
        recovery_backoff=BACKOFF,
        acquirer_timeout=TEST_ACQUIRER_TIMEOUT,
        acquirer_attempts=TEST_ACQUIRER_ATTEMPTS,
        **{"webhook_allow_private": True, **overrides},  # receivers listen on 127.0.0.1
    )
    simulator_apps = {  # each counts the HTTP requests that reach it (Stack.sent)
        name: CountingApp(create_simulator(f"sqlite:///{tmp_path / f'acquirer-{name}.db'}", seed=7))
        for name in acquirers
    }
    clock = FakeClock()
    # Retry control on the test's clock, its throttling dice seeded: a run is reproducible.
    control = control or RetryControl(clock=clock, dice=random.Random(7).random)
    acquirer_set = AcquirerPool(
        [
            HttpAcquirer(
                name,
                app=app,
                timeout=TEST_ACQUIRER_TIMEOUT,
                attempts=TEST_ACQUIRER_ATTEMPTS,
                control=control,
                breaker=breaker_for(name, clock),
            )
            for name, app in simulator_apps.items()
        ]
    )
    services = await start(settings, acquirer_set)
    services.engine.clock = clock
    merchant, api_key = await create_merchant(services.db, "Test shop")
    app = create_app(settings, services=services)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(
        transport=transport,
        base_url="http://payments",
        headers={"Authorization": f"Bearer {api_key}"},
    )
    simulators = {
        name: httpx.AsyncClient(transport=httpx.ASGITransport(app=sim.app), base_url="http://acq")
        for name, sim in simulator_apps.items()
    }
    try:
        yield Stack(services, client, api_key, merchant, clock, simulators, simulator_apps)
    finally:
        await client.aclose()
        for sim_client in simulators.values():
            await sim_client.aclose()
        await services.aclose()
        await drop_schema(url)
