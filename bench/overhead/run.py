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
import json
import os
import platform
import shutil
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness import environment, stores
from bench.harness.cells import Pairs, quartiles
from bench.harness.cpu import Quiet, children_cpu, core_times, process_cpu
from bench.harness.load import Load, errors, rate, wrk
from bench.harness.processes import ROOT, free_port, stop, wait_http
from bench.harness.report import print_table
from bench.overhead.apps import VARIANTS

HERE = Path(__file__).resolve().parent
PATHS = ("new", "replay")
BODY = b'{"amount":1250,"currency":"eur","customer":"cus_0042","description":"overhead bench"}'
REDIS_PEERS: tuple[str, ...] = ("powertools-redis", "powertools-redis-inline", "idemkit-redis")
REDIS_PEERS += ("fastapi-idempotency-key-redis",)
PEER_MODULES = {
    "powertools-redis": "aws_lambda_powertools",
    "powertools-redis-inline": "aws_lambda_powertools",
    "idemkit-redis": "idemkit",
    "fastapi-idempotency-key-redis": "fastapi_idempotency_key",
}
PACKAGES: tuple[str, ...] = (
    "oncepay",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "redis",
    "hiredis",
)
PACKAGES += ("asyncpg", "psycopg", "aws-lambda-powertools", "idemkit", "fastapi-idempotency-key")
PACKAGES += ("boto3", "py-spy")
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"
# uvicorn with the app and its store imported answers /health within a few seconds here.
START_TIMEOUT = 30.0


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
    def load(self) -> Load:
        return Load(self.connections, self.threads, cpu=self.load_cpu, timeout="5s")

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
        base = base_variant(variant).removesuffix("-log")  # with the usage log: the same store
        alt = "_alt" if variant.endswith(ALT) else ""
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


def server_env(cfg: Config, variant: str, slot: str) -> dict[str, str]:
    env = {
        **os.environ,
        "OVERHEAD_VARIANT": base_variant(variant),
        "OVERHEAD_STORE": cfg.store_url(variant, slot),
        "OVERHEAD_REDIS": cfg.redis,
        "OVERHEAD_PREFIX": cfg.redis_prefix(variant, slot),
        "OVERHEAD_STATS": str(stats_file(cfg, variant, slot)),
        "OVERHEAD_USAGE_LOG": str(cfg.tmp / f"usage-{variant}-{slot}.jsonl"),
        "PYTHONWARNINGS": "ignore",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    if variant.endswith(ALT):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [cfg.alt_src, env.get("PYTHONPATH")]))
    return env


def stats_file(cfg: Config, variant: str, slot: str) -> Path:
    return cfg.tmp / f"stats-{variant}-{slot}.json"


UVICORN = "--factory --workers 1 --loop uvloop --http httptools --no-access-log --log-level warning"


@contextlib.contextmanager
def server(cfg: Config, variant: str, slot: str) -> Iterator[tuple[int, int, Path]]:
    """``variant`` served by uvicorn on the server CPU: (port, pid, log) while the block runs."""
    port = free_port()
    log = cfg.tmp / f"server-{variant}-{slot}.log"
    app = ["-m", "uvicorn", "bench.overhead.apps:make_app", "--host", "127.0.0.1"]
    cmd = ["taskset", "-c", cfg.server_cpu, cfg.python, *app, "--port", str(port)]
    cmd += UVICORN.split()
    env = server_env(cfg, variant, slot)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc, log, START_TIMEOUT)
        yield port, proc.pid, log
    finally:
        stop(proc)


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


def load(cfg: Config, port: int, path: str, key: str, seconds: float) -> dict[str, Any]:
    """One wrk run on ``path`` (new.lua: ``key`` prefixes fresh keys; replay.lua: the key)."""
    return wrk(cfg.load, f"http://127.0.0.1:{port}", HERE / f"{path}.lua", seconds, key)


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds so far: the server's, its core's and the load core's (total, busy, steal),
    and wrk's (our ended children)."""

    server: float
    core: tuple[float, float, float]
    load_core: tuple[float, float, float]
    wrk: float

    @classmethod
    def take(cls, cfg: Config, pid: int) -> Snapshot:
        server, core, load_core = (
            process_cpu(pid),
            core_times(cfg.server_cpu),
            core_times(cfg.load_cpu),
        )
        return cls(server, core, load_core, children_cpu())


