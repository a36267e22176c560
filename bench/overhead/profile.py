"""Profile variants of the overhead benchmark under load with py-spy.

    .venv/bin/python bench/overhead/profile.py       # oncepay-redis, all-new path, + comparisons
    .venv/bin/python bench/overhead/profile.py --variant oncepay-memory --path replay --also ""

The server is started exactly as run.py starts it (``taskset -c 0``, uvicorn, one worker,
uvloop, httptools); wrk loads it from CPU 1 while py-spy (also on CPU 1, ``--nonblocking`` so
the server is never stopped) samples it twice in a row: once for a flame graph
(``profile-<variant>-<path>.svg``), once in raw collapsed-stack form (``.txt``), from which the
self time of each function and of each layer is summed. The server's CPU time over the load
turns percentages into microseconds per request.

``--also`` profiles more variants the same way (default: bare, the app alone; oncepay-memory,
the same middleware with no driver at all; oncepay-redis-redispy and oncepay-redis-pipelined,
the Redis store on redis-py and on a minimal pipelined RESP client) and puts them side by side
with the main one. Writes ``PROFILE.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu
from bench.harness.load import MARKER
from bench.harness.stores import pg_execute
from bench.overhead import run

HERE = Path(__file__).resolve().parent

# A frame in py-spy's raw output: "function (path/to/file.py:123)" (line optional).
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::(?P<line>\d+))?\)$")

# Where a frame's file lives → the bucket it is counted in. First match wins.
BUCKETS: tuple[tuple[str, str], ...] = (
    ("oncepay/http/asgi.py", "OncePay ASGI middleware (asgi.py)"),
    ("oncepay/http/gate.py", "OncePay HTTP policy (gate.py)"),
    ("oncepay/http/problems.py", "OncePay HTTP policy (gate.py)"),
    ("oncepay/idempotency/keys.py", "OncePay key parsing + fingerprint (keys.py)"),
    ("oncepay/idempotency/engine.py", "OncePay engine (engine.py)"),
    ("oncepay/idempotency/stores/_redis_scripts.py", "OncePay Redis store (args/decode)"),
    ("oncepay/idempotency/stores/redis.py", "OncePay Redis store (args/decode)"),
    ("oncepay/idempotency/records.py", "OncePay records"),
    ("oncepay/_drivers/resp.py", "OncePay RESP client (_drivers/resp.py)"),
    ("oncepay/", "OncePay other"),
    ("redis/", "redis-py driver"),
    ("hiredis", "redis-py driver"),
    ("json/", "json (stdlib)"),
    ("hashlib", "hashlib"),
    ("email/", "email.utils.formatdate (stdlib)"),
    ("starlette/", "Starlette (app + routing)"),
    ("uvicorn/", "uvicorn (httptools protocol)"),
    ("httptools", "uvicorn (httptools protocol)"),
    ("asyncio/", "asyncio with no caller on the stack (redis-py's wait_for Tasks)"),
    ("uvloop", "uvloop"),
    ("apps.py", "benchmark endpoint (apps.py)"),
    ("experiments.py", "pipelined RESP client (experiments.py)"),
    ("anyio/", "anyio"),
    ("dataclasses", "dataclasses"),
)


# Files of these packages are "ours or a library's"; any other frame (asyncio, contextlib, json,
# email, dataclass-generated code) is the standard library, folded into its nearest caller
# that is not, so that e.g. redis-py's StreamWriter.writelines counts as the Redis driver's.
OWNERS = (
    "oncepay/",
    "redis/",
    "hiredis",
    "starlette/",
    "uvicorn/",
    "httptools",
    "uvloop",
    "apps.py",
    "anyio/",
    "click/",
)
# The event loop itself: uvloop's C code (epoll, callback dispatch, transport reads) shows up
# as these frames with nothing above them.
LOOP = {"Runner.run", "run", "run_until_complete", "run_forever", "BaseEventLoop.run_forever"}
LOOP_BUCKET = "event loop (uvloop C: epoll, callbacks, socket reads)"


def owner(frames: list[re.Match[str]]) -> str:
    """The bucket of the innermost frame that belongs to a package (not the stdlib)."""
    leaf = frames[-1]
    if leaf["func"] in LOOP:
        return LOOP_BUCKET
    for m in reversed(frames):
        if any(o in m["file"] for o in OWNERS):
            return bucket(m["file"])
    return bucket(leaf["file"])


def bucket(file: str) -> str:
    for needle, name in BUCKETS:
        if needle in file:
            return name
    return f"other ({Path(file).name or file})"


def short(file: str) -> str:
    for marker in ("site-packages/", "/src/", "lib/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return Path(file).name


def inclusive_functions(text: str) -> collections.Counter[str]:
    """Samples with each function anywhere on the stack (once per sample)."""
    incl: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        parsed = [m for m in (FRAME.match(f) for f in stack.split(";")) if m is not None]
        for name in {f"{m['func']} ({short(m['file'])})" for m in parsed}:
            incl[name] += int(count_s)
    return incl


# Functions whose inclusive time answers "where does a request's time go".
WATCH = (
    ("IdempotencyMiddleware.__call__", "the whole middleware (includes the app below it)"),
    ("Gate.decide", "parse key + fingerprint + claim (one store call)"),
    ("fingerprint", "request fingerprint (canonical JSON + SHA-256)"),
    ("http_date", "Idempotency-Key-Expires header (email.utils.formatdate)"),
    ("Engine.begin", "claim, engine side"),
    ("_Responder._finish_then_send", "store the response (complete) then send it"),
    ("Gate.finish", "complete, HTTP side"),
    ("_RedisStoreBase._run", "OncePay -> Redis script call (one round trip)"),
    ("Redis.execute_command", "redis-py command, all inclusive"),
    ("RespClient.execute_command", "OncePay RESP client command, all inclusive"),
    ("_Connection._flush", "OncePay RESP client: one write for the commands of a loop turn"),
    ("PipelinedCommands.execute_command", "experiment client command, all inclusive"),
    ("_Protocol.flush", "experiment client: one write per loop turn"),
    ("StreamWriter.writelines", "redis-py socket write (transport.write)"),
    ("AbstractConnection.read_response", "redis-py read + parse reply"),
    ("Timeout.__aexit__", "asyncio.timeout around each read (socket_timeout)"),
    ("ConnectionPool.get_connection", "redis-py pool checkout"),
    ("ConnectionPool.release", "redis-py pool checkin"),
    ("Router.__call__", "the Starlette app proper (routing + endpoint)"),
    ("RequestResponseCycle.send", "uvicorn: write the HTTP response"),
    ("HttpToolsProtocol.data_received", "uvicorn: parse the HTTP request"),
)


def parse_raw(
    text: str,
) -> tuple[collections.Counter[str], collections.Counter[str], collections.Counter[str], int]:
    """Self samples per function, self samples per owning bucket (stdlib folded into its
    caller), inclusive samples per bucket; total."""
    self_fn: collections.Counter[str] = collections.Counter()
    self_bucket: collections.Counter[str] = collections.Counter()
    incl_bucket: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [f for f in stack.split(";") if FRAME.match(f)]
        if not frames:
            continue
        total += count
        parsed = [m for m in (FRAME.match(f) for f in frames) if m is not None]
        leaf = parsed[-1]
        name = f"{leaf['func']} ({short(leaf['file'])})"
        self_fn[name] += count
        self_bucket[owner(parsed)] += count
        for b in {bucket(m["file"]) for m in parsed}:
            incl_bucket[b] += count
    return self_fn, self_bucket, incl_bucket, total


@dataclass
class Profile:
    variant: str
    path: str
    svg: Path
    raw: Path
    summary: dict[str, Any]
    cpu_us_per_req: float
    rps: float


def record(args: argparse.Namespace, variant: str) -> Profile:
    """Serve ``variant``, load it with wrk, and record it with py-spy (SVG, then raw)."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cfg = run.Config(
        seconds=args.seconds,
        warmup=2.0,
        connections=args.connections,
        threads=1,
        server_cpu="0",
        load_cpu="1",
        redis=args.redis,
        pg=args.pg,
        python=sys.executable,
    )
    if variant == "oncepay-postgres":
        pg_execute(cfg.pg, f"CREATE SCHEMA {cfg.pg_schema}")
    stem = f"profile-{variant.removeprefix('oncepay-')}-{args.path}"
    svg, raw = HERE / f"{stem}.svg", HERE / f"{stem}.txt"
    tag = f"{cfg.run_id}-profile"
    key = f"replay-{tag}" if args.path == "replay" else f"meas-{tag}"
    script = HERE / f"{args.path}.lua"
    try:
        with run.server(cfg, variant, args.path) as (port, pid, _log):
            run.load(cfg, port, args.path, key if args.path == "replay" else f"warm-{tag}", 2.0)
            url, seconds = f"http://127.0.0.1:{port}", 2 * args.seconds + 5
            wrk_cmd = cfg.load.command(url, script, seconds, [key])
            cpu0 = process_cpu(pid)
            load = subprocess.Popen(wrk_cmd, stdout=subprocess.PIPE, text=True)
            time.sleep(1.5)
            spy = [
                "taskset",
                "-c",
                cfg.load_cpu,
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(args.rate),
                "--duration",
                f"{args.seconds:g}",
                "--nonblocking",
            ]
            for fmt, out in (("flamegraph", svg), ("raw", raw)):
                subprocess.run(
                    [*spy, "--format", fmt, "-o", str(out)], check=True, capture_output=True
                )
            stdout, _ = load.communicate()
            cpu1 = process_cpu(pid)
    finally:
        run.cleanup(cfg, pg=variant == "oncepay-postgres")
    line = next((x for x in stdout.splitlines() if x.startswith(MARKER)), "")
    summary = json.loads(line.removeprefix(MARKER)) if line else {}
    requests = summary.get("requests", 0)
    seconds = summary.get("duration_us", 1) / 1e6
    return Profile(
        variant,
        args.path,
        svg,
        raw,
        summary,
        cpu_us_per_req=(cpu1 - cpu0) / requests * 1e6 if requests else 0.0,
        rps=requests / seconds if requests else 0.0,
    )


