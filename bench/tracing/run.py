"""What tracing costs the payments service (issue 17): ``POST /v1/payments`` (automatic capture,
embedded simulated acquirer, SQLite, one API process, a fresh key per request) against real
``oncepay serve`` processes that differ only in their ``OTEL_*`` variables:

* ``off``: no OTEL_* variable (nothing of the SDK imported);
* ``1%``: OTLP/HTTP export, ``parentbased_traceidratio`` at 0.01;
* ``100%``: the same at 1.0 (every request traced: about ten spans a payment);
* ``1% +sql``, ``100% +sql``: the same with ``ONCEPAY_TRACE_SQL=true``, a span per SQL
  statement too (SQLAlchemy's instrumentation: about 30 more spans a payment).

Every variant's server runs for the whole run; wrk loads one at a time, in rounds whose order
rotates, so a busy moment of this shared 2-core machine falls on every variant alike. Spans
go to a sink (a separate process answering ``POST /v1/traces`` with 200, discarding them), as
they would to a collector. Reported: req/s and server CPU per request of each variant, and
each traced variant's ratios to ``off``: pooled (the sum of its req/s over the sum of off's),
the median over rounds of the ratio within a round, and the same for CPU per request (off's
over the variant's: the throughput a CPU-bound server would keep), the steadier figure on a
shared machine.
Targets: 1 % loses at most 5 % of req/s, 100 % at most 15 %.

    .venv/bin/python bench/tracing/run.py [--rounds 6] [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu
from bench.harness.load import Load, errors, rate, wrk
from bench.harness.processes import free_port, stop_group, wait_port
from bench.harness.report import markdown_table

HERE = Path(__file__).resolve().parent
PAYMENT_SCRIPT = HERE.parent / "e2e" / "payment.lua"
LOAD = Load(connections=8, threads=1, timeout="10s")
WARM_UP = 3  # seconds per server before the rounds: connections, caches, the JIT-less warm-up
TARGETS = {"1%": 0.05, "100%": 0.15}  # the largest loss of req/s allowed

VARIANTS: dict[str, dict[str, str]] = {
    "off": {},
    "1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1"},
    "1% +sql": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
        "ONCEPAY_TRACE_SQL": "true",
    },
    "100% +sql": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "1",
        "ONCEPAY_TRACE_SQL": "true",
    },
}

SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def oncepay(*args: str, env: dict[str, str]) -> str:
    command = [sys.executable, "-m", "oncepay", *args]
    done = subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout


def start(name: str, folder: Path, sink: int) -> tuple[subprocess.Popen[bytes], int, str]:
    """A server for one variant, on its own databases; (process, port, API key)."""
    slug = name.replace("%", "pct").replace(" ", "-")
    env = {
        "ONCEPAY_DATABASE_URL": f"sqlite:///{folder / slug}.db",
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / slug}-acquirer.db",
        "ONCEPAY_RUN_WORKER": "false",
        "ONCEPAY_ACCESS_LOG": "false",
    }
    api_key = json.loads(oncepay("merchants", "create", "bench", env=env))["api_key"]
    traced = VARIANTS[name]
    if traced:
        env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}", **traced}
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    server = subprocess.Popen(
        [sys.executable, "-m", "oncepay", "serve", "--port", str(port)],
        env={**base, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_port(port, server)
    return server, port, api_key


def measure(
    port: int, api_key: str, pid: int, seconds: float, tag: str
) -> tuple[float, float, int]:
    """One load: (req/s, server CPU µs per request, errors)."""
    cpu = process_cpu(pid)
    summary = wrk(LOAD, f"http://127.0.0.1:{port}", PAYMENT_SCRIPT, seconds, api_key, tag)
    used = process_cpu(pid) - cpu
    return rate(summary), used * 1e6 / max(1, int(summary["requests"])), errors(summary)


def run(rounds: int, seconds: float) -> dict[str, Any]:
    names = list(VARIANTS)
    results: dict[str, dict[str, list[float]]] = {n: {"rps": [], "cpu_us": []} for n in names}
    failures = dict.fromkeys(names, 0)
    with tempfile.TemporaryDirectory() as folder:
        sink_port = free_port()
        sink = subprocess.Popen(
            [sys.executable, "-c", SINK, str(sink_port)], start_new_session=True
        )
        servers: dict[str, tuple[subprocess.Popen[bytes], int, str]] = {}
        try:
            wait_port(sink_port, sink)
            for name in names:
                servers[name] = start(name, Path(folder), sink_port)
            for server, port, key in servers.values():
                measure(port, key, server.pid, WARM_UP, f"warm-{time.time_ns()}")
            for round_ in range(rounds):
                order = names[round_ % len(names) :] + names[: round_ % len(names)]
                for name in order:
                    server, port, key = servers[name]
                    rps, cpu_us, failed = measure(
                        port, key, server.pid, seconds, f"r{round_}-{time.time_ns()}"
                    )
                    results[name]["rps"].append(rps)
                    results[name]["cpu_us"].append(cpu_us)
                    failures[name] += failed
                    print(f"round {round_} {name}: {rps:.0f} req/s, {cpu_us:.0f} µs", flush=True)
        finally:
            for server, _, _ in servers.values():
                stop_group(server)
            stop_group(sink)
    return {"rounds": rounds, "seconds": seconds, "results": results, "errors": failures}


def summarize(run_: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant: medians, the pooled req/s ratio to off, and the median over rounds of the
    ratios within each round (req/s, and CPU per request: off's over the variant's)."""
    results = run_["results"]
    off = results["off"]
    rows = []
    for name, figures in results.items():
        pairs = [v / o for v, o in zip(figures["rps"], off["rps"], strict=True)]
        cpu_pairs = [o / v for v, o in zip(figures["cpu_us"], off["cpu_us"], strict=True)]
        rows.append(
            {
                "variant": name,
                "rps_median": round(statistics.median(figures["rps"]), 1),
                "cpu_us_median": round(statistics.median(figures["cpu_us"]), 1),
                "rps_ratio": round(sum(figures["rps"]) / sum(off["rps"]), 3),
                "rps_ratio_median": round(statistics.median(pairs), 3),
                "round_ratio_min": round(min(pairs), 3),
                "round_ratio_max": round(max(pairs), 3),
                "cpu_ratio": round(statistics.median(cpu_pairs), 3),
                "errors": run_["errors"][name],
                "target": f">= {1 - TARGETS[name]:.2f}" if name in TARGETS else "",
            }
        )
    return rows