def measure(cfg: Config, variant: str, path: str, label: str, slot: str) -> Cell:
    cell = Cell(variant, path, label or variant)
    tag = f"{cfg.run_id}-{variant}-{slot}"
    replay_key = f"replay-{tag}"
    with server(cfg, variant, slot) as (port, pid, _log):
        cell.verify = verify(port, variant)
        load(cfg, port, path, replay_key if path == "replay" else f"warm-{tag}", cfg.warmup)
        before = Snapshot.take(cfg, pid)
        result = load(
            cfg, port, path, replay_key if path == "replay" else f"meas-{tag}", cfg.seconds
        )
        after = Snapshot.take(cfg, pid)
    add_driver_stats(cell, stats_file(cfg, variant, slot))
    add_figures(cell, result, before, after)
    return cell


def add_driver_stats(cell: Cell, stats: Path) -> None:
    """The experiment client's counters, written at shutdown, if it wrote any."""
    if not stats.exists():
        return
    counts = json.loads(stats.read_text())
    cell.driver = counts
    if counts.get("writes"):
        cell.verify += f"; {counts['commands'] / counts['writes']:.1f} cmds/write"


def add_figures(cell: Cell, result: dict[str, Any], before: Snapshot, after: Snapshot) -> None:
    cell.wrk = result
    cell.requests = result["requests"]
    cell.rps = rate(result)
    cell.p50_ms = result["p50_us"] / 1000
    cell.p90_ms = result["p90_us"] / 1000
    cell.p99_ms = result["p99_us"] / 1000
    cell.errors = errors(result)
    served = after.server - before.server
    cell.cpu_us_per_req = served / max(cell.requests, 1) * 1e6
    wall = after.core[0] - before.core[0]
    if wall > 0:
        cell.server_cpu_pct = 100 * served / wall
        # busy includes steal: whatever ran on the server's CPU that was not the server
        other = (after.core[1] - before.core[1]) - served
        cell.other_on_core_pct = max(0.0, 100 * other / wall)
        cell.steal_pct = 100 * (after.core[2] - before.core[2]) / wall
    load_wall = after.load_core[0] - before.load_core[0]
    if load_wall > 0:
        loaded = after.wrk - before.wrk
        cell.wrk_cpu_pct = 100 * loaded / load_wall
        other = (after.load_core[1] - before.load_core[1]) - loaded
        cell.other_on_load_core_pct = max(0.0, 100 * other / load_wall)


# -- stores: preflight and cleanup -----------------------------------------------------------------


def preflight(cfg: Config, variants: list[str]) -> dict[str, str]:
    """Variants that cannot run here, and why."""
    skipped: dict[str, str] = {}
    redis_needed = [v for v in variants if v.startswith("oncepay-redis") or v in REDIS_PEERS]
    if redis_needed:
        try:
            stores.redis_client(cfg.redis).ping()
        except Exception as exc:
            skipped.update(dict.fromkeys(redis_needed, f"Redis unreachable: {exc}"))
    if "oncepay-postgres" in variants:
        try:
            stores.pg_execute(cfg.pg, f"CREATE SCHEMA {cfg.pg_schema}")
        except Exception as exc:
            skipped["oncepay-postgres"] = f"PostgreSQL unreachable: {exc}"
    for variant, module in PEER_MODULES.items():
        if variant in variants and variant not in skipped:
            try:
                __import__(module)
            except ImportError as exc:
                skipped[variant] = f"not installed: {exc}"
    return skipped


def cleanup(cfg: Config, *, pg: bool) -> None:
    with contextlib.suppress(Exception):
        stores.redis_delete(cfg.redis, cfg.redis_base)
    if pg:
        with contextlib.suppress(Exception):
            stores.pg_execute(cfg.pg, f"DROP SCHEMA IF EXISTS {cfg.pg_schema} CASCADE")
    shutil.rmtree(cfg.tmp, ignore_errors=True)


def forget(cfg: Config, variant: str, slot: str) -> None:
    """Drop the Redis keys of one attempt at one cell."""
    with contextlib.suppress(Exception):
        stores.redis_delete(cfg.redis, cfg.redis_prefix(variant, slot))


# -- report ----------------------------------------------------------------------------------------


def versions(cfg: Config) -> dict[str, str]:
    out = {"python": platform.python_version(), **environment.packages(PACKAGES)}
    out["wrk"] = environment.wrk_version()
    with contextlib.suppress(Exception):
        out["redis-server"] = stores.redis_version(cfg.redis)
    with contextlib.suppress(Exception):
        out["postgresql-server"] = stores.pg_version(cfg.pg)
    return out


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


