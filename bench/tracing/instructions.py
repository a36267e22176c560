"""Instructions per payment under callgrind, tracing off, at 1 % and at 100 %: deterministic, so
it judges tracing's cost while other work loads the machine (req/s and CPU time in run.py then
scatter by ±20 % a round).

Each variant runs ``payments`` in-process (the app through httpx's ASGI transport, SQLite, the
embedded acquirer, one request at a time) twice, with N1 and N2 payments; the figure is
(Ir(N2) - Ir(N1)) / (N2 - N1), which cancels start-up and imports. The traced variants export
over OTLP/HTTP to a sink process outside valgrind, and flush before exiting, so their export
work is counted too; their batch processor sends a batch when it is full, not every 5 s
(``OTEL_BSP_SCHEDULE_DELAY``: see ``instructions()``). All runs go at once (valgrind's counts
do not depend on the load).

    .venv/bin/python bench/tracing/instructions.py [--n1 20] [--n2 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.processes import free_port, stop_group, wait_port
from bench.tracing.run import SINK

HERE = Path(__file__).resolve().parent
# A PostgreSQL server's URL for the payments database (each run a schema of its own, dropped
# at the end); unset: SQLite.
DATABASE_ENV = "ONCEPAY_INSTRUCTIONS_DATABASE"
# bench/e2e/datalayer.py's --concurrency (requests in flight at once; 1: one after another) and
# --serving (the app as `oncepay serve` builds it: serving_app's heap settled after start-up).
CONCURRENCY_ENV = "ONCEPAY_INSTRUCTIONS_CONCURRENCY"
SERVING_ENV = "ONCEPAY_INSTRUCTIONS_SERVING"
BSP_DELAY_MS = 3_600_000  # see instructions(): no timed export during a run
VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"},
}


async def payments(count: int, folder: str) -> None:
    """``count`` payments, one after another (the measured program)."""
    import httpx

    from oncepay.payments import tracing
    from oncepay.payments.api.app import create_app
    from oncepay.payments.merchants import issue_test_key
    from oncepay.payments.settings import Settings
    from oncepay.payments.storage.migrations import migrated

    # bench/e2e/datalayer.py instructions --backend postgresql (the server's own work is not
    # counted: it runs outside valgrind).
    server = os.environ.get(DATABASE_ENV)
    url = (
        f"{server}?schema=oncepay_in_{uuid.uuid4().hex[:10]}"
        if server
        else f"sqlite:///{folder}/p.db"
    )
    async with migrated(url) as db:
        _, key = await issue_test_key(db)
    settings = Settings(
        database_url=url, acquirer_database_url=f"sqlite:///{folder}/a.db", run_worker=False
    )
    serving = os.environ.get(SERVING_ENV) == "1"
    app = create_app(settings, settle_heap=True) if serving else create_app(settings)
    body = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_ok"}
    keys = iter(range(count))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:

            async def one_after_another() -> None:
                for n in keys:
                    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": f"k{n}"}
                    answer = await client.post("/v1/payments", json=body, headers=headers)
                    assert answer.status_code == 201, answer.text

            in_flight = int(os.environ.get(CONCURRENCY_ENV, "1"))
            await asyncio.gather(*(one_after_another() for _ in range(in_flight)))
    tracing.shutdown()
    if server:
        from sqlalchemy import text

        from oncepay.storage.db import Database

        database = Database.from_url(url)
        async with database.engine.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{database.schema}" CASCADE'))
        await database.aclose()


def instructions(variant: str, count: int, sink: int, out: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if VARIANTS[variant]:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}", **VARIANTS[variant]}
        # A batch leaves when full (512 spans), as it does under load: valgrind runs the
        # program ~50x slower, so the default 5 s timer would fire every few payments and charge
        # each one an HTTP request that, at real rates, 512 spans share.
        env["OTEL_BSP_SCHEDULE_DELAY"] = str(BSP_DELAY_MS)
    # valgrind runs the program ~50x slower: no acquirer call or lease may time out meanwhile.
    env |= {
        "PYTHONHASHSEED": "0",
        "ONCEPAY_ACCESS_LOG": "false",
        "ONCEPAY_ACQUIRER_TIMEOUT": "300",
        "ONCEPAY_LEASE": "250",  # below adaptive_ttl_min (300 s)
    }
    folder = tempfile.mkdtemp(prefix="oncepay-cg-")
    command = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        sys.executable,
        __file__,
        "--run",
        str(count),
        "--folder",
        folder,
    ]
    log = (out.parent / f"{out.name}.log").open("wb")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def _file(variant: str, count: int) -> str:
    return f"{variant.replace('%', 'pct')}-{count}"  # valgrind reads % in a file name


def total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n1", type=int, default=20)
    parser.add_argument("--n2", type=int, default=60)
    parser.add_argument("--run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run is not None:
        asyncio.run(payments(args.run, args.folder))
        return
    with tempfile.TemporaryDirectory() as out:
        sink_port = free_port()
        sink = subprocess.Popen(
            [sys.executable, "-c", SINK, str(sink_port)], start_new_session=True
        )
        try:
            wait_port(sink_port, sink)
            runs = {
                (variant, n): instructions(variant, n, sink_port, Path(out) / _file(variant, n))
                for variant in VARIANTS
                for n in (args.n1, args.n2)
            }
            for (variant, n), process in runs.items():
                if process.wait() != 0:
                    log = (Path(out) / f"{_file(variant, n)}.log").read_text(errors="replace")
                    raise RuntimeError(f"{variant} with {n} payments failed:\n{log[-3000:]}")
        finally:
            stop_group(sink)
        per = {
            v: (total(Path(out) / _file(v, args.n2)) - total(Path(out) / _file(v, args.n1)))
            / (args.n2 - args.n1)
            for v in VARIANTS
        }
    rows = {
        v: {"instructions": round(i), "vs_off": round(i / per["off"], 4)} for v, i in per.items()
    }
    (HERE / "instructions.json").write_text(json.dumps(rows, indent=2) + "\n")
    for variant, row in rows.items():
        print(f"{variant}: {row['instructions']:,} instructions a payment, x{row['vs_off']:.3f}")


if __name__ == "__main__":
    main()
