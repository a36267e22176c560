"""OncePay middleware overhead benchmark: a bare Starlette app vs. the same app behind
idempotency layers, under wrk on loopback, one uvicorn worker.

    .venv/bin/python bench/overhead/run.py                 # full run (~6 min, <= 8 with retries)
    .venv/bin/python bench/overhead/run.py --quick         # smoke run (~3 min)
    .venv/bin/python bench/overhead/run.py --json out.json --only bare,oncepay-redis

What is measured.  A *cell* is (variant, path).  Paths:

* ``new``    -- every request carries a fresh ``Idempotency-Key`` (new.lua): claim, run the
  endpoint, store the response;
* ``replay`` -- every request carries the same key and body (replay.lua): after the first
  request (made during the warm-up) each one is answered from the stored record.

For each cell a fresh server is started (``taskset -c 0``, uvicorn, one worker, uvloop,
httptools, no access log; apps.py), checked (two identical requests with one key: does the second
replay the first?), warmed up, then loaded by wrk (``taskset -c 1``, one thread, keep-alive
connections) for ``--seconds``.  The bare app is measured first and again last on each path;
ratios use the mean of the two, and the table shows both so drift is visible.

Drift.  This host's speed moves by up to a third within minutes with nothing else running
(the bare app's CPU per request went 91 -> 120 us between two cells 40 s apart).  ``--rounds
N`` measures each path as bare, variants, bare, variants, ..., bare: every variant cell is
divided by the mean of the two bare cells beside it, and a second table gives the median (and
range) of those paired ratios over the rounds.  ``--alt-src DIR`` adds ``<variant>@alt`` after
every OncePay variant: the same app with ``DIR`` (another checkout's ``src/``) first on the
server's ``PYTHONPATH``, so that two versions of OncePay are compared in one run, side by side.

Pairs.  The drift is faster than a cell: the bare app's throughput moves between ~7,700 and
~12,100 req/s from one second to the next here.  ``--pairs N`` keeps a bare server and a
variant's server up side by side (both on the server CPU; the idle one costs nothing) and loads
them in turn, ``--pair-seconds`` each (default 1), N times, alternating which goes first.  Each
pair gives a ratio measured a second apart; the report gives their median and interquartile
range, and the pooled ratio (all of the variant's requests over all of the bare app's, in equal
time), by throughput and by server CPU per request.

Columns: req/s; p50/p99 latency (wrk's, closed loop, so they mostly reflect queueing at
``--connections`` in-flight requests); ``x bare``: req/s relative to the bare app;
``CPU us/req``: user+sys CPU of the server process (all its threads) per request, and
``x bare CPU``: bare CPU us/req / variant CPU us/req -- the ratio the server's own work implies,
much less sensitive than req/s to other load on this small shared machine; ``srv CPU%``: how
much of its core the server got (100 % = saturated, as it should be; a store the server waits
on, like PostgreSQL, may keep it below); ``other% cpu0/1``: CPU time on the server's core not
used by the server (steal included), and on the load core not used by wrk (the Redis and
PostgreSQL servers are not pinned and mostly run there).  A cell whose server shared its core
more than 15 %, or was not saturated while other work took more than 30 % of the load core, is
measured again once (``--contended``) and the cleaner attempt kept.  ``errors``: non-2xx/3xx
responses, socket errors and timeouts.

Stores: each cell gets its own Redis key prefix (``bench:overhead:<run>:<variant>:<path>``), its
own SQLite file in a temporary directory, and its own PostgreSQL table in the schema
``bench_overhead_<run>``.  Everything is deleted after its cell (Redis) or at the end (SQLite,
PostgreSQL schema), also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

from apps import VARIANTS  # noqa: E402

PATHS = ("new", "replay")
BODY = b'{"amount":1250,"currency":"eur","customer":"cus_0042","description":"overhead bench"}'
REDIS_PEERS = ("powertools-redis", "powertools-redis-inline", "idemkit-redis",
               "fastapi-idempotency-key-redis")  # fmt: skip
PACKAGES = (
    "oncepay", "starlette", "uvicorn", "uvloop", "httptools", "redis", "hiredis", "asyncpg",
    "psycopg", "aws-lambda-powertools", "idemkit", "fastapi-idempotency-key", "boto3", "py-spy",
)  # fmt: skip
TICK = os.sysconf("SC_CLK_TCK")
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


# -- configuration ---------------------------------------------------------------------------------


@dataclass
class Config:
    seconds: float
    warmup: float
    connections: int
    threads: int
    server_cpu: str
    load_cpu: str
    redis: str
    pg: str
    python: str
    alt_src: str = ""
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="oncepay-overhead-")))

    @property
    def redis_base(self) -> str:
        return f"bench:overhead:{self.run_id}:"

    @property
    def pg_schema(self) -> str:
        return f"bench_overhead_{self.run_id}"

    def redis_prefix(self, variant: str, slot: str) -> str:
        return f"{self.redis_base}{variant}:{slot}:"

    def store_url(self, variant: str, slot: str) -> str:
        """The store of one attempt at one cell (``slot``: path and attempt): always empty."""
        base, alt = base_variant(variant), "_alt" if variant.endswith(ALT) else ""
        if base == "oncepay-memory":
            return "memory://"
        if base == "oncepay-sqlite":
            return f"sqlite:///{self.tmp / f'{slot}{alt}.db'}"  # sqlite:////abs/path.db
        if base == "oncepay-postgres":
            sep = "&" if "?" in self.pg else "?"
            return f"{self.pg}{sep}table={self.pg_schema}.idem_{slot.replace('-', '_')}{alt}"
        if base == "oncepay-redis":
            sep = "&" if "?" in self.redis else "?"
            return f"{self.redis}{sep}prefix={self.redis_prefix(variant, slot)}"
        return ""


ALT = "@alt"


def base_variant(variant: str) -> str:
    """The variant of apps.py that ``variant`` serves (``oncepay-redis@alt``: oncepay-redis)."""
    return variant.removesuffix(ALT)


# -- one cell --------------------------------------------------------------------------------------


@dataclass
class Cell:
    variant: str
    path: str
    label: str = ""
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: int = 0
    cpu_us_per_req: float = 0.0
    server_cpu_pct: float = 0.0
    other_on_core_pct: float = 0.0
    steal_pct: float = 0.0
    wrk_cpu_pct: float = 0.0
    other_on_load_core_pct: float = 0.0
    verify: str = ""
    attempts: int = 1
    quiet_wait_s: float = 0.0
    busy_before_pct: float = 0.0
    ratio: float | None = None
    cpu_ratio: float | None = None
    status: str = "ok"
    round: int = 0  # with --rounds: which round (bare cells: the one they open)
    wrk: dict[str, Any] = field(default_factory=dict)
    driver: dict[str, int] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(cfg: Config, variant: str, slot: str) -> Iterator[tuple[int, int, Path]]:
    port = free_port()
    log = cfg.tmp / f"server-{variant}-{slot}.log"
    env = {
        **os.environ,
        "OVERHEAD_VARIANT": base_variant(variant),
        "OVERHEAD_STORE": cfg.store_url(variant, slot),
        "OVERHEAD_REDIS": cfg.redis,
        "OVERHEAD_PREFIX": cfg.redis_prefix(variant, slot),
        "OVERHEAD_STATS": str(cfg.tmp / f"stats-{variant}-{slot}.json"),
        "PYTHONWARNINGS": "ignore",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    if variant.endswith(ALT):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cfg.alt_src, env.get("PYTHONPATH")]))
    cmd = [
        "taskset", "-c", cfg.server_cpu, cfg.python, "-m", "uvicorn", "apps:make_app",
        "--factory", "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--loop", "uvloop", "--http", "httptools", "--no-access-log",
        "--log-level", "warning",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): {last_line(log)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {last_line(log)}")
            time.sleep(0.1)
        yield port, proc.pid, log
    finally:
        stop(proc)


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)  # uvicorn shuts down gracefully: lifespan closes stores
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post(port: int, key: str, body: bytes = BODY) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/charges",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def verify(port: int, variant: str) -> str:
    """Two identical requests under one key: the second must replay the first."""
    key = f"verify-{uuid.uuid4().hex}"
    s1, b1, _ = post(port, key)
    s2, b2, _ = post(port, key)
    if variant == "bare":
        return "n/a" if (s1, s2) == (201, 201) else f"{s1}/{s2}"
    if (s1, s2) == (201, 201) and b1 == b2:
        return "replays"
    if (s1, s2) == (201, 201) and _json_or_none(b1) == _json_or_none(b2) is not None:
        return "replays (re-serialised)"
    return f"{s1} then {s2}" + (" (re-executed)" if b1 != b2 and s2 == 201 else "")


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def wrk(cfg: Config, port: int, script: str, arg: str, seconds: float) -> dict[str, Any]:
    cmd = [
        "taskset", "-c", cfg.load_cpu, "wrk", "-t", str(cfg.threads), "-c", str(cfg.connections),
        "-d", f"{seconds:g}s", "--timeout", "5s", "-s", str(HERE / script),
        f"http://127.0.0.1:{port}", "--", arg,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("OVERHEAD_JSON "):
            return dict(json.loads(line.removeprefix("OVERHEAD_JSON ")))
    raise RuntimeError(f"no summary from wrk:\n{out}")


def proc_cpu(pid: int) -> float:
    """User+sys CPU seconds of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def core_times(cpu: str) -> tuple[float, float, float]:
    """(total, busy, steal) seconds of one CPU since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            v = [int(x) / TICK for x in values]
            total = sum(v[:8])
            idle = v[3] + v[4]
            return total, total - idle, v[7]
    return 0.0, 0.0, 0.0


def busy(cpus: list[str], interval: float = 0.5) -> float:
    """The highest busy share (%) among ``cpus`` over ``interval`` seconds."""
    before = [core_times(c) for c in cpus]
    time.sleep(interval)
    after = [core_times(c) for c in cpus]
    shares = [
        100 * (a[1] - b[1]) / (a[0] - b[0]) if a[0] > b[0] else 0.0
        for a, b in zip(after, before, strict=True)
    ]
    return max(shares)


class Quiet:
    """Before each cell, wait (within a budget) until both CPUs are idle enough: other work
    on this shared machine moves req/s a lot."""

    def __init__(self, cfg: Config, threshold: float, per_cell: float, budget: float) -> None:
        self.cpus = [cfg.server_cpu, cfg.load_cpu]
        self.threshold, self.per_cell, self.budget = threshold, per_cell, budget

    def wait(self) -> tuple[float, float]:
        start = time.monotonic()
        while True:
            share = busy(self.cpus)
            waited = time.monotonic() - start
            if self.threshold <= 0 or share <= self.threshold:
                break
            if waited >= min(self.per_cell, self.budget):
                break
        self.budget = max(0.0, self.budget - waited)
        return waited, share


def measure(cfg: Config, variant: str, path: str, label: str, slot: str) -> Cell:
    cell = Cell(variant, path, label or variant)
    tag = f"{cfg.run_id}-{variant}-{slot}"
    with server(cfg, variant, slot) as (port, pid, _log):
        cell.verify = verify(port, variant)
        script = f"{path}.lua"
        replay_key = f"replay-{tag}"
        wrk(cfg, port, script, replay_key if path == "replay" else f"warm-{tag}", cfg.warmup)
        cpu0, core0, load0 = proc_cpu(pid), core_times(cfg.server_cpu), core_times(cfg.load_cpu)
        wrk0 = children_cpu()
        result = wrk(
            cfg, port, script, replay_key if path == "replay" else f"meas-{tag}", cfg.seconds
        )
        wrk1 = children_cpu()
        cpu1, core1, load1 = proc_cpu(pid), core_times(cfg.server_cpu), core_times(cfg.load_cpu)
    stats = cfg.tmp / f"stats-{variant}-{slot}.json"
    if stats.exists():  # the experiment client's counters, written at shutdown
        counts = json.loads(stats.read_text())
        cell.driver = counts
        if counts.get("writes"):
            cell.verify += f"; {counts['commands'] / counts['writes']:.1f} cmds/write"
    seconds = result["duration_us"] / 1e6
    cell.wrk = result
    cell.requests = result["requests"]
    cell.rps = cell.requests / seconds
    cell.p50_ms = result["p50_us"] / 1000
    cell.p90_ms = result["p90_us"] / 1000
    cell.p99_ms = result["p99_us"] / 1000
    cell.errors = sum(v for k, v in result.items() if k.startswith("err_"))
    cell.cpu_us_per_req = (cpu1 - cpu0) / max(cell.requests, 1) * 1e6
    wall = core1[0] - core0[0]
    if wall > 0:
        cell.server_cpu_pct = 100 * (cpu1 - cpu0) / wall
        # busy includes steal: whatever ran on the server's CPU that was not the server
        other = (core1[1] - core0[1]) - (cpu1 - cpu0)
        cell.other_on_core_pct = max(0.0, 100 * other / wall)
        cell.steal_pct = 100 * (core1[2] - core0[2]) / wall
    load_wall = load1[0] - load0[0]
    if load_wall > 0:
        cell.wrk_cpu_pct = 100 * (wrk1 - wrk0) / load_wall
        cell.other_on_load_core_pct = max(
            0.0, 100 * ((load1[1] - load0[1]) - (wrk1 - wrk0)) / load_wall
        )
    return cell


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# -- stores: preflight and cleanup -----------------------------------------------------------------


def redis_client(cfg: Config) -> Any:
    import redis

    return redis.Redis.from_url(cfg.redis, socket_timeout=5)


def redis_delete(cfg: Config, pattern_prefix: str) -> int:
    client = redis_client(cfg)
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{pattern_prefix}*", count=2000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += client.unlink(*batch)
    client.close()
    return deleted


def pg_exec(cfg: Config, statement: str) -> None:
    import psycopg

    with psycopg.connect(cfg.pg, autocommit=True, connect_timeout=5) as conn:
        conn.execute(statement)


def preflight(cfg: Config, variants: list[str]) -> dict[str, str]:
    """Variants that cannot run here, and why."""
    skipped: dict[str, str] = {}
    redis_needed = [v for v in variants if v.startswith("oncepay-redis") or v in REDIS_PEERS]
    if redis_needed:
        try:
            redis_client(cfg).ping()
        except Exception as exc:
            skipped.update(dict.fromkeys(redis_needed, f"Redis unreachable: {exc}"))
    if "oncepay-postgres" in variants:
        try:
            pg_exec(cfg, f"CREATE SCHEMA {cfg.pg_schema}")
        except Exception as exc:
            skipped["oncepay-postgres"] = f"PostgreSQL unreachable: {exc}"
    modules = {
        "powertools-redis": "aws_lambda_powertools",
        "powertools-redis-inline": "aws_lambda_powertools",
        "idemkit-redis": "idemkit",
        "fastapi-idempotency-key-redis": "fastapi_idempotency_key",
    }
    for variant, module in modules.items():
        if variant in variants and variant not in skipped:
            try:
                __import__(module)
            except ImportError as exc:
                skipped[variant] = f"not installed: {exc}"
    return skipped


def cleanup(cfg: Config, *, pg: bool) -> None:
    with contextlib.suppress(Exception):
        redis_delete(cfg, cfg.redis_base)
    if pg:
        with contextlib.suppress(Exception):
            pg_exec(cfg, f"DROP SCHEMA IF EXISTS {cfg.pg_schema} CASCADE")
    shutil.rmtree(cfg.tmp, ignore_errors=True)


# -- report ----------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "-"
    try:
        out["wrk"] = subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True, check=False
        ).stdout.split(" [")[0]
    except OSError:
        out["wrk"] = "-"
    with contextlib.suppress(Exception):
        out["redis-server"] = str(redis_client_info())
    with contextlib.suppress(Exception):
        import psycopg

        with psycopg.connect(PG_DEFAULT, connect_timeout=2) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            out["postgresql-server"] = str(row[0]) if row else "-"
    return out


def git_state() -> dict[str, Any]:
    """The commit measured and any uncommitted change under src/ (others edit it meanwhile)."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()

    return {"head": git("rev-parse", "--short", "HEAD"),
            "dirty_src": git("status", "--short", "--", "src").splitlines()}  # fmt: skip


