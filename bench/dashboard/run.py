"""The dashboard's searches with a million payments: each search timed through the dashboard
(HTTP in process, the page rendered) beside the same query alone (``dashboard.queries``, no
HTTP, no template), alternating, reporting p50/p95 of each and the ratio.

    python bench/dashboard/run.py                        # 1,000,000 payments on SQLite
    python bench/dashboard/run.py --payments 100000 --database-url postgresql://postgres@127.0.0.1/postgres

Seeding writes straight into a migrated database (no API): N payments over 10 merchants and
the last 30 days (1 % failed, 2 % refunded, the rest captured), an event and an idempotency
record for each (so searches by event id and by key, and timelines, have their rows). On
PostgreSQL the rows live in a schema of their own, dropped at the end."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from sqlalchemy import text  # noqa: E402

from bench.harness.environment import git_state, machine  # noqa: E402
from oncepay.payments import bootstrap  # noqa: E402
from oncepay.payments.api.app import create_app  # noqa: E402
from oncepay.payments.dashboard import queries  # noqa: E402
from oncepay.payments.settings import Settings  # noqa: E402
from oncepay.payments.storage.schema import events, merchants, payments  # noqa: E402
from oncepay.storage.db import Database, write  # noqa: E402

BATCH = 10_000
MERCHANTS = 10
DAYS = 30
TOKEN = "bench-operator-token-0123456789"
RECORDS = "oncepay_idempotency"


def pid(n: int) -> str:
    return f"pay_{n:024x}"


def payment_row(n: int, at: float) -> dict[str, Any]:
    status = "failed" if n % 100 == 0 else "refunded" if n % 50 == 1 else "captured"
    amount = 100 + (n * 7919) % 100_000
    return {
        "id": pid(n),
        "merchant_id": f"mer_{n % MERCHANTS:02d}",
        "amount": amount,
        "currency": "EUR",
        "payment_method": "pm_card_ok",
        "capture_method": "automatic",
        "metadata": "{}",
        "status": status,
        "amount_captured": 0 if status == "failed" else amount,
        "amount_refunded": amount if status == "refunded" else 0,
        "acquirer": "primary",
        "attempt": 1,
        "authorization_id": f"auth_{n:024x}",
        "outcome_unknown": False,
        "recovery_attempts": 0,
        "escalated": False,
        "created_at": at,
        "updated_at": at,
    }


async def seed(db: Database, count: int, now: float) -> None:
    async with write(db) as conn:
        await conn.execute(
            merchants.insert(),
            [{"id": f"mer_{m:02d}", "name": f"m{m}", "created_at": now} for m in range(MERCHANTS)],
        )
    span = DAYS * 86400
    for start in range(0, count, BATCH):
        numbers = range(start, min(count, start + BATCH))
        at = {n: now - span + span * n / count for n in numbers}
        async with write(db) as conn:
            await conn.execute(payments.insert(), [payment_row(n, at[n]) for n in numbers])
            await conn.execute(
                events.insert(),
                [
                    {
                        "id": f"evt_{n:024x}",
                        "merchant_id": f"mer_{n % MERCHANTS:02d}",
                        "type": "payment.captured",
                        "object_id": pid(n),
                        "data": "{}",
                        "created_at": at[n],
                    }
                    for n in numbers
                ],
            )
            await conn.execute(
                text(
                    f"INSERT INTO {RECORDS} (scope, idempotency_key, fingerprint, state, fence, "
                    "created_at, lease_expires_at, expires_at, recovery_point, response_status) "
                    "VALUES (:scope, :key, 'f', 'completed', 1, :at, :at, :expires, :point, 201)"
                ),
                [
                    {
                        "scope": f"mer_{n % MERCHANTS:02d}",
                        "key": f"order-{n}",
                        "at": at[n],
                        "expires": at[n] + 86400,
                        "point": f"finished:create:{pid(n)}",
                    }
                    for n in numbers
                ],
            )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Probe = Callable[[random.Random], Awaitable[Any]]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="oncepay-dashboard-bench-"))
    url = args.database_url or f"sqlite:///{folder / 'payments.db'}"
    if url.startswith("postgresql") and "schema=" not in url:
        url += f"?schema=bench_dash_{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=url,
        acquirer_database_url=f"sqlite:///{folder / 'acquirer.db'}",
        admin_token=TOKEN,
        run_worker=False,
        access_log=False,
    )
    services = await bootstrap.start(settings)  # migrated, and the records' table made
    db = services.db
    now = time.time()
    started = time.perf_counter()
    await seed(db, args.payments, now)
    seeded = time.perf_counter() - started
    app = create_app(settings, services=services)
    transport = httpx.ASGITransport(app=app)
    client = httpx.AsyncClient(
        transport=transport, base_url="http://bench", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    n = args.payments

    def some(rng: random.Random) -> int:
        return rng.randrange(n)

    searches: dict[str, tuple[Callable[[random.Random], dict[str, str]], str]] = {
        "by id": (lambda r: {"id": pid(some(r))}, "search"),
        "by idempotency key": (lambda r: {"key": f"order-{some(r)}"}, "search"),
        "by acquirer reference": (lambda r: {"reference": f"{pid(some(r))}_a1"}, "search"),
        "by authorization id": (lambda r: {"reference": f"auth_{some(r):024x}"}, "search"),
        "by event id": (lambda r: {"event": f"evt_{some(r):024x}"}, "search"),
        "merchant, first page": (
            lambda r: {"merchant": f"mer_{r.randrange(MERCHANTS):02d}"},
            "search",
        ),
        "status failed (1 %)": (lambda r: {"status": "failed"}, "search"),
        "amount range + status": (
            lambda r: {"amount_min": "5000", "amount_max": "5100", "status": "captured"},
            "search",
        ),
        "created, one hour": (lambda r: _hour(now - DAYS * 86400 * r.random()), "search"),
        "created, one hour + status failed": (
            lambda r: {**_hour(now - DAYS * 86400 * r.random()), "status": "failed"},
            "search",
        ),
        "timeline": (lambda r: {"id": pid(some(r))}, "timeline"),
        "overview": (lambda r: {}, "overview"),
    }
    results: dict[str, Any] = {}
    for name, (make, kind) in searches.items():
        rng_a, rng_b = random.Random(1), random.Random(1)
        page_ms: list[float] = []
        query_ms: list[float] = []
        for _ in range(args.repeat):
            params = make(rng_a)
            same = make(rng_b)
            started = time.perf_counter()
            if kind == "search":
                answer = await client.get("/dashboard/payments", params=params)
            elif kind == "timeline":
                answer = await client.get(f"/dashboard/payments/{params['id']}")
            else:
                answer = await client.get("/dashboard")
            page_ms.append((time.perf_counter() - started) * 1000)
            assert answer.status_code == 200, (name, answer.status_code, answer.text[:300])
            started = time.perf_counter()
            if kind == "search":
                found = _filter(same)
                await queries.search_payments(db, found)
            elif kind == "timeline":
                await queries.timeline(db, same["id"], lambda key: key)
            else:
                await queries.overview(db)
            query_ms.append((time.perf_counter() - started) * 1000)
        results[name] = {
            "page_p50_ms": round(statistics.median(page_ms), 1),
            "page_p95_ms": round(_percentile(page_ms, 0.95), 1),
            "query_p50_ms": round(statistics.median(query_ms), 1),
            "query_p95_ms": round(_percentile(query_ms, 0.95), 1),
            "page_over_query": round(
                statistics.median(page_ms) / max(statistics.median(query_ms), 0.001), 2
            ),
        }
        print(name, json.dumps(results[name]), flush=True)
    await client.aclose()
    await services.aclose()
    if db.schema:
        dropper = Database.from_url(url)
        async with dropper.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
        await dropper.aclose()
    return {
        "payments": args.payments,
        "database": "postgresql" if url.startswith("postgresql") else "sqlite",
        "seed_seconds": round(seeded, 1),
        "repeat": args.repeat,
        "searches": results,
        "machine": machine(),
        "git": git_state(),
    }


def _hour(start: float) -> dict[str, str]:
    return {"created_from": _iso(start), "created_to": _iso(start + 3600)}


def _iso(moment: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M")


def _filter(params: dict[str, str]) -> queries.PaymentFilter:
    from oncepay.payments.dashboard.routes import _filter as parse

    return parse(
        id=params.get("id"),
        key=params.get("key"),
        reference=params.get("reference"),
        event=params.get("event"),
        merchant=params.get("merchant"),
        status=params.get("status"),
        amount_min=params.get("amount_min"),
        amount_max=params.get("amount_max"),
        created_from=params.get("created_from"),
        created_to=params.get("created_to"),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--database-url")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    result = asyncio.run(measure(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "git")}, indent=2))


if __name__ == "__main__":
    main()
