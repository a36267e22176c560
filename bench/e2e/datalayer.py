"""What the data layer costs a payment (issue 18's data-layer levers), deterministic measures:

* ``instructions``: callgrind instructions a payment, in-process on SQLite (the "off" variant
  of ``bench/tracing/instructions.py``: the app through httpx's ASGI transport, the embedded
  acquirer, one payment at a time; (Ir(N2) - Ir(N1)) / (N2 - N1) cancels start-up).
* ``count``: SQL statements and commits a payment on the payments database (SQLite: every
  statement traced; PostgreSQL: asyncpg calls, each one round trip, and the transactions'
  verbs; the embedded acquirer's own SQLite database not counted), and CPU time a payment
  of the whole process (client included, so a relative figure), on SQLite and PostgreSQL.

    .venv/bin/python bench/e2e/datalayer.py instructions [--n1 20] [--n2 60] [--src DIR] \\
        [--backend sqlite|postgresql] [--concurrency 16] [--serving]

``--concurrency N``: N requests in flight at once (the acquirer's retry control ``fixed``: under
valgrind every call is slow enough for the adaptive one to hold calls back); ``--serving``: the
app as ``oncepay serve`` builds it (``serving_app``: the heap settled after start-up), to
compare with the same run without it.
    .venv/bin/python bench/e2e/datalayer.py count [--payments 200] [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
COUNTS: Counter[str] = Counter()


def _count_sqlite(folder: str) -> None:
    """Every statement on a connection to the payments file (not the acquirer's)."""
    original = sqlite3.connect

    def connect(path: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn: sqlite3.Connection = original(path, *args, **kwargs)
        if str(path).endswith("/p.db"):
            conn.set_trace_callback(_sqlite_statement)
        return conn

    sqlite3.connect = connect  # type: ignore[assignment]


def _sqlite_statement(sql: str) -> None:
    if os.environ.get("DATALAYER_SHOW"):  # every statement, to see what a payment runs
        print(" ".join(sql.split())[:160])
    verb = sql.lstrip().split(None, 1)[0].upper()
    COUNTS["statements"] += 1
    COUNTS[f"sql {verb}"] += 1
    if verb in {"COMMIT", "END"}:
        COUNTS["commits"] += 1


def _count_asyncpg() -> None:
    """Round trips on asyncpg connections: each call below is one (a cached prepared
    statement is not prepared again)."""
    import asyncpg
    from asyncpg.prepared_stmt import PreparedStatement

    def counted(cls: Any, name: str) -> None:
        original = getattr(cls, name)

        async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            COUNTS["round trips"] += 1
            COUNTS[f"rt {cls.__name__}.{name}"] += 1
            if os.environ.get("DATALAYER_SHOW"):  # every round trip, to see what a payment sends
                text = getattr(self, "get_query", lambda: args[0] if args else "?")()
                print(f"{cls.__name__}.{name}: " + " ".join(str(text).split())[:300])
            if name == "execute" and cls is asyncpg.Connection and args:
                verb = (str(args[0]).split() or ["(empty)"])[0].rstrip(";").upper()
                COUNTS[f"execute {verb}"] += 1
                COUNTS["commits"] += verb in {"COMMIT", "END"}
            return await original(self, *args, **kwargs)

        setattr(cls, name, wrapper)

    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        counted(asyncpg.Connection, name)
    for name in ("fetch", "fetchrow", "fetchval", "executemany"):
        counted(PreparedStatement, name)


async def count(payments: int, backend: str) -> dict[str, float]:
    import httpx

    from oncepay.payments.api.app import create_app
    from oncepay.payments.merchants import issue_test_key
    from oncepay.payments.settings import Settings
    from oncepay.payments.storage.migrations import migrated

    folder = tempfile.mkdtemp(prefix="oncepay-dl-")
    if backend == "sqlite":
        _count_sqlite(folder)
        url = f"sqlite:///{folder}/p.db"
    else:
        _count_asyncpg()
        url = f"{POSTGRES_URL}?schema=oncepay_dl_{uuid.uuid4().hex[:10]}"
    async with migrated(url) as db:
        _, key = await issue_test_key(db)
    settings = Settings(
        database_url=url, acquirer_database_url=f"sqlite:///{folder}/a.db", run_worker=False
    )
    app = create_app(settings)
    body = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_ok"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for n in range(20):  # warm: statement caches, pools
                headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"w{n}"}
                assert (await client.post("/v1/payments", json=body, headers=headers)).is_success
            COUNTS.clear()
            cpu = time.process_time()
            for n in range(payments):
                headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"k{n}"}
                answer = await client.post("/v1/payments", json=body, headers=headers)
                assert answer.status_code == 201, answer.text
            cpu = time.process_time() - cpu
    per = {name: round(value / payments, 2) for name, value in sorted(COUNTS.items())}
    per["cpu ms"] = round(cpu * 1000 / payments, 2)
    return per


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["instructions", "count"])
    parser.add_argument("--n1", type=int, default=20)
    parser.add_argument("--n2", type=int, default=60)
    parser.add_argument("--payments", type=int, default=200)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--src", help="measure the oncepay package of this src/ folder (a copy at another commit)"
    )
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight at once")
    parser.add_argument("--serving", action="store_true", help="as `oncepay serve` builds the app")
    args = parser.parse_args()
    if args.concurrency < 1:
        parser.error("--concurrency: at least 1 request in flight")
    if args.src:  # read by the measured processes, which import oncepay from there
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [args.src, os.environ.get("PYTHONPATH")])
        )
    if args.what == "count":
        if args.src:  # counted in this process: oncepay imported from there, not the checkout
            sys.path.insert(0, str(Path(args.src).resolve()))
        for name, value in asyncio.run(count(args.payments, args.backend)).items():
            print(f"{args.backend}: {name}: {value}")
        return
    from bench.tracing.instructions import (
        CONCURRENCY_ENV,
        DATABASE_ENV,
        SERVING_ENV,
        instructions,
        total,
    )

    os.environ[CONCURRENCY_ENV] = str(args.concurrency)
    if args.concurrency > 1:
        os.environ["ONCEPAY_ACQUIRER_RETRY_CONTROL"] = "fixed"
    if args.serving:
        os.environ[SERVING_ENV] = "1"

    if args.backend == "postgresql":  # each run its own schema (the server's CPU not counted)
        os.environ[DATABASE_ENV] = POSTGRES_URL
    with tempfile.TemporaryDirectory() as out:
        runs = {n: instructions("off", n, 0, Path(out) / f"off-{n}") for n in (args.n1, args.n2)}
        for n, process in runs.items():
            if process.wait() != 0:
                log = (Path(out) / f"off-{n}.log").read_text(errors="replace")
                raise RuntimeError(f"{n} payments failed:\n{log[-3000:]}")
        per = (total(Path(out) / f"off-{args.n2}") - total(Path(out) / f"off-{args.n1}")) / (
            args.n2 - args.n1
        )
    where = "PostgreSQL (this process only)" if args.backend == "postgresql" else "SQLite"
    how = f"{args.concurrency} in flight" + (", as served" if args.serving else "")
    print(f"instructions a payment ({where}, in-process, tracing off, {how}): {per:,.0f}")


if __name__ == "__main__":
    main()