def redis_client_info() -> str:
    import redis

    return str(redis.Redis(socket_timeout=2).info("server")["redis_version"])


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def add_ratios(cells: list[Cell]) -> None:
    """Each cell against the mean of the bare cells of its path; with rounds, against the mean
    of the bare cells that open and close its round (a bare cell: those of its path)."""
    for path in PATHS:
        bare = [c for c in cells if c.path == path and c.variant == "bare" and c.status == "ok"]
        if not bare:
            continue
        for c in cells:
            if c.path != path or c.status != "ok":
                continue
            beside = [b for b in bare if b.round in (c.round, c.round + 1)] if c.round else []
            if c.variant == "bare" or not beside:
                beside = bare
            rps = sum(b.rps for b in beside) / len(beside)
            cpu = sum(b.cpu_us_per_req for b in beside) / len(beside)
            c.ratio = c.rps / rps if rps else None
            c.cpu_ratio = cpu / c.cpu_us_per_req if c.cpu_us_per_req else None


def summary(cells: list[Cell]) -> list[tuple[str, ...]]:
    """Per path and variant over the rounds: median paired ratio (range), by req/s and CPU."""
    out: list[tuple[str, ...]] = []
    for path in PATHS:
        for variant in dict.fromkeys(c.variant for c in cells if c.path == path):
            if variant == "bare":
                continue
            mine = [c for c in cells if (c.path, c.variant, c.status) == (path, variant, "ok")]
            ratios = sorted(c.ratio for c in mine if c.ratio is not None)
            cpu = sorted(c.cpu_ratio for c in mine if c.cpu_ratio is not None)
            if not ratios:
                continue
            rps = statistics.median(c.rps for c in mine)
            out.append((
                path, variant, str(len(ratios)), f"{rps:,.0f}",
                f"{statistics.median(ratios):.3f}", f"{ratios[0]:.3f}-{ratios[-1]:.3f}",
                f"{statistics.median(cpu):.3f}" if cpu else "-",
                f"{cpu[0]:.3f}-{cpu[-1]:.3f}" if cpu else "-",
            ))  # fmt: skip
    return out


