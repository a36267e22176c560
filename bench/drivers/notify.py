"""What ``pg_notify`` costs a completion: the PostgreSQL store's completing ``UPDATE`` with and
without a notification, side by side in one run.

    python bench/drivers/notify.py [--rounds 3] [--seconds 5] [--connections 32]

Each round runs both variants in turn (which goes first alternates), ``--seconds`` each, on
``--connections`` autocommit connections of one process, each connection completing rows of
its own (no row is contended): ``WITH done AS (UPDATE … RETURNING …) SELECT pg_notify(…) FROM
done`` against the same statement selecting a constant. Reported: completions a second and
the server backends' CPU (``/proc/<pid>/stat``) per completion, medians over the rounds, and
the notifying variant's ratio to the plain one.

Why it matters: at commit a transaction that sent ``NOTIFY`` takes a lock for the whole
database and holds it through its commit's WAL flush, so notifying commits go one at a time
(PostgreSQL's ``PreCommit_Notify``). That is why the store notifies only a record a waiter
marked (``oncepay.idempotency.stores.postgres``). Writes only the schema ``bench_notify`` on
``--url`` and drops it at the end; needs the server on this machine (it reads /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu

SCHEMA = "bench_notify"
ROWS_PER_CONNECTION = 100_000
VARIANTS = {
    "plain": "SELECT 1 FROM done",
    "notify": "SELECT pg_notify('bench_notify', md5(k)) FROM done",
}


def backend_cpu(pids: list[int]) -> float:
    """User+sys CPU seconds of the server processes ``pids``."""
    return sum(process_cpu(pid) for pid in pids)


async def run_variant(
    conns: list[asyncpg.Connection], pids: list[int], tail: str, seconds: float
) -> tuple[float, float]:
    """Completions a second and backend CPU microseconds a completion."""
    sql = f"WITH done AS (UPDATE {SCHEMA}.rows SET v = v + 1 WHERE k = $1 RETURNING k) {tail}"
    count = 0
    stop = time.monotonic() + seconds

    async def worker(n: int, conn: asyncpg.Connection) -> None:
        nonlocal count
        row = 0
        while time.monotonic() < stop:
            await conn.fetch(sql, f"c{n}-{row % ROWS_PER_CONNECTION}")
            row += 1
            count += 1

    cpu = backend_cpu(pids)
    started = time.monotonic()
    await asyncio.gather(*(worker(n, conn) for n, conn in enumerate(conns)))
    elapsed = time.monotonic() - started
    return count / elapsed, (backend_cpu(pids) - cpu) / count * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    admin = await asyncpg.connect(args.url)
    await admin.execute(
        f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE; CREATE SCHEMA {SCHEMA}; "
        f"CREATE TABLE {SCHEMA}.rows (k text PRIMARY KEY, v int NOT NULL)"
    )
    conns: list[asyncpg.Connection] = []
    try:
        await admin.execute(
            f"INSERT INTO {SCHEMA}.rows SELECT 'c' || c || '-' || r, 0 "
            f"FROM generate_series(0, {args.connections - 1}) c, "
            f"generate_series(0, {ROWS_PER_CONNECTION - 1}) r"
        )
        conns = [await asyncpg.connect(args.url) for _ in range(args.connections)]
        pids = [conn.get_server_pid() for conn in conns]
        await run_variant(conns, pids, VARIANTS["plain"], 1.0)  # warm-up: statements prepared
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in VARIANTS}
        for round_ in range(args.rounds):
            order = list(VARIANTS) if round_ % 2 == 0 else list(reversed(VARIANTS))
            for name in order:
                per_second, us = await run_variant(conns, pids, VARIANTS[name], args.seconds)
                results[name].append((per_second, us))
                print(f"round {round_ + 1} {name:6} {per_second:8.0f}/s {us:6.0f} us", flush=True)
    finally:
        for conn in conns:
            await conn.close()
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.close()
    rate = {name: statistics.median(r for r, _ in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in results.items()}
    print(f"\n| variant | completions/s | backend CPU us a completion | ({args.connections} conns)")
    print("|---|---:|---:|")
    for name in VARIANTS:
        print(f"| {name} | {rate[name]:,.0f} | {cpu[name]:.0f} |")
    print(
        f"\nnotify / plain: throughput {rate['notify'] / rate['plain']:.2f}x, "
        f"backend CPU {cpu['notify'] / cpu['plain']:.2f}x"
    )


if __name__ == "__main__":
    asyncio.run(main())
