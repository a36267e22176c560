"""Shared pieces of the acquirer tests: bodies, in-process clients, real simulator processes,
and PostgreSQL schemas of their own."""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from oncepay.simulator import Simulator
from tests.processes import free_port, running
from tests.servers import POSTGRES_URL


def auth_body(reference: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "reference": reference,
        "order_id": f"order-{reference}",
        "amount": 1000,
        "currency": "EUR",
        "payment_method": "pm_card_ok",
        "capture": False,
    }
    return {**body, **overrides}


def key(reference: str) -> dict[str, str]:
    return {"Idempotency-Key": reference}


@asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to ``app`` in this process; the app's database is closed after."""
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://acquirer") as client:
            yield client
    finally:
        simulator: Simulator = app.state.simulator
        await simulator.aclose()


def acquirer_args(port: int, database_url: str, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "oncepay.simulator.command",
        "--port", str(port), "--database-url", database_url, *flags,
    ]  # fmt: skip


@contextmanager
def running_acquirer(database_url: str, *flags: str) -> Iterator[str]:
    """``oncepay acquirer`` as a real uvicorn process; yields its base URL."""
    port = free_port()
    with running(acquirer_args(port, database_url, *flags), port):
        yield f"http://127.0.0.1:{port}"


class CountingApp:
    """Wraps an ASGI app and counts the HTTP requests that reached it."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.requests = 0
        self.state = app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


async def authorizations_of(client: httpx.AsyncClient, order_id: str) -> list[dict[str, Any]]:
    response = await client.get("/admin/operations", params={"order_id": order_id})
    assert response.status_code == 200
    return [op for op in response.json()["operations"] if op["type"] == "authorization"]


@contextmanager
def postgres_schema_url() -> Iterator[str]:
    """A database URL with a fresh ``?schema=`` of its own, dropped afterwards (the
    simulator creates the schema on first use)."""
    import psycopg

    schema = f"oncepay_acq_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{POSTGRES_URL}?schema={schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