SUMMARY_HEADERS = ("path", "variant", "rounds", "median req/s", "x bare (median)", "range",
                   "x bare CPU (median)", "range")  # fmt: skip


HEADERS = ("path", "variant", "req/s", "p50 ms", "p99 ms", "x bare", "CPU us/req",
           "x bare CPU", "srv CPU%", "other% cpu0/1", "errors", "check")  # fmt: skip


def rows(cells: list[Cell]) -> list[tuple[str, ...]]:
    out = []
    for c in cells:
        if c.status != "ok":
            out.append((c.path, c.label, "-", "-", "-", "-", "-", "-", "-", "-", "-", c.status))
            continue
        errors = (
            f"{c.errors}"
            if not c.errors
            else f"{c.errors} ({100 * c.errors / max(c.requests, 1):.0f}%)"
        )
        out.append((
            c.path, c.label, f"{c.rps:,.0f}", f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}",
            f"{c.ratio:.2f}" if c.ratio is not None else "-",
            f"{c.cpu_us_per_req:.0f}",
            f"{c.cpu_ratio:.2f}" if c.cpu_ratio is not None else "-",
            f"{c.server_cpu_pct:.0f}",
            f"{c.other_on_core_pct:.0f}/{c.other_on_load_core_pct:.0f}", errors, c.verify,
        ))  # fmt: skip
    return out