def _median_and_range(values: list[float]) -> tuple[str, str]:
    if not values:
        return "-", "-"
    return f"{statistics.median(values):.3f}", f"{values[0]:.3f}-{values[-1]:.3f}"


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
            head = (path, variant, str(len(ratios)), f"{rps:,.0f}")
            out.append((*head, *_median_and_range(ratios), *_median_and_range(cpu)))
    return out


SUMMARY_HEADERS: tuple[str, ...] = (
    "path",
    "variant",
    "rounds",
    "median req/s",
    "x bare (median)",
    "range",
)
SUMMARY_HEADERS += ("x bare CPU (median)", "range")

HEADERS: tuple[str, ...] = (
    "path",
    "variant",
    "req/s",
    "p50 ms",
    "p99 ms",
    "x bare",
    "CPU us/req",
    "x bare CPU",
)
HEADERS += ("srv CPU%", "other% cpu0/1", "errors", "check")


def _ratio(value: float | None) -> str:
    return f"{value:.2f}" if value is not None else "-"


def row(c: Cell) -> tuple[str, ...]:
    if c.status != "ok":
        return (c.path, c.label, *("-",) * 9, c.status)
    errors = (
        f"{c.errors}"
        if not c.errors
        else f"{c.errors} ({100 * c.errors / max(c.requests, 1):.0f}%)"
    )
    latency = (f"{c.rps:,.0f}", f"{c.p50_ms:.2f}", f"{c.p99_ms:.2f}", _ratio(c.ratio))
    cpu = (f"{c.cpu_us_per_req:.0f}", _ratio(c.cpu_ratio), f"{c.server_cpu_pct:.0f}")
    other = f"{c.other_on_core_pct:.0f}/{c.other_on_load_core_pct:.0f}"
    return (c.path, c.label, *latency, *cpu, other, errors, c.verify)


def print_cells(cells: list[Cell], *, use_markdown: bool) -> None:
    title = "middleware overhead (wrk, loopback, one uvicorn worker)"
    rows = [row(c) for c in cells]
    right = range(2, 11)
    print_table(
        title, HEADERS, rows, right=right, use_markdown=use_markdown, section_by=0, width=200
    )
    if any(c.round > 1 for c in cells):
        print()
        title = "paired ratios over the rounds (each cell against the bare cells by it)"
        print_table(
            title, SUMMARY_HEADERS, summary(cells), right=range(2, 8), use_markdown=use_markdown
        )


# -- cells -----------------------------------------------------------------------------------------


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


def order(variants: list[str], rounds: int) -> list[tuple[str, str, int]]:
    """(variant, label, round) in the order measured on one path."""
    if rounds == 1:
        return [
            ("bare", "bare (first)", 0),
            *((v, v, 0) for v in variants),
            ("bare", "bare (last)", 0),
        ]
    cells = []
    for r in range(1, rounds + 1):
        # every other round in reverse, so that no variant always has the same neighbours
        ours = variants if r % 2 else variants[::-1]
        cells += [("bare", f"bare #{r}", r), *((v, f"{v} #{r}", r) for v in ours)]
    return [*cells, ("bare", f"bare #{rounds + 1}", rounds + 1)]


def attempt(cfg: Config, variant: str, path: str, label: str, slot: str) -> Cell:
    """One measurement of a cell; a failure is a cell that says so."""
    try:
        return measure(cfg, variant, path, label, slot)
    except Exception as exc:
        return Cell(variant, path, label, status=f"failed: {exc}"[:300])
    finally:
        if variant != "bare":
            forget(cfg, variant, slot)


@dataclass
class Session:
    """One run of cells: its configuration, options, and the quiet-machine budget."""

    cfg: Config
    args: argparse.Namespace
    quiet: Quiet
    started: float = field(default_factory=time.time)


def best_of(run: Session, variant: str, path: str, label: str, round_: int) -> Cell:
    """Measure a cell, again (up to ``--retries``) while it was contended; the cleanest."""
    t0, args = time.monotonic(), run.args
    best: Cell | None = None
    for n in range(1, 2 + max(args.retries, 0)):
        waited, share = run.quiet.wait()
        result = attempt(run.cfg, variant, path, label, f"{path}-{round_}-{n}")
        result.round, result.attempts = round_, n
        result.quiet_wait_s, result.busy_before_pct = round(waited, 1), round(share, 1)
        report(result, waited, share, time.monotonic() - t0)
        if best is None or quality(result) > quality(best):
            best = result
        out_of_time = time.time() - run.started > args.retry_until
        if out_of_time or result.status != "ok" or not contended(result, args.contended):
            break
    assert best is not None
    return best


