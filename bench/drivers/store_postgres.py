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
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.drivers.record import FP, RESPONSE, SCOPE
from bench.harness import cells
from bench.harness.cells import Op
from bench.harness.stores import pg_execute
from oncepay.idempotency.records import ClaimOutcome
from oncepay.idempotency.stores import postgres

SCHEMA = "bench_store_pg"
# Where a revision before the drivers moved imports them from.
MOVED = {"oncepay.idempotency.stores._pgpool": "oncepay._drivers.pgpool"}
STORE_PATH = "src/oncepay/idempotency/stores/postgres.py"
LEASE, TTL = 30.0, 3600.0
WARM_UP = 500  # ops per cell before timing: fills the pool and prepares every statement


def workloads(name: str, store: Any) -> dict[str, Op]:
    """Each op takes a sequence number, unique within the process."""
    run_id = f"{name}-{uuid.uuid4().hex[:8]}"

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


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    impls = cells.implementations(postgres.PostgresStore, args.against, STORE_PATH, MOVED)
    stores = {  # a table each, so neither store's rows bloat the other's
        name: cls(args.url, table=f"{SCHEMA}.rec_{uuid.uuid4().hex[:12]}")
        for name, cls in impls.items()
    }
    try:
        return await cells.measure_stores(stores, seed, workloads, args, WARM_UP)
    finally:
        pg_execute(args.url, f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def parse_args() -> argparse.Namespace:
    url = "postgresql://postgres@127.0.0.1:5432/postgres"
    return cells.store_arguments(__doc__.split("\n\n")[0], url, "postgres.py").parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    pg_execute(arguments.url, f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    result = asyncio.run(main(arguments))
    print(cells.cpu_cells_markdown(result))
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(result, indent=2) + "\n")