def markdown(cells: list[Cell]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(cells)]
    return "\n".join(lines)


def print_table(cells: list[Cell], *, use_markdown: bool) -> None:
    _print_table(cells, use_markdown=use_markdown)
    if any(c.round > 1 for c in cells):
        print()
        _print_summary(summary(cells), use_markdown=use_markdown)


def _print_summary(lines: list[tuple[str, ...]], *, use_markdown: bool) -> None:
    title = "paired ratios over the rounds (each cell against the bare cells by it)"
    render(title, SUMMARY_HEADERS, lines, left=(0, 1), use_markdown=use_markdown)


def render(
    title: str,
    headers: tuple[str, ...],
    lines: list[tuple[str, ...]],
    *,
    left: tuple[int, ...],
    use_markdown: bool,
) -> None:
    """A table in rich (``left``: the columns aligned left) or, without rich, in markdown."""
    if not use_markdown:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_markdown = True
    if use_markdown:
        print("| " + " | ".join(headers) + " |")
        print("|" + "|".join("---" for _ in headers) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i in left else "right")
    for line in lines:
        table.add_row(*line)
    Console(width=220).print(table)


def _print_table(cells: list[Cell], *, use_markdown: bool) -> None:
    if not use_markdown:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_markdown = True
    if use_markdown:
        print(markdown(cells))
        return
    table = Table(title="middleware overhead (wrk, loopback, one uvicorn worker)")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i in (0, 1, 11) else "right")
    last = None
    for c, r in zip(cells, rows(cells), strict=True):
        if last is not None and c.path != last:
            table.add_section()
        last = c.path
        table.add_row(*r)
    Console(width=200).print(table)


