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
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
PG = os.environ.get("ONCEPAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("ONCEPAY_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CONNECTIONS = 32
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def oncepay(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "oncepay", *args], env={**os.environ, **env},
                          capture_output=True, text=True, check=True)  # fmt: skip


def peak_rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def wrk(port: int, api_key: str, seconds: int, prefix: str) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t", "2", "-c", str(CONNECTIONS), "-d", f"{seconds}s", "--latency",
         "-s", str(HERE / "payment.lua"), f"http://127.0.0.1:{port}", "--", api_key, prefix],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    line = next(x for x in out.stdout.splitlines() if x.startswith("E2E_JSON "))
    result: dict[str, Any] = json.loads(line.removeprefix("E2E_JSON "))
    return result


def cell(name: str, seconds: int, folder: Path) -> dict[str, Any]:
    backend, processes, redis = CELLS[name]
    schema = f"oncepay_bench_{uuid.uuid4().hex[:8]}"
    db = f"sqlite:///{folder / name}.db" if backend == "sqlite" else f"{PG}?schema={schema}"
    env = {
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / name}-acquirer.db",
        "ONCEPAY_WORKERS": str(processes),
        "ONCEPAY_RUN_WORKER": "false",
    }
    if redis:
        env["ONCEPAY_REDIS_URL"] = f"{REDIS}?prefix=oncepay-bench:{schema}:"
    api_key = json.loads(oncepay("merchants", "create", "bench", env=env).stdout)["api_key"]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "oncepay", "serve", "--port", str(port)],
        env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        wait_port(port, server)
        time.sleep(1.0 * processes)  # every worker process up and migrated
        wrk(port, api_key, 3, f"warm-{schema}")  # warm-up: connections, caches, JIT-less
        result = wrk(port, api_key, seconds, f"run-{schema}")
        pids = children(server.pid) if processes > 1 else [server.pid]
        rss = [round(peak_rss_mb(pid), 1) for pid in pids]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    check = subprocess.run([sys.executable, "-m", "oncepay", "ledger", "check"],
                           env={**os.environ, **env}, capture_output=True, text=True,
                           check=False)  # fmt: skip
    if backend == "postgres":
        subprocess.run(["psql", PG, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'],
                       capture_output=True, check=False)  # fmt: skip
    errors = sum(v for k, v in result.items() if k.startswith("err_"))
    return {
        "cell": name,
        "payments_per_s": round(result["requests"] / (result["duration_us"] / 1e6), 1),
        "p50_ms": round(result["p50_us"] / 1000, 2),
        "p99_ms": round(result["p99_us"] / 1000, 2),
        "errors": errors,
        "peak_rss_mb": rss,
        "ledger_ok": check.returncode == 0,
    }


def render(rows: list[dict[str, Any]], seconds: int) -> str:
    lines = [
        "# End-to-end benchmark: POST /v1/payments",
        "",
        f"`bench/e2e/run.py`, {time.strftime('%Y-%m-%d')}, this project's 2-core machine: wrk "
        f"(2 threads, {CONNECTIONS} connections, {seconds} s after a 3 s warm-up), automatic "
        "capture, embedded simulated acquirer, no faults, idempotency records in the payments "
        "database. Server, PostgreSQL and wrk share both cores (nothing pinned).",
        "",
        "| cell | payments/s | p50 ms | p99 ms | peak RSS per API process (MB) | errors | ledger |",
        "|---|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        rss = ", ".join(str(x) for x in r["peak_rss_mb"])
        ledger = "balances" if r["ledger_ok"] else "VIOLATED"
        lines.append(f"| {r['cell']} | {r['payments_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{rss} | {r['errors']} | {ledger} |")  # fmt: skip
    lines += ["", f"Targets: {TARGETS['sqlite-1']} payments/s on sqlite-1, "
              f"{TARGETS['postgres-2']} on postgres-2, p99 under {P99_TARGET_MS} ms, "
              f"under {RSS_TARGET_MB} MB per process."]  # fmt: skip
    return "\n".join(lines) + "\n"


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