def render(args: argparse.Namespace, main: Profile, others: list[Profile]) -> list[str]:
    text = main.raw.read_text()
    self_fn, self_bucket, incl_bucket, total = parse_raw(text)
    incl_fn = inclusive_functions(text)
    us = main.cpu_us_per_req

    def pct(n: float) -> str:
        return f"{100 * n / total:.1f}"

    def usec(n: float) -> str:
        return f"{us * n / total:.0f}" if us else "-"

    lines = [
        f"# py-spy profile: {main.variant}, {main.path} path",
        "",
        f"Server: `taskset -c 0` uvicorn, one worker, uvloop + httptools; load: wrk -t1 "
        f"-c{args.connections} (`taskset -c 1`); py-spy {args.rate} Hz `--nonblocking` on CPU 1, "
        f"{args.seconds:g} s, {total} samples (idle excluded). Flame graph: "
        f"`{main.svg.name}`; raw stacks: `{main.raw.name}`. Regenerate with "
        f"`.venv/bin/python bench/overhead/profile.py`.",
        "",
        f"Under profiling the server ran {main.rps:,.0f} req/s at {us:.0f} us of CPU per request "
        "(server process, all threads); the *us/req* columns below are that times the share.",
        "",
        "How to read it. *Self* time is time a Python function was the innermost Python frame, so "
        "C code it calls (socket writes, hiredis' parser, `json`, `hashlib`) counts as its own. "
        "Inclusive figures undercount work done in callbacks and Tasks of its own (a "
        "driver's flush scheduled with `call_soon`, redis-py's `wait_for` Task per timed write "
        "on Python 3.11): those samples have no middleware frames above them. The per-layer "
        "self time below does not depend on stacks being complete.",
        "",
        f"## Top {args.top} functions by self time",
        "",
        "| # | function (file) | self % | us/req |",
        "|---|---|---|---|",
    ]
    for i, (name, n) in enumerate(self_fn.most_common(args.top), 1):
        lines.append(f"| {i} | `{name}` | {pct(n)} | {usec(n)} |")
    lines += [
        "",
        "## Self time by layer",
        "",
        "Standard-library frames (asyncio streams and timeouts, contextlib, json, email, "
        "dataclass `__init__`s) are charged to their nearest non-stdlib caller: redis-py's "
        "`StreamWriter.writelines` is the Redis driver's socket write, `json.dumps` under "
        "`fingerprint` is the fingerprint's. *Inclusive* counts every sample with a frame of "
        "that layer anywhere on the stack (so it overlaps across layers).",
        "",
        "| layer | self % (stdlib folded) | us/req | inclusive % |",
        "|---|---|---|---|",
    ]
    for name, n in self_bucket.most_common():
        lines.append(f"| {name} | {pct(n)} | {usec(n)} | {pct(incl_bucket[name])} |")
    lines += [
        "",
        "## Inclusive time of the functions that matter",
        "",
        "| function | what it is | inclusive % | us/req |",
        "|---|---|---|---|",
    ]
    for func, what in WATCH:
        n = sum(v for k, v in incl_fn.items() if k.split(" (")[0] == func)
        if n:
            lines.append(f"| `{func}` | {what} | {pct(n)} | {usec(n)} |")
    if others:
        lines += compare([main, *others])
    return lines


