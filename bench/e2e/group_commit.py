"""SQLite ``synchronous=FULL`` against group commit (the default), side by side in one run, in
alternating order (FULL first in odd rounds, group first in even ones):

* **commits/s**: 32 tasks in one process, each a loop of ``write()`` transactions inserting one
  small row, for ``--seconds``; the process pinned to core 0. Reports commits/s, fsyncs per
  commit and the process's CPU per commit.
* **payments/s**: ``oncepay serve`` (embedded acquirer, both databases in the same mode) pinned
  to core 0, wrk -t2 -c32 pinned to core 1 with ``payment.lua``; payments/s, p50/p99, server
  CPU per payment, errors.

    .venv/bin/python bench/e2e/group_commit.py [--rounds 3] [--seconds 10] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench.harness.cpu import process_cpu
from bench.harness.load import Load, errors, rate, wrk
from bench.harness.processes import stop_group, wait_port
from oncepay.chaos.stack import free_port

HERE = Path(__file__).resolve().parent
MODES = {"full": "?synchronous=FULL", "group": ""}
WRITERS = 32  # as many as wrk's connections
LOAD = Load(connections=32, threads=2, cpu="1")
WARM_UP = 3  # seconds of load before measuring: connections, caches


async def commit_loop(path: str, suffix: str, seconds: float) -> dict[str, Any]:
    from sqlalchemy import text

    from oncepay.storage.db import Database, write

    db = Database.from_url(f"sqlite:///{path}{suffix}")
    async with write(db) as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)"))
    count, stop = 0, time.monotonic() + seconds

    async def writer() -> None:
        nonlocal count
        while time.monotonic() < stop:
            async with write(db) as conn:
                await conn.execute(text("INSERT INTO t (body) VALUES (:b)"), {"b": "x" * 200})
            count += 1

    cpu, start = time.process_time(), time.monotonic()
    await asyncio.gather(*(writer() for _ in range(WRITERS)))
    wall, cpu = time.monotonic() - start, time.process_time() - cpu
    syncs = db.group.syncs if db.group is not None else count  # FULL: one fsync per COMMIT
    await db.aclose()
    return {
        "commits_per_s": round(count / wall, 1),
        "fsyncs_per_commit": round(syncs / count, 3),
        "cpu_ms_per_commit": round(cpu / count * 1000, 3),
    }


def commits(mode: str, seconds: float, folder: Path) -> dict[str, Any]:
    """One commits/s cell in a process of its own, pinned to core 0."""
    path = folder / f"commits-{mode}-{uuid.uuid4().hex[:6]}.db"
    code = (
        "import asyncio, json, sys; sys.path.insert(0, sys.argv[4]); "
        "from bench.e2e.group_commit import commit_loop; "
        "print(json.dumps(asyncio.run(commit_loop(sys.argv[1], sys.argv[2], float(sys.argv[3])))))"
    )
    command = ["taskset", "-c", "0", sys.executable, "-c", code, str(path), MODES[mode]]
    out = subprocess.run(
        [*command, str(seconds), str(HERE.parents[1])], capture_output=True, text=True, check=True
    )
    return {"bench": "commits", "mode": mode, **json.loads(out.stdout)}


def payments(mode: str, seconds: float, folder: Path) -> dict[str, Any]:
    """One payments/s cell: oncepay serve on core 0, wrk on core 1."""
    tag = f"{mode}-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "ONCEPAY_DATABASE_URL": f"sqlite:///{folder / tag}.db{MODES[mode]}",
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / tag}-acq.db{MODES[mode]}",
        "ONCEPAY_WORKERS": "1",
        "ONCEPAY_RUN_WORKER": "false",
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
    command = ["taskset", "-c", "0", sys.executable, "-m", "oncepay", "serve", "--quiet"]
    server = subprocess.Popen(
        [*command, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server)
        url, script = f"http://127.0.0.1:{port}", HERE / "payment.lua"
        wrk(LOAD, url, script, WARM_UP, api_key, f"warm-{tag}")
        cpu = process_cpu(server.pid)
        summary = wrk(LOAD, url, script, seconds, api_key, f"run-{tag}")
        cpu = process_cpu(server.pid) - cpu
    finally:
        stop_group(server)
    return {
        "bench": "payments",
        "mode": mode,
        "payments_per_s": round(rate(summary), 1),
        "p50_ms": round(summary["p50_us"] / 1000, 1),
        "p99_ms": round(summary["p99_us"] / 1000, 1),
        "server_cpu_ms_per_payment": round(cpu / max(1, summary["requests"]) * 1000, 2),
        "errors": errors(summary),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "group_commit.json")
    args = parser.parse_args()
    found: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oncepay-group-") as tmp:
        for r in range(args.rounds):
            order = ["full", "group"] if r % 2 == 0 else ["group", "full"]
            for bench in (commits, payments):
                for mode in order:
                    result = {"round": r + 1, "load1": round(os.getloadavg()[0], 2)}
                    result.update(bench(mode, args.seconds, Path(tmp)))
                    print(json.dumps(result), flush=True)
                    found.append(result)
                    args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