# -- main ------------------------------------------------------------------------------------------


def contended(cell: Cell, limit: float) -> bool:
    """Other work took the server's CPU, or starved wrk so that the server was not saturated.
    (A server that waits on its store, like PowerTools' blocking calls, is not saturated
    either; that alone is no reason to measure again.)"""
    if cell.other_on_core_pct > limit:
        return True
    return cell.server_cpu_pct < 100 - limit and cell.other_on_load_core_pct > 2 * limit


def quality(cell: Cell) -> float:
    """Higher is cleaner: the server saturated its CPU and nothing else ran there."""
    return cell.server_cpu_pct - cell.other_on_core_pct if cell.status == "ok" else -1e9


def report(cell: Cell, waited: float, share: float, elapsed: float) -> None:
    print(
        f"  {cell.path:6} {cell.label:32} {cell.rps:9,.0f} req/s  p50 {cell.p50_ms:6.2f} ms  "
        f"p99 {cell.p99_ms:6.2f} ms  {cell.cpu_us_per_req:5.0f} CPU us/req  "
        f"srv {cell.server_cpu_pct:3.0f}%  other {cell.other_on_core_pct:3.0f}%"
        f"/{cell.other_on_load_core_pct:3.0f}%  wrk {cell.wrk_cpu_pct:3.0f}%  "
        f"err {cell.errors}  [{cell.verify or cell.status}]  "
        f"busy-before {share:.0f}% waited {waited:.0f}s  ({elapsed:.0f}s)",
        flush=True,
    )