def announce(cfg: Config, info: dict[str, Any], cells: str) -> None:
    dirty = info["git"]["dirty_src"]
    print(
        f"run {cfg.run_id}: {cells} cells, "
        f"{cfg.seconds:g}s each after {cfg.warmup:g}s warm-up; server on CPU {cfg.server_cpu}, "
        f"wrk on CPU {cfg.load_cpu}, {cfg.connections} connections; git {info['git']['head']}"
        + (f" + uncommitted src: {', '.join(dirty)}" if dirty else "")
        + (f"; @alt = {cfg.alt_src}" if cfg.alt_src else ""),
        flush=True,
    )


def measure_all(run: Session, variants: list[str], paths: list[str]) -> list[Cell]:
    """Every cell in order, path by path; the stores cleared at the end."""
    cfg = run.cfg
    skipped = preflight(cfg, variants)
    cells: list[Cell] = []
    try:
        for path in paths:
            for variant, label, round_ in order(variants, max(run.args.rounds, 1)):
                why = skipped.get(variant) or skipped.get(base_variant(variant))
                if why:
                    cells.append(Cell(variant, path, label, status=f"skipped: {why}"))
                else:
                    cells.append(best_of(run, variant, path, label, round_))
    finally:
        cleanup(cfg, pg="oncepay-postgres" in variants and "oncepay-postgres" not in skipped)
    return cells


