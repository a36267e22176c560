"""Reading OncePay's books for reconciliation from a database: N captured payments seeded
straight into a migrated payments database (no API), then the time
:func:`oncepay.reconciliation.source.operations_between` takes to read them back.

    python bench/reconciliation/books.py --payments 100000
    python bench/reconciliation/books.py --payments 100000 --database-url postgresql://postgres@127.0.0.1/postgres

On PostgreSQL the seeded rows live in a schema of their own, dropped at the end."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from oncepay.payments.storage.migrations import migrate  # noqa: E402
from oncepay.payments.storage.schema import (  # noqa: E402
    ledger_transactions,
    merchants,
    payments,
)
from oncepay.reconciliation.source import operations_between  # noqa: E402
from oncepay.storage.db import Database, write  # noqa: E402

BATCH = 10_000  # rows per executemany: bounded memory while seeding


def payment_row(n: int, at: float) -> dict[str, object]:
    return {
        "id": f"pay_{n:010d}",
        "merchant_id": "mer_bench",
        "amount": 1000 + n % 5000,
        "currency": "EUR",
        "payment_method": "pm_card_ok",
        "capture_method": "automatic",
        "metadata": "{}",
        "status": "captured",
        "amount_captured": 1000 + n % 5000,
        "amount_refunded": 0,
        "acquirer": "primary",
        "attempt": 1,
        "authorization_id": f"a{n}",
        "outcome_unknown": False,
        "recovery_attempts": 0,
        "escalated": False,
        "created_at": at,
        "updated_at": at,
    }


def ledger_row(n: int, at: float) -> dict[str, object]:
    return {
        "id": f"ltx_{n:010d}",
        "merchant_id": "mer_bench",
        "payment_id": f"pay_{n:010d}",
        "refund_id": None,
        "kind": "capture",
        "created_at": at,
    }


async def seed(db: Database, count: int, at: float) -> None:
    async with write(db) as conn:
        await conn.execute(merchants.insert().values(id="mer_bench", name="bench", created_at=at))
    for start in range(0, count, BATCH):
        numbers = range(start, min(count, start + BATCH))
        async with write(db) as conn:
            await conn.execute(payments.insert(), [payment_row(n, at) for n in numbers])
            await conn.execute(ledger_transactions.insert(), [ledger_row(n, at) for n in numbers])


async def measure(url: str, count: int) -> None:
    db = Database.from_url(url)
    try:
        await migrate(db)
        at = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()
        start = time.perf_counter()
        await seed(db, count, at)
        seeded = time.perf_counter() - start
        day = datetime.fromtimestamp(at, UTC).date()
        start = time.perf_counter()
        ops = await operations_between(db, "primary", day, day)
        read = time.perf_counter() - start
        assert len(ops) == count, len(ops)
        print(
            f"{db.dialect}: {count:,} movements seeded in {seeded:.1f} s, read back in "
            f"{read:.2f} s ({count / read:,.0f} rows/s)"
        )
    finally:
        if db.schema:
            async with db.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
        await db.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--database-url", help="default: a temporary SQLite file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'payments.db'}"
        if url.startswith("postgresql") and "schema=" not in url:
            url += f"?schema=bench_recon_{uuid.uuid4().hex[:8]}"
        asyncio.run(measure(url, args.payments))


if __name__ == "__main__":
    main()