ABOUT = {
    "bare": "the app without idempotency",
    "oncepay-memory": "the middleware with no driver at all (records in a dict)",
    "oncepay-redis": "the Redis store as shipped",
    "oncepay-redis-redispy": "the Redis store on redis-py (experiments.py)",
    "oncepay-redis-pipelined": "the Redis store on a minimal pipelined RESP client "
    "(experiments.py)",
}


def compare(profiles: list[Profile]) -> list[str]:
    """Layers side by side, in us of server CPU per request."""
    tables = []
    for prof in profiles:
        _, buckets, _, total = parse_raw(prof.raw.read_text())
        tables.append({k: prof.cpu_us_per_req * v / total for k, v in buckets.items()})
    layers = sorted({k for t in tables for k in t}, key=lambda k: -max(t.get(k, 0) for t in tables))
    lines = [
        "",
        f"## Side by side: us of server CPU per request by layer ({profiles[0].path} path)",
        "",
        "Same method, same load, one profile each; "
        + "; ".join(f"`{p.variant}`: {ABOUT.get(p.variant, 'see apps.py')}" for p in profiles)
        + ". Profiles are taken one after the other, so machine noise differs between columns: "
        "compare layers within a column, and totals with run.py's table. Kernel time of "
        "loopback TCP (a write also runs the receiving side's TCP processing) is charged to "
        "whichever Python frame is on the CPU, so per-function socket figures are approximate; "
        "totals are not.",
        "",
        "| layer | " + " | ".join(f"`{p.variant}`" for p in profiles) + " |",
        "|---|" + "---|" * len(profiles),
    ]
    for layer in layers:
        cells = [f"{t.get(layer, 0):.0f}" for t in tables]
        if any(c != "0" for c in cells):
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total CPU us/req** | "
        + " | ".join(f"**{p.cpu_us_per_req:.0f}**" for p in profiles)
        + " |"
    )
    lines.append(
        "| req/s under profiling | " + " | ".join(f"{p.rps:,.0f}" for p in profiles) + " |"
    )
    for prof in profiles:
        self_fn, _, _, total = parse_raw(prof.raw.read_text())
        lines += [
            "",
            f"Top 10 self, `{prof.variant}`: "
            + "; ".join(
                f"`{name.split(' (')[0]}` {100 * n / total:.1f}%"
                for name, n in self_fn.most_common(10)
            ),
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="oncepay-redis")
    p.add_argument(
        "--also",
        default="bare,oncepay-memory,oncepay-redis-redispy,oncepay-redis-pipelined",
        help="comma-separated variants to profile for comparison ('' for none)",
    )
    p.add_argument("--path", default="new", choices=run.PATHS)
    p.add_argument("--seconds", type=float, default=15.0, help="per py-spy recording")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--out", type=Path, default=HERE / "PROFILE.md")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)

    main_profile = record(args, args.variant)
    others = [record(args, v.strip()) for v in args.also.split(",") if v.strip()]
    lines = render(args, main_profile, others)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