HEADERS = (
    "variant",
    "req/s (median)",
    "CPU µs/req (median)",
    "req/s vs off (pooled)",
    "req/s vs off (median of rounds)",
    "per round (min-max)",
    "throughput by CPU/req vs off",
    "target",
    "errors",
)


def render(rows: list[dict[str, Any]], run_: dict[str, Any]) -> str:
    intro = (
        f"`bench/tracing/run.py`, {time.strftime('%Y-%m-%d')}, this project's shared 2-core "
        f"machine: wrk (1 thread, {LOAD.connections} connections) loads one server at a time, "
        f"{run_['rounds']} rounds of {run_['seconds']:g} s each, order rotating; "
        "`POST /v1/payments` with a fresh key, SQLite, one API process, embedded acquirer, "
        "spans exported over OTLP/HTTP to a sink process. Nothing pinned."
    )
    table = markdown_table(
        HEADERS,
        [
            (
                r["variant"],
                str(r["rps_median"]),
                str(r["cpu_us_median"]),
                f"{r['rps_ratio']:.3f}",
                f"{r['rps_ratio_median']:.3f}",
                f"{r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}",
                f"{r['cpu_ratio']:.3f}",
                r["target"],
                str(r["errors"]),
            )
            for r in rows
        ],
        right={1, 2, 3, 4, 6, 8},
    )
    return "\n".join(["# What tracing costs: POST /v1/payments", "", intro, "", table]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--report", action="store_true", help="only re-render results.json")
    args = parser.parse_args()
    if args.report:
        measured = json.loads((HERE / "results.json").read_text())["run"]
    else:
        measured = run(args.rounds, args.seconds)
    rows = summarize(measured)
    (HERE / "results.json").write_text(json.dumps({"run": measured, "rows": rows}, indent=2) + "\n")
    text = render(rows, measured)
    (HERE / "RESULTS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