@dataclass
class Pairs:
    """A variant against the bare app in alternating short loads (``--pairs``)."""

    variant: str
    path: str
    verify: str = ""
    seconds: float = 0.0
    bare_rps: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    bare_cpu_us: list[float] = field(default_factory=list)  # server CPU per request
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0
    status: str = "ok"

    @property
    def ratios(self) -> list[float]:
        return [v / b for v, b in zip(self.rps, self.bare_rps, strict=True) if b]

    @property
    def cpu_ratios(self) -> list[float]:
        return [b / v for v, b in zip(self.cpu_us, self.bare_cpu_us, strict=True) if v]

    def pooled(self) -> tuple[float, float]:
        """(req/s ratio, CPU ratio) over all pairs: equal time on each side, so sums compare."""
        rps = sum(self.rps) / sum(self.bare_rps) if sum(self.bare_rps) else 0.0
        bare_cpu = _weighted(self.bare_cpu_us, self.bare_rps)
        cpu = _weighted(self.cpu_us, self.rps)
        return rps, (bare_cpu / cpu if cpu else 0.0)


def _weighted(values: list[float], weights: list[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else 0.0
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def measure_pairs(cfg: Config, variant: str, path: str, n: int, seconds: float) -> Pairs:
    result = Pairs(variant, path, seconds=seconds)
    slot = f"{path}-pairs"
    script = f"{path}.lua"
    tag = f"{cfg.run_id}-{variant}-{slot}"
    with (
        server(cfg, "bare", slot) as (bare_port, bare_pid, _),
        server(cfg, variant, slot) as (
            port,
            pid,
            _,
        ),
    ):
        result.verify = verify(port, variant)
        sides = {"bare": (bare_port, bare_pid), variant: (port, pid)}
        replay_key = {name: f"replay-{tag}-{name}" for name in sides}
        for name, (p, _pid) in sides.items():  # warm both, and make the replay keys
            wrk(cfg, p, script, replay_key[name] if path == "replay" else f"warm-{tag}", cfg.warmup)
        for i in range(n):
            order = ["bare", variant] if i % 2 == 0 else [variant, "bare"]
            for name in order:
                p, server_pid = sides[name]
                cpu0 = proc_cpu(server_pid)
                arg = replay_key[name] if path == "replay" else f"meas-{tag}-{i}"
                out = wrk(cfg, p, script, arg, seconds)
                cpu1 = proc_cpu(server_pid)
                requests = max(int(out["requests"]), 1)
                rps = out["requests"] / (out["duration_us"] / 1e6)
                cpu_us = (cpu1 - cpu0) / requests * 1e6
                result.errors += sum(v for k, v in out.items() if k.startswith("err_"))
                if name == "bare":
                    result.bare_rps.append(rps)
                    result.bare_cpu_us.append(cpu_us)
                else:
                    result.rps.append(rps)
                    result.cpu_us.append(cpu_us)
    return result


PAIR_HEADERS = ("path", "variant", "pairs", "bare req/s (median)", "req/s (median)",
                "x bare: median (IQR)", "pooled", "x bare CPU: median (IQR)", "pooled",
                "errors", "check")  # fmt: skip


def pair_rows(results: list[Pairs]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for r in results:
        if r.status != "ok" or not r.ratios:
            out.append((r.path, r.variant, "-", "-", "-", "-", "-", "-", "-", "-", r.status))
            continue
        q1, q2, q3 = _quartiles(r.ratios)
        c1, c2, c3 = _quartiles(r.cpu_ratios)
        pooled, pooled_cpu = r.pooled()
        out.append((
            r.path, r.variant, str(len(r.ratios)), f"{statistics.median(r.bare_rps):,.0f}",
            f"{statistics.median(r.rps):,.0f}", f"{q2:.3f} ({q1:.3f}-{q3:.3f})", f"{pooled:.3f}",
            f"{c2:.3f} ({c1:.3f}-{c3:.3f})", f"{pooled_cpu:.3f}", str(r.errors), r.verify,
        ))  # fmt: skip
    return out


def print_pairs(results: list[Pairs], *, use_markdown: bool) -> None:
    title = "alternating pairs: each variant load against a bare load beside it"
    render(title, PAIR_HEADERS, pair_rows(results), left=(0, 1, 10), use_markdown=use_markdown)


def run_pairs(
    cfg: Config, variants: list[str], paths: list[str], n: int, seconds: float, args: Any
) -> int:
    skipped = preflight(cfg, variants)
    results: list[Pairs] = []
    started = time.time()
    try:
        for path in paths:
            for variant in variants:
                why = skipped.get(variant) or skipped.get(base_variant(variant))
                if why:
                    results.append(Pairs(variant, path, status=f"skipped: {why}"))
                    continue
                t0 = time.monotonic()
                try:
                    result = measure_pairs(cfg, variant, path, n, seconds)
                except Exception as exc:
                    result = Pairs(variant, path, status=f"failed: {exc}"[:300])
                finally:
                    with contextlib.suppress(Exception):
                        redis_delete(cfg, cfg.redis_prefix(variant, f"{path}-pairs"))
                results.append(result)
                if result.ratios:
                    pooled, pooled_cpu = result.pooled()
                    print(f"  {path:6} {variant:32} {len(result.ratios)} pairs: median "
                          f"{statistics.median(result.ratios):.3f}, pooled {pooled:.3f} "
                          f"(CPU {pooled_cpu:.3f})  ({time.monotonic() - t0:.0f}s)",
                          flush=True)  # fmt: skip
                else:
                    print(f"  {path:6} {variant:32} {result.status}", flush=True)
    finally:
        cleanup(cfg, pg="oncepay-postgres" in variants and "oncepay-postgres" not in skipped)
    print()
    print_pairs(results, use_markdown=args.markdown)
    print(f"\n{time.time() - started:.0f}s")
    if args.json:
        info = {"machine": machine(), "versions": versions(), "git": git_state()}
        args.json.write_text(json.dumps({**info, "pairs": [asdict(r) for r in results]}, indent=2))
        print(f"wrote {args.json}")
    return 0


def order(variants: list[str], rounds: int) -> list[tuple[str, str, int]]:
    """(variant, label, round) in the order measured on one path."""
    if rounds == 1:
        return [("bare", "bare (first)", 0), *((v, v, 0) for v in variants),
                ("bare", "bare (last)", 0)]  # fmt: skip
    cells = []
    for r in range(1, rounds + 1):
        # every other round in reverse, so that no variant always has the same neighbours
        ours = variants if r % 2 else variants[::-1]
        cells += [("bare", f"bare #{r}", r), *((v, f"{v} #{r}", r) for v in ours)]
    return [*cells, ("bare", f"bare #{rounds + 1}", rounds + 1)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s per cell, 1 s warm-up")
    p.add_argument("--seconds", type=float, help="measurement per cell (default 10, quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up per cell (default 2, quick 1)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--only", help="comma-separated variants (bare is always included)")
    p.add_argument("--paths", default="new,replay")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="bare, variants, bare, variants, ..., bare: paired ratios, median over the rounds",
    )
    p.add_argument(
        "--pairs",
        type=int,
        default=0,
        help="instead of cells: N alternating short loads of bare and each variant, side by side",
    )
    p.add_argument("--pair-seconds", type=float, default=1.0, help="each load of --pairs")
    p.add_argument(
        "--alt-src",
        type=Path,
        help="another checkout's src/: adds <variant>@alt, served from it, after each OncePay one",
    )
    p.add_argument("--server-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg", default=PG_DEFAULT)
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=25.0,
        help="before a cell, wait until both CPUs are below this busy %% (0: never)",
    )
    p.add_argument("--quiet-wait", type=float, default=20.0, help="longest wait per cell, s")
    p.add_argument("--quiet-budget", type=float, default=120.0, help="longest wait per run, s")
    p.add_argument(
        "--contended",
        type=float,
        default=15.0,
        help="re-measure a cell when other work took more than this %% of the "
        "server's CPU, or the server got less than 100 minus this %%",
    )
    p.add_argument("--retries", type=int, default=1, help="re-measurements per contended cell")
    p.add_argument(
        "--retry-until",
        type=float,
        default=420.0,
        help="no re-measurements once the run is this many seconds old",
    )
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("--markdown", action="store_true", help="markdown table instead of rich")
    p.add_argument("--from-json", type=Path, help="only print the table of an earlier --json")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        fields = {f.name for f in dataclasses.fields(Cell)}
        cells = [Cell(**{k: v for k, v in c.items() if k in fields}) for c in saved["cells"]]
        print_table(cells, use_markdown=args.markdown)
        return 0

    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install -y wrk util-linux)")
    cfg = Config(
        seconds=args.seconds or (3.0 if args.quick else 10.0),
        warmup=args.warmup or (1.0 if args.quick else 2.0),
        connections=args.connections,
        threads=args.threads,
        server_cpu=args.server_cpu,
        load_cpu=args.load_cpu,
        redis=args.redis,
        pg=args.pg,
        python=sys.executable,
        alt_src=str(args.alt_src.resolve()) if args.alt_src else "",
    )
    variants = [v for v in VARIANTS if v != "bare"]
    if args.only:
        wanted = {v.strip() for v in args.only.split(",")}
        unknown = wanted - set(VARIANTS)
        if unknown:
            sys.exit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
        variants = [v for v in variants if v in wanted]
    if args.alt_src:
        if not (args.alt_src / "oncepay" / "__init__.py").is_file():
            sys.exit(f"--alt-src {args.alt_src}: no oncepay package there")
        variants = [w for v in variants for w in ((v, v + ALT) if "oncepay" in v else (v,))]
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    rounds = max(args.rounds, 1)
    if args.pairs > 0:
        print(f"run {cfg.run_id}: {args.pairs} pairs of {args.pair_seconds:g}s loads per "
              f"variant and path; git {git_state()['head']}"
              + (f"; @alt = {cfg.alt_src}" if cfg.alt_src else ""), flush=True)  # fmt: skip
        return run_pairs(cfg, variants, paths, args.pairs, args.pair_seconds, args)

    started = time.time()
    info = {"machine": machine(), "versions": versions(), "git": git_state(), "config": {
        k: v for k, v in asdict(cfg).items() if k not in ("tmp",)}}  # fmt: skip
    dirty = info["git"]["dirty_src"]
    print(f"run {cfg.run_id}: {len(paths)} paths x {rounds * (len(variants) + 1) + 1} cells, "
          f"{cfg.seconds:g}s each after {cfg.warmup:g}s warm-up; server on CPU {cfg.server_cpu}, "
          f"wrk on CPU {cfg.load_cpu}, {cfg.connections} connections; git {info['git']['head']}"
          + (f" + uncommitted src: {', '.join(dirty)}" if dirty else "")
          + (f"; @alt = {cfg.alt_src}" if cfg.alt_src else ""), flush=True)  # fmt: skip
    skipped = preflight(cfg, variants)
    cells: list[Cell] = []
    quiet = Quiet(cfg, args.quiet_threshold, args.quiet_wait, args.quiet_budget)
    try:
        for path in paths:
            for variant, label, round_ in order(variants, rounds):
                why = skipped.get(variant) or skipped.get(base_variant(variant))
                if why:
                    cells.append(Cell(variant, path, label, status=f"skipped: {why}"))
                    continue
                t0 = time.monotonic()
                cell = None
                for attempt in range(1 + max(args.retries, 0)):
                    waited, share = quiet.wait()
                    try:
                        slot = f"{path}-{round_}-{attempt + 1}"
                        result = measure(cfg, variant, path, label, slot)
                        result.round = round_
                    except Exception as exc:
                        result = Cell(variant, path, label, status=f"failed: {exc}"[:300])
                    finally:
                        if variant != "bare":
                            with contextlib.suppress(Exception):
                                redis_delete(cfg, cfg.redis_prefix(variant, slot))
                    result.quiet_wait_s, result.busy_before_pct = round(waited, 1), round(share, 1)
                    result.attempts = attempt + 1
                    report(result, waited, share, time.monotonic() - t0)
                    if cell is None or quality(result) > quality(cell):
                        cell = result
                    out_of_time = time.time() - started > args.retry_until
                    if (
                        out_of_time
                        or result.status != "ok"
                        or not contended(result, args.contended)
                    ):
                        break
                assert cell is not None
                cells.append(cell)
    finally:
        cleanup(cfg, pg="oncepay-postgres" in variants and "oncepay-postgres" not in skipped)
    add_ratios(cells)
    info["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["elapsed_s"] = round(time.time() - started, 1)
    print()
    print_table(cells, use_markdown=args.markdown)
    load = info["machine"]
    print(f"\n{info['elapsed_s']:.0f}s; load average at start {load['loadavg_at_start']}, "
          f"at end {load['loadavg_at_end']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({**info, "cells": [asdict(c) for c in cells]}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
