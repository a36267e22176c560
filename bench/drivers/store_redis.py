"""RedisStore microbenchmark: client CPU per store call, before and after a driver change.

    python bench/drivers/store_redis.py                     # the installed store only
    python bench/drivers/store_redis.py --against HEAD      # and redis.py of a revision
    python bench/drivers/store_redis.py --against HEAD --uvloop

Two workloads, each at concurrency 1 and 32 (tasks on one event loop, one store):

* **replay**: ``store.claim`` of one completed key (200-byte body): one EVALSHA whose reply is
  the whole record, the commonest retry.
* **claim+complete**: a new request's two round trips, a claim that creates the record and the
  completion that stores its response. Keys come from a pool of ``KEY_POOL``, each use a
  generation later on the engine's clock, so every claim finds the previous record expired and
  creates a new one (what a new key costs the client, without filling the shared server).

CPU us/op = ``time.process_time()`` / N, the whole process (server CPU is not counted); user and
sys split it as ``getrusage`` does. sys is mostly the kernel's loopback work per round trip and
moves a lot with machine load; user is the store's and the driver's own code. ``--against REV``
loads ``redis.py`` as it was at a git revision next to the installed one (at 5580947 and before:
on redis-py), so both stores run in the same process, in the same rounds: the cells take turns,
each run in a rotated order, so that background load on a shared machine hits both alike. Each
cell is warmed up first (connections open, scripts cached). The reported figure is the median
over ``--runs``; spread = (max - min) / median.

Writes only keys under ``oncepay:bench:store-redis:`` on ``--url`` and deletes them at the end.
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

import redis

from oncepay.idempotency.records import ClaimOutcome, StoredResponse
from oncepay.idempotency.stores import redis as redis_store

PREFIX = "oncepay:bench:store-redis:"
STORE_PATH = "src/oncepay/idempotency/stores/redis.py"
SCOPE = "merchant-bench"
FP = "f" * 64
BODY = b'{"id":"pay_0123456789","status":"succeeded","amount":4200}'.ljust(200, b" ")
RESPONSE = StoredResponse(201, (("content-type", "application/json"),), BODY)
# Any lease works (nothing expires mid-op); the TTL is also each record's real PEXPIRE, so a
# short one lets the shared server drop whatever a crashed run leaves behind within minutes.
LEASE, TTL = 30.0, 600.0
# The engine's clock for the workloads: fixed, so no run depends on the wall clock.
EPOCH = 1_700_000_000.0
# Keys the claim+complete workload cycles through: far more than the ops in flight (32), so no
# two concurrent ops share a key, and few enough that the shared server holds at most a few MB.
KEY_POOL = 4096
WARM_UP = 500  # ops per cell before timing: opens connections and caches the scripts

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
    """``RedisStore`` from ``redis.py`` as it was at ``revision``."""
    root = Path(__file__).resolve().parents[2]
    source = subprocess.run(
        ["git", "show", f"{revision}:{STORE_PATH}"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "redis_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"oncepay_bench_redis_{revision}", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    store_class: type[Any] = module.RedisStore
    return store_class


def workloads(store: Any) -> dict[str, Op]:
    """Each op takes a sequence number, unique and increasing within the process."""

    async def replay(_: int) -> None:
        claim = await store.claim(SCOPE, "replayed", FP, now=EPOCH, lease=LEASE, ttl=TTL)
        assert claim.outcome is ClaimOutcome.EXISTING

    async def claim_and_complete(n: int) -> None:
        key, now = f"cycle-{n % KEY_POOL}", EPOCH + (n // KEY_POOL + 1) * 2 * TTL
        claim = await store.claim(SCOPE, key, FP, now=now, lease=LEASE, ttl=TTL)
        assert claim.outcome is ClaimOutcome.CREATED, claim.outcome
        await store.complete(SCOPE, key, claim.record.fence, RESPONSE, now=now)

    return {"replay": replay, "claim+complete": claim_and_complete}


async def seed(store: Any) -> None:
    claim = await store.claim(SCOPE, "replayed", FP, now=EPOCH, lease=LEASE, ttl=TTL)
    await store.complete(SCOPE, "replayed", claim.record.fence, RESPONSE, now=EPOCH)


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
    impls: dict[str, type[Any]] = {"current": redis_store.RedisStore}
    if args.against:
        impls = {args.against: load_store_class(args.against), **impls}
    stores = {  # a key space each, so neither store's records meet the other's
        name: cls.from_url(args.url, prefix=f"{PREFIX}{uuid.uuid4().hex[:12]}:")
        for name, cls in impls.items()
    }
    counter = itertools.count()
    try:
        for store in stores.values():
            await seed(store)
        ops = {name: workloads(store) for name, store in stores.items()}
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
    return [cell.row() for cell in cells]


def delete_keys(url: str) -> None:
    admin = redis.Redis.from_url(url)
    try:
        for name in admin.scan_iter(match=f"{PREFIX}*", count=1000):
            admin.delete(name)
    finally:
        admin.close()


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
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--against", metavar="REV", help="also run redis.py of this revision")
    parser.add_argument("--replays", type=int, default=20_000)
    parser.add_argument("--cycles", type=int, default=10_000, help="claim+complete ops")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--uvloop", action="store_true", help="uvloop instead of asyncio's loop")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    try:
        result = asyncio.run(main(arguments))
    finally:
        delete_keys(arguments.url)
    print(markdown(result))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
