"""Server CPU a payment: a real ``oncepay serve`` (embedded acquirer, no worker) per source
tree, ``--payments`` POST /v1/payments at ``--concurrency`` after a warm-up, the server's CPU
time from /proc/<pid>/stat divided by the payments. Trees alternate round by round (the
machine's speed drifts; compare within a round), so each figure is a pair from one run.

    .venv/bin/python bench/e2e/servercpu.py --src before=/tmp/a/src --src after=src \\
        [--backend sqlite|postgresql] [--payments 300] [--concurrency 8] [--rounds 3]

A tree is a ``src`` folder (e.g. ``git archive <commit> src | tar -x -C /tmp/a``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.processes import free_port, stop_group, wait_port

PG = os.environ.get("ONCEPAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


async def pay(port: int, api_key: str, count: int, concurrency: int, prefix: str) -> None:
    import httpx

    body = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_ok"}
    keys = iter(range(count))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits) as client:

        async def worker() -> None:
            for n in keys:
                headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": f"{prefix}{n}"}
                answer = await client.post("/v1/payments", json=body, headers=headers, timeout=60)
                assert answer.status_code == 201, answer.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def one(src: str, backend: str, payments: int, concurrency: int, folder: Path) -> float:
    schema = f"oncepay_cpu_{uuid.uuid4().hex[:8]}"
    name = uuid.uuid4().hex[:8]
    db = f"sqlite:///{folder / name}.db" if backend == "sqlite" else f"{PG}?schema={schema}"
    env = {
        **os.environ,
        "PYTHONPATH": src,
        "ONCEPAY_DATABASE_URL": db,
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / name}-acquirer.db",
        "ONCEPAY_RUN_WORKER": "false",
        "ONCEPAY_ACCESS_LOG": "false",
    }
    created = subprocess.run(
        [sys.executable, "-m", "oncepay", "merchants", "create", "bench"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = json.loads(created.stdout)["api_key"]
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "oncepay", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server, timeout=120)
        asyncio.run(pay(port, api_key, 40, concurrency, "warm"))
        before = cpu_seconds(server.pid)
        asyncio.run(pay(port, api_key, payments, concurrency, "k"))
        used = cpu_seconds(server.pid) - before
    finally:
        stop_group(server)
        if backend != "sqlite":
            drop = ["psql", PG, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE']
            subprocess.run(drop, capture_output=True, check=False)
    return used * 1000 / payments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--src", action="append", required=True, help="name=path/to/src")
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--payments", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = dict(item.split("=", 1) for item in args.src)
    figures: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.rounds):
            order = list(trees) if round_ % 2 == 0 else list(reversed(trees))
            for name in order:
                ms = one(trees[name], args.backend, args.payments, args.concurrency, Path(folder))
                figures[name].append(ms)
                print(f"round {round_ + 1} {name}: {ms:.2f} ms server CPU a payment", flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    for name, values in figures.items():
        print(
            f"{stamp} {args.backend} {name}: median {statistics.median(values):.2f} ms "
            f"({', '.join(f'{v:.2f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