def run_cells(cfg: Config, variants: list[str], paths: list[str], args: argparse.Namespace) -> int:
    info: dict[str, Any] = {"machine": environment.machine(), "versions": versions(cfg)}
    info["git"] = environment.git_state()
    info["config"] = {k: v for k, v in asdict(cfg).items() if k not in ("tmp",)}
    rounds = max(args.rounds, 1)
    announce(cfg, info, f"{len(paths)} paths x {rounds * (len(variants) + 1) + 1}")
    cpus = [cfg.server_cpu, cfg.load_cpu]
    run = Session(cfg, args, Quiet(cpus, args.quiet_threshold, args.quiet_wait, args.quiet_budget))
    cells = measure_all(run, variants, paths)
    add_ratios(cells)
    info["machine"]["loadavg_at_end"] = environment.loadavg()
    info["elapsed_s"] = round(time.time() - run.started, 1)
    print()
    print_cells(cells, use_markdown=args.markdown)
    load = info["machine"]
    print(
        f"\n{info['elapsed_s']:.0f}s; load average at start {load['loadavg_at_start']}, "
        f"at end {load['loadavg_at_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps({**info, "cells": [asdict(c) for c in cells]}, indent=2))
        print(f"wrote {args.json}")
    return 0


# -- pairs -----------------------------------------------------------------------------------------


def measure_pairs(
    cfg: Config, variant: str, path: str, n: int, seconds: float, baseline: str = "bare"
) -> Pairs:
    """``variant`` against ``baseline`` (``--baseline``; the bare app unless named)."""
    result = Pairs(variant, path, seconds=seconds)
    slot = f"{path}-pairs"
    tag = f"{cfg.run_id}-{variant}-{slot}"
    with (
        server(cfg, baseline, slot) as (bare_port, bare_pid, _),
        server(cfg, variant, slot) as (port, pid, _),
    ):
        result.verify = verify(port, variant)
        sides = {baseline: (bare_port, bare_pid), variant: (port, pid)}
        replay_key = {name: f"replay-{tag}-{name}" for name in sides}
        for name, (p, _pid) in sides.items():  # warm both, and make the replay keys
            load(cfg, p, path, replay_key[name] if path == "replay" else f"warm-{tag}", cfg.warmup)
        for i in range(n):
            for name in [baseline, variant] if i % 2 == 0 else [variant, baseline]:
                p, server_pid = sides[name]
                cpu0 = process_cpu(server_pid)
                out = load(
                    cfg,
                    p,
                    path,
                    replay_key[name] if path == "replay" else f"meas-{tag}-{i}",
                    seconds,
                )
                cpu_us = (process_cpu(server_pid) - cpu0) / max(int(out["requests"]), 1) * 1e6
                result.errors += errors(out)
                result.add(name == baseline, rate(out), cpu_us)
    return result


PAIR_HEADERS: tuple[str, ...] = (
    "path",
    "variant",
    "pairs",
    "bare req/s (median)",
    "req/s (median)",
)
PAIR_HEADERS += ("x bare: median (IQR)", "pooled", "x bare CPU: median (IQR)", "pooled")
PAIR_HEADERS += ("errors", "check")


def pair_row(r: Pairs) -> tuple[str, ...]:
    if r.status != "ok" or not r.ratios:
        return (r.path, r.variant, *("-",) * 8, r.status)
    q1, q2, q3 = quartiles(r.ratios)
    c1, c2, c3 = quartiles(r.cpu_ratios)
    pooled, pooled_cpu = r.pooled()
    rps = (f"{statistics.median(r.bare_rps):,.0f}", f"{statistics.median(r.rps):,.0f}")
    ratios = (f"{q2:.3f} ({q1:.3f}-{q3:.3f})", f"{pooled:.3f}")
    cpu = (f"{c2:.3f} ({c1:.3f}-{c3:.3f})", f"{pooled_cpu:.3f}")
    return (r.path, r.variant, str(len(r.ratios)), *rps, *ratios, *cpu, str(r.errors), r.verify)


def one_pair(cfg: Config, variant: str, path: str, args: argparse.Namespace) -> Pairs:
    t0 = time.monotonic()
    try:
        result = measure_pairs(
            cfg, variant, path, args.pairs, args.pair_seconds, baseline=args.baseline
        )
    except Exception as exc:
        result = Pairs(variant, path, status=f"failed: {exc}"[:300])
    finally:
        forget(cfg, variant, f"{path}-pairs")
        if args.baseline != "bare":
            forget(cfg, args.baseline, f"{path}-pairs")
    if result.ratios:
        pooled, pooled_cpu = result.pooled()
        median = statistics.median(result.ratios)
        print(
            f"  {path:6} {variant:32} {len(result.ratios)} pairs: median {median:.3f}, pooled "
            f"{pooled:.3f} (CPU {pooled_cpu:.3f})  ({time.monotonic() - t0:.0f}s)",
            flush=True,
        )
    else:
        print(f"  {path:6} {variant:32} {result.status}", flush=True)
    return result


def run_pairs(cfg: Config, variants: list[str], paths: list[str], args: argparse.Namespace) -> int:
    print(
        f"run {cfg.run_id}: {args.pairs} pairs of {args.pair_seconds:g}s loads per variant and "
        f"path; git {environment.git_state()['head']}"
        + (f"; @alt = {cfg.alt_src}" if cfg.alt_src else ""),
        flush=True,
    )
    skipped = preflight(cfg, variants)
    results: list[Pairs] = []
    started = time.time()
    try:
        for path in paths:
            for variant in variants:
                why = skipped.get(variant) or skipped.get(base_variant(variant))
                if why:
                    results.append(Pairs(variant, path, status=f"skipped: {why}"))
                else:
                    results.append(one_pair(cfg, variant, path, args))
    finally:
        cleanup(cfg, pg="oncepay-postgres" in variants and "oncepay-postgres" not in skipped)
    print()
    title = f"alternating pairs: each variant load against a {args.baseline} load beside it"
    rows = [pair_row(r) for r in results]
    print_table(title, PAIR_HEADERS, rows, right=range(2, 10), use_markdown=args.markdown)
    print(f"\n{time.time() - started:.0f}s")
    if args.json:
        info = {
            "machine": environment.machine(),
            "versions": versions(cfg),
            "git": environment.git_state(),
        }
        args.json.write_text(json.dumps({**info, "pairs": [asdict(r) for r in results]}, indent=2))
        print(f"wrote {args.json}")
    return 0


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
        "--baseline",
        default="bare",
        help="with --pairs: the variant each one is paired with (oncepay-memory against "
        "oncepay-memory-log: what the usage log costs)",
    )
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
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> Config:
    return Config(
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


def chosen_variants(args: argparse.Namespace) -> list[str]:
    """The variants to measure beside bare (``--only``), each followed by its ``@alt``."""
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
    return variants


def from_json(path: Path, *, use_markdown: bool) -> int:
    saved = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Cell)}
    print_cells(
        [Cell(**{k: v for k, v in c.items() if k in fields}) for c in saved["cells"]],
        use_markdown=use_markdown,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return from_json(args.from_json, use_markdown=args.markdown)
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (apt-get install -y wrk util-linux)")
    cfg, variants = config(args), chosen_variants(args)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if args.pairs > 0:
        return run_pairs(cfg, variants, paths, args)
    return run_cells(cfg, variants, paths, args)


if __name__ == "__main__":
    sys.exit(main())
