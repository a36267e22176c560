"""PostgresStore microbenchmark: client CPU per store call, before and after a driver change.

    python bench/drivers/store_postgres.py                       # the installed store only
    python bench/drivers/store_postgres.py --against 5580947     # and the store of a revision

Two workloads, each at concurrency 1 and 32 (tasks on one event loop, one store):

* **replay**: ``store.claim`` of one completed key (200-byte body), N times. The claim
  function answers from its first, lock-free read: the commonest retry.
* **claim+complete**: a new key claimed, then completed, N times (two round trips per op).

CPU us/op = ``time.process_time()`` / N, the whole process (server CPU is not counted); user
and sys split it as ``getrusage`` does. sys is mostly the kernel's loopback work for each round
trip, which moves a lot with machine load; user is the store's and the driver's own code.
``--against REV`` loads ``postgres.py`` as it was at a git revision next to the installed one,
so both stores run in the same process, in the same rounds: the cells take turns, each run in
a rotated order, so that background load on a shared machine hits both alike. Each cell is
warmed up first at its own concurrency, so every pooled connection has prepared its
statements. The reported figure is the median over ``--runs``; spread = (max - min) / median.

Writes only the schema ``bench_store_pg`` on ``--url`` and drops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oncepay.idempotency.records import ClaimOutcome, StoredResponse
from oncepay.idempotency.stores import postgres

SCHEMA = "bench_store_pg"
STORE_PATH = "src/oncepay/idempotency/stores/postgres.py"
SCOPE = "merchant-bench"
FP = "f" * 64
BODY = b'{"id":"pay_0123456789","status":"succeeded","amount":4200}'.ljust(200, b" ")
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), BODY)
LEASE, TTL = 30.0, 3600.0
WARM_UP = 500  # ops per cell before timing: fills the pool and prepares every statement

Op = Callable[[int], Awaitable[None]]


@dataclass
class Cell:
    impl: str
    workload: str
    concurrency: int
    ops: int
    cpu_us: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    ops_per_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        median = statistics.median(self.cpu_us)
        return {
            "impl": self.impl,
            "workload": self.workload,
            "conc": self.concurrency,
            "ops": self.ops,
            "cpu_us_per_op": round(median, 1),
            "user_us": round(statistics.median(self.user_us), 1),
            "sys_us": round(statistics.median(self.sys_us), 1),
            "ops_per_s": round(statistics.median(self.ops_per_s)),
            "spread": round((max(self.cpu_us) - min(self.cpu_us)) / median, 2),
            "runs": [round(v, 1) for v in self.cpu_us],
        }


def load_store_class(revision: str) -> type[Any]:
    """``PostgresStore`` from ``postgres.py`` as it was at ``revision``."""
    root = Path(__file__).resolve().parents[2]
    source = subprocess.run(
        ["git", "show", f"{revision}:{STORE_PATH}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "postgres_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"oncepay_bench_store_{revision}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    store_class: type[Any] = module.PostgresStore
    return store_class


def workloads(store: Any, run_id: str) -> dict[str, Op]:
    """Each op takes a sequence number, unique within the process."""

    async def replay(_: int) -> None:
        claim = await store.claim(SCOPE, "replayed", FP, now=time.time(), lease=LEASE, ttl=TTL)
        assert claim.outcome is ClaimOutcome.EXISTING

    async def claim_and_complete(n: int) -> None:
        key = f"{run_id}-{n}"
        claim = await store.claim(SCOPE, key, FP, now=time.time(), lease=LEASE, ttl=TTL)
        assert claim.outcome is ClaimOutcome.CREATED
        await store.complete(SCOPE, key, claim.record.fence, RESPONSE, now=time.time())

    return {"replay": replay, "claim+complete": claim_and_complete}


async def seed(store: Any) -> None:
    claim = await store.claim(SCOPE, "replayed", FP, now=time.time(), lease=LEASE, ttl=TTL)
    await store.complete(SCOPE, "replayed", claim.record.fence, RESPONSE, now=time.time())


async def drive(op: Op, ops: int, concurrency: int, counter: itertools.count[int]) -> float:
    """Run ``ops`` operations on ``concurrency`` tasks; returns wall seconds."""

    async def worker(share: int) -> None:
        for _ in range(share):
            await op(next(counter))

    shares = [ops // concurrency + (i < ops % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(share) for share in shares))
    return time.perf_counter() - started


async def measure(cell: Cell, op: Op, counter: itertools.count[int]) -> None:
    await drive(op, WARM_UP, cell.concurrency, counter)
    usage, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    wall = await drive(op, cell.ops, cell.concurrency, counter)
    cpu = time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_SELF)
    cell.cpu_us.append(cpu / cell.ops * 1e6)
    cell.user_us.append((after.ru_utime - usage.ru_utime) / cell.ops * 1e6)
    cell.sys_us.append((after.ru_stime - usage.ru_stime) / cell.ops * 1e6)
    cell.ops_per_s.append(cell.ops / wall)


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    impls: dict[str, type[Any]] = {"current": postgres.PostgresStore}
    if args.against:
        impls = {args.against: load_store_class(args.against), **impls}
    stores = {  # a table each, so neither store's rows bloat the other's
        name: cls(args.url, table=f"{SCHEMA}.rec_{uuid.uuid4().hex[:12]}")
        for name, cls in impls.items()
    }
    counter = itertools.count()
    try:
        for store in stores.values():
            await seed(store)
        ops = {
            name: workloads(store, f"{name}-{uuid.uuid4().hex[:8]}")
            for name, store in stores.items()
        }
        sizes = {"replay": args.replays, "claim+complete": args.cycles}
        cells = [
            Cell(name, workload, conc, sizes[workload])
            for name in stores
            for workload in sizes
            for conc in args.concurrency
        ]
        for run in range(args.runs):
            shift = run % len(cells)
            for cell in cells[shift:] + cells[:shift]:
                await measure(cell, ops[cell.impl][cell.workload], counter)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        for store in stores.values():
            await store.aclose()
        await drop_schema(args.url)
    return [cell.row() for cell in cells]


async def drop_schema(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    finally:
        await conn.close()


async def create_schema(url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    finally:
        await conn.close()


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| store | workload | conc | ops | CPU us/op | user | sys | ops/s | spread | runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['impl']} | {r['workload']} | {r['conc']} | {r['ops']:,} | {r['cpu_us_per_op']} "
        f"| {r['user_us']} | {r['sys_us']} | {r['ops_per_s']:,} | {r['spread']:.0%} "
        f"| {', '.join(map(str, r['runs']))} |"
        for r in rows
    ]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--against", metavar="REV", help="also run postgres.py of this revision")
    parser.add_argument("--replays", type=int, default=20_000)
    parser.add_argument("--cycles", type=int, default=10_000, help="claim+complete ops")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    asyncio.run(create_schema(arguments.url))
    result = asyncio.run(main(arguments))
    print(markdown(result))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
