"""Server CPU time per payment against a real ``oncepay serve`` (SQLite or, with ``--backend
postgresql``, a fresh schema on PostgreSQL; the embedded acquirer, one process, no recovery
worker, no access log): what ``bench/tracing/instructions.py`` cannot
see, since it drives the app through httpx's ASGI transport — uvicorn, its event loop
(uvloop or asyncio) and its HTTP parser (httptools or h11).

Each variant is a server started with its own ``oncepay serve`` options (``--loop``,
``--http``) and optionally its own source tree (``PYTHONPATH``, to compare a change against a
copy without it); the variants run in alternating rounds, each round a fresh server and
database, ``--payments`` POST /v1/payments at ``--concurrency`` connections, after a warm-up.
The figure is the server process's user+sys CPU (``/proc/<pid>/stat``) over the measured
payments divided by their number: the load generator's own CPU is not in it, and the machine's
speed drifts less into it than into payments/s. On PostgreSQL, the CPU of the backends serving
the server's connections likewise. Medians over the rounds. ``--profile DIR`` also records
py-spy's raw stacks (``--gil``) of each round's measured payments.

    .venv/bin/python bench/e2e/cpu.py [--rounds 3] [--payments 400] [--concurrency 8] \\
        [--backend sqlite|postgresql] \\
        asyncio="--loop asyncio --http h11" uvloop="--loop uvloop --http httptools" \\
        [before="@/tmp/old/src"]   # a variant: NAME="serve options [@source dir]"
        [--profile DIR]            # py-spy --gil raw stacks of each round's measured payments
        [--spy-mode threads]       # ... or every thread's, by name (some waits count)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu
from bench.harness.processes import free_port, stop_group, wait_port

PG = os.environ.get("ONCEPAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
WARM_UP = 50  # payments before measuring: imports, caches, the first statements prepared
BODY = {"amount": 1250, "currency": "EUR", "payment_method": "pm_card_ok"}


def parse_variant(spec: str) -> tuple[str, list[str], str | None]:
    name, _, rest = spec.partition("=")
    options, _, source = rest.partition("@")
    return name, shlex.split(options), source.strip() or None


async def fire(port: int, api_key: str, count: int, concurrency: int, tag: str) -> None:
    import httpx

    keys = iter(range(count))
    limits = httpx.Limits(max_connections=concurrency)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, headers=headers, timeout=60
    ) as client:

        async def one_connection() -> None:
            for n in keys:
                answer = await client.post(
                    "/v1/payments", json=BODY, headers={"Idempotency-Key": f"{tag}-{n}"}
                )
                if answer.status_code != 201:
                    raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")

        await asyncio.gather(*(one_connection() for _ in range(concurrency)))


def postgres_backends(server: int) -> dict[int, float]:
    """CPU seconds of each PostgreSQL backend serving a connection of the process ``server``
    (found by the client port its command line shows, ``postgres: user db 127.0.0.1(PORT)``,
    among the server's own sockets to port 5432)."""
    sockets = set()
    for fd in Path(f"/proc/{server}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            sockets.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in sockets and remote.endswith(":1538"):  # 5432
                ports.add(int(local.rpartition(":")[2], 16))
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().decode(errors="replace")
            if not command.startswith("postgres:"):
                continue
            port = command.rpartition("(")[2].partition(")")[0]
            if port.isdigit() and int(port) in ports:
                found[int(entry.name)] = process_cpu(int(entry.name))
        except (OSError, ValueError):
            continue  # gone meanwhile
    return found


def round_of(
    options: list[str],
    source: str | None,
    payments: int,
    concurrency: int,
    folder: Path,
    backend: str = "sqlite",
    profile: Path | None = None,
    spy_mode: str = "gil",
) -> tuple[float, float]:
    """Server CPU milliseconds per payment, one fresh server and database, and its PostgreSQL
    backends' (0 on SQLite)."""
    schema = f"oncepay_cpu_{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "ONCEPAY_DATABASE_URL": (
            f"sqlite:///{folder}/p.db" if backend == "sqlite" else f"{PG}?schema={schema}"
        ),
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder}/a.db",
        "ONCEPAY_RUN_WORKER": "false",
    }
    if source is not None:
        env["PYTHONPATH"] = source
    created = subprocess.run(
        [sys.executable, "-m", "oncepay", "merchants", "create", "bench"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = json.loads(created.stdout)["api_key"]
    port = free_port()
    command = [sys.executable, "-m", "oncepay", "serve", "--port", str(port), "--quiet"]
    server = subprocess.Popen(
        [*command, "--no-worker", *options],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server)
        asyncio.run(fire(port, api_key, WARM_UP, concurrency, "warm"))
        spy = None
        if profile is not None:  # py-spy on the measured payments (its own CPU is not counted)
            # --gil samples the GIL's holder, also while the OS has it off the CPU (inside a
            # send() on this VM, say); "threads" samples every thread, by name, that py-spy
            # does not take for idle (it takes some waits for work: read a thread's share
            # against its wall clock, not as CPU).
            how = ["--gil"] if spy_mode == "gil" else ["--threads"]
            spy_args = ["record", *how, "-r", "500", "--format", "raw", "-o", str(profile)]
            spy = subprocess.Popen(
                ["py-spy", *spy_args, "-p", str(server.pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # attached before the first measured payment
        pg_before = postgres_backends(server.pid) if backend != "sqlite" else {}
        before = process_cpu(server.pid)
        asyncio.run(fire(port, api_key, payments, concurrency, "run"))
        used = process_cpu(server.pid) - before
        pg_after = postgres_backends(server.pid) if backend != "sqlite" else {}
        # backends alive at both ends (the pools open theirs during the warm-up)
        pg_used = sum(pg_after[pid] - cpu for pid, cpu in pg_before.items() if pid in pg_after)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
    finally:
        stop_group(server)
        if backend != "sqlite":
            drop = ["psql", PG, "-qc", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE']
            subprocess.run(drop, capture_output=True, check=False)
    return used * 1000 / payments, pg_used * 1000 / payments


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--payments", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backend", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument(
        "--profile", type=Path, help="a folder: py-spy's raw stacks of each round go there"
    )
    parser.add_argument(
        "--spy-mode",
        choices=["gil", "threads"],
        default="gil",
        help="py-spy's samples: of the GIL's holder (default), or of every thread by name",
    )
    parser.add_argument("variants", nargs="+", help='NAME="serve options [@source dir]"')
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    figures: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    pg_figures: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for n in range(args.rounds):
        for name, options, source in variants:  # alternating: drift hits every variant
            with tempfile.TemporaryDirectory(prefix="oncepay-cpu-") as folder:
                started = time.perf_counter()
                profile = None
                if args.profile is not None:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    profile = args.profile / f"{name}-{n + 1}.txt"
                ms, pg_ms = round_of(
                    options,
                    source,
                    args.payments,
                    args.concurrency,
                    Path(folder),
                    args.backend,
                    profile,
                    args.spy_mode,
                )
                took = time.perf_counter() - started
            figures[name].append(ms)
            pg_figures[name].append(pg_ms)
            pg = f", its PostgreSQL backends {pg_ms:.2f} ms" if args.backend != "sqlite" else ""
            print(f"round {n + 1} {name}: {ms:.2f} ms CPU a payment{pg} ({took:.0f} s)", flush=True)
    for name, values in figures.items():
        print(f"{name}: median {statistics.median(values):.2f} ms CPU a payment {values}")
        if args.backend != "sqlite":
            pg_values = pg_figures[name]
            median = statistics.median(pg_values)
            print(f"{name}: PostgreSQL backends' median {median:.2f} ms CPU a payment {pg_values}")


if __name__ == "__main__":
    main()
