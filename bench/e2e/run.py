"""End-to-end benchmark of the payments service: ``POST /v1/payments`` (automatic capture, no
faults, 32 concurrent connections) against a real ``oncepay serve``, with the idempotency
records in the same database, in one run:

* SQLite, 1 API process, embedded acquirer;
* PostgreSQL, 1 and 2 API processes, embedded acquirer;
* the same with a Redis fast tier.

Reports payments/s, p50/p99 latency (wrk's), and the peak RSS of each API process (VmHWM),
and checks afterwards that the ledger balances. Results go to bench/e2e/RESULTS.md and
results.json. Needs wrk (``make bench`` installs it). On this 2-core machine the server
processes, PostgreSQL and wrk share both cores: nothing is pinned, and the figures say so.

    .venv/bin/python bench/e2e/run.py [--seconds 15] [--only sqlite-1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.load import Load, errors, wrk
from bench.harness.processes import (
    children,
    free_port,
    peak_rss_mb,
    stop_group,
    wait_port,
)
from bench.harness.report import markdown_table

HERE = Path(__file__).resolve().parent
PG = os.environ.get("ONCEPAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("ONCEPAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CONNECTIONS = 32
LOAD = Load(connections=CONNECTIONS, threads=2, latency=True)
WARM_UP = 3  # seconds of load before measuring: connections, caches
TARGETS = {"sqlite-1": 500, "postgres-2": 800}  # payments/s, from the issue
P99_TARGET_MS = 50
RSS_TARGET_MB = 200

CELLS = {
    "sqlite-1": ("sqlite", 1, False),
    "postgres-1": ("postgres", 1, False),
    "postgres-2": ("postgres", 2, False),
    "sqlite-1+redis": ("sqlite", 1, True),
    "postgres-2+redis": ("postgres", 2, True),
}


Completed = subprocess.CompletedProcess[str]


def oncepay(*args: str, env: dict[str, str], check: bool = True) -> Completed:
    """Run an ``oncepay`` command with the cell's settings."""
    command = [sys.executable, "-m", "oncepay", *args]
    environ = {**os.environ, **env}
    return subprocess.run(command, env=environ, capture_output=True, text=True, check=check)


def environment(name: str, schema: str, folder: Path) -> dict[str, str]:
    """The service's settings for one cell: its databases, processes and Redis tier."""
    backend, processes, redis = CELLS[name]
    db = f"sqlite:///{folder / name}.db" if backend == "sqlite" else f"{PG}?schema={schema}"
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / name}-acquirer.db",
        "ONCEPAY_WORKERS": str(processes),
        "ONCEPAY_RUN_WORKER": "false",
    }
    if redis:
        env["ONCEPAY_REDIS_URL"] = f"{REDIS}?prefix=oncepay-bench:{schema}:"
    return env


def load(port: int, api_key: str, seconds: int, schema: str) -> dict[str, Any]:
    """Warm up, then measure: wrk's summary."""
    url, script = f"http://127.0.0.1:{port}", HERE / "payment.lua"
    wrk(LOAD, url, script, WARM_UP, api_key, f"warm-{schema}")
    return wrk(LOAD, url, script, seconds, api_key, f"run-{schema}")


def peak_rss(server: int, processes: int) -> list[float]:
    """Each API process's peak RSS (MB): the server's, or its workers' when it forked them."""
    pids = children(server) if processes > 1 else [server]
    return [round(peak_rss_mb(pid), 1) for pid in pids]


def cell(name: str, seconds: int, folder: Path) -> dict[str, Any]:
    backend, processes, _redis = CELLS[name]
    schema = f"oncepay_bench_{uuid.uuid4().hex[:8]}"
    env = environment(name, schema, folder)
    api_key = json.loads(oncepay("merchants", "create", "bench", env=env).stdout)["api_key"]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "oncepay", "serve", "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server)
        time.sleep(1.0 * processes)  # every worker process up and migrated
        result = load(port, api_key, seconds, schema)
        rss = peak_rss(server.pid, processes)
    finally:
        stop_group(server)
    balanced = oncepay("ledger", "check", env=env, check=False).returncode == 0
    if backend == "postgres":
        drop = ["psql", PG, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE']
        subprocess.run(drop, capture_output=True, check=False)
    return {
        "cell": name,
        "payments_per_s": round(result["requests"] / (result["duration_us"] / 1e6), 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "errors": errors(result),
        "peak_rss_mb": rss,
        "ledger_ok": balanced,
    }


HEADERS: tuple[str, ...] = (
    "cell",
    "payments/s",
    "p50 ms",
    "p99 ms",
    "peak RSS per API process (MB)",
    "errors",
)
HEADERS += ("ledger",)


def line(r: dict[str, Any]) -> tuple[str, ...]:
    rss = ", ".join(str(x) for x in r["peak_rss_mb"])
    ledger = "balances" if r["ledger_ok"] else "VIOLATED"
    figures = (r["payments_per_s"], r["p50_ms"], r["p99_ms"], rss, r["errors"], ledger)
    return (r["cell"], *map(str, figures))


def render(rows: list[dict[str, Any]], seconds: int) -> str:
    intro = (
        f"`bench/e2e/run.py`, {time.strftime('%Y-%m-%d')}, this project's 2-core machine: wrk "
        f"(2 threads, {CONNECTIONS} connections, {seconds} s after a {WARM_UP} s warm-up), "
        "automatic capture, embedded simulated acquirer, no faults, idempotency records in the "
        "payments database. Server, PostgreSQL and wrk share both cores (nothing pinned)."
    )
    targets = (
        f"Targets: {TARGETS['sqlite-1']} payments/s on sqlite-1, {TARGETS['postgres-2']} on "
        f"postgres-2, p99 under {P99_TARGET_MS} ms, under {RSS_TARGET_MB} MB per process."
    )
    table = markdown_table(HEADERS, [line(r) for r in rows], right={1, 2, 3, 5})
    title = "# End-to-end benchmark: POST /v1/payments"
    return "\n".join([title, "", intro, "", table, "", targets]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--only", action="append", choices=sorted(CELLS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for name in args.only or list(CELLS):
            rows.append(cell(name, args.seconds, Path(folder)))
            print(json.dumps(rows[-1]), flush=True)
    (HERE / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (HERE / "RESULTS.md").write_text(render(rows, args.seconds))
    print(render(rows, args.seconds))


if __name__ == "__main__":
    main()
