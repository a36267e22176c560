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
import json
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.drivers.record import FP, RESPONSE, SCOPE
from bench.harness import cells
from bench.harness.cells import Op
from bench.harness.stores import redis_delete
from oncepay.idempotency.records import ClaimOutcome
from oncepay.idempotency.stores import redis as redis_store

PREFIX = "oncepay:bench:store-redis:"
# Where a revision before the drivers moved imports them from.
MOVED = {"oncepay.idempotency.stores._resp": "oncepay._drivers.resp"}
STORE_PATH = "src/oncepay/idempotency/stores/redis.py"
# Any lease works (nothing expires mid-op); the TTL is also each record's real PEXPIRE, so a
# short one lets the shared server drop whatever a crashed run leaves behind within minutes.
LEASE, TTL = 30.0, 600.0
# The engine's clock for the workloads: fixed, so no run depends on the wall clock.
EPOCH = 1_700_000_000.0
# Keys the claim+complete workload cycles through: far more than the ops in flight (32), so no
# two concurrent ops share a key, and few enough that the shared server holds at most a few MB.
KEY_POOL = 4096
WARM_UP = 500  # ops per cell before timing: opens connections and caches the scripts


def workloads(_name: str, store: Any) -> dict[str, Op]:
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


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    impls = cells.implementations(redis_store.RedisStore, args.against, STORE_PATH, MOVED)
    stores = {  # a key space each, so neither store's records meet the other's
        name: cls.from_url(args.url, prefix=f"{PREFIX}{uuid.uuid4().hex[:12]}:")
        for name, cls in impls.items()
    }
    return await cells.measure_stores(stores, seed, workloads, args, WARM_UP)


def parse_args() -> argparse.Namespace:
    parser = cells.store_arguments(__doc__.split("\n\n")[0], "redis://127.0.0.1:6379/0", "redis.py")
    parser.add_argument("--uvloop", action="store_true", help="uvloop instead of asyncio's loop")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    try:
        result = asyncio.run(main(arguments))
    finally:
        redis_delete(arguments.url, PREFIX)
    print(cells.cpu_cells_markdown(result))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
