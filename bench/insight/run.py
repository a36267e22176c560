"""The analyzer scored and timed (issue 16's targets), on logs from ``oncepay insight simulate``.

Accuracy: for each seed, a labelled week and a held-out week are simulated; the labelled week
is analysed and its findings scored per kind (precision, recall), and the TTLs learned from it
are scored on the held-out week (retry coverage; key-seconds against a fixed 24 h). Speed: the
``oncepay insight analyze LOG --json`` command timed on a log of ~1M lines, in a process of its
own, with its peak memory (ru_maxrss).

    .venv/bin/python -m bench.insight.run [--seeds 3] [--lines 1000000] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.harness.environment import git_state, loadavg, machine
from bench.harness.processes import ROOT
from bench.harness.report import print_table
from oncepay.insight.analyzer import analyze
from oncepay.insight.findings import KINDS
from oncepay.insight.records import to_line
from oncepay.insight.score import score_findings, score_ttl
from oncepay.insight.simulate import Simulation

HERE = Path(__file__).parent


def accuracy(seeds: list[int], tenants: int) -> dict[str, Any]:
    totals = {kind: [0, 0, 0, 0] for kind in KINDS}  # labels, findings, true, found
    ttl = [0, 0, 0, 0.0, 0.0]
    for seed in seeds:
        simulation = Simulation(seed=seed, tenants=tenants)
        analyzer = analyze(simulation.records())
        for kind in score_findings(analyzer.findings(), simulation.labels):
            row = totals[kind.kind]
            row[0] += kind.labels
            row[1] += kind.findings
            row[2] += kind.true_findings
            row[3] += kind.found_labels
        score = score_ttl(simulation.records(held_out=True), analyzer.ttl())
        for i, value in enumerate(
            (
                score.repeats,
                score.covered,
                score.covered_fixed,
                score.key_seconds,
                score.key_seconds_fixed,
            )
        ):
            ttl[i] += value
    return {
        "kinds": {
            kind: {
                "labels": row[0],
                "findings": row[1],
                "precision": row[2] / row[1] if row[1] else 1.0,
                "recall": row[3] / row[0] if row[0] else 1.0,
            }
            for kind, row in totals.items()
        },
        "ttl": {
            "retries": ttl[0],
            "coverage": ttl[1] / ttl[0],
            "coverage_fixed_24h": ttl[2] / ttl[0],
            "key_seconds_vs_24h": ttl[3] / ttl[4],
        },
    }


def speed(lines: int) -> dict[str, Any]:
    """``oncepay insight analyze`` on a simulated log of about ``lines`` lines, with msgspec
    (the ``insight`` extra) and with the standard library alone, side by side in one run."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "usage.jsonl"
        written = 0
        scale = lines / 500_000  # the default simulation writes ~500k lines a week
        with log.open("w") as file:
            for usage in Simulation(seed=99, tenants=30, scale=scale).records():
                file.write(to_line(usage))
                written += 1
        size = log.stat().st_size
        result = _timed(log, written, stdlib=False)
        result["bytes"] = size
        result["stdlib_only"] = _timed(log, written, stdlib=True)
    return result


def _timed(log: Path, written: int, *, stdlib: bool) -> dict[str, Any]:
    """One ``analyze`` in a process of its own: its time, CPU time and peak memory."""
    code = (
        "import resource, sys, time\n"
        "from oncepay.cli import app\n"
        "import oncepay.insight.records as records\n"
        + ("records._decode_fast = None\n" if stdlib else "")
        + "started = time.perf_counter()\n"
        "try:\n"
        f"    app(['insight', 'analyze', {str(log)!r}, '--json'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
        # VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark
        "hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
        "sys.stderr.write(f'{time.perf_counter() - started} "
        "{usage.ru_utime + usage.ru_stime} {hwm}\\n')\n"
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    wall = time.perf_counter() - started
    seconds, cpu, rss_kb = done.stderr.strip().splitlines()[-1].split()
    return {
        "lines": written,
        "seconds": float(seconds),
        "process_seconds": wall,
        "cpu_seconds": float(cpu),  # the machine is shared: CPU time is the steadier figure
        "decisions_per_second": written / float(seconds),
        "decisions_per_cpu_second": written / float(cpu),
        "peak_rss_mb": int(rss_kb) / 1024,
        "findings": len(json.loads(done.stdout)["findings"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=60)
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument(
        "--speed-only", action="store_true", help="Time analyze again; keep the scores."
    )
    args = parser.parse_args()
    if args.speed_only:
        result = json.loads((HERE / "results.json").read_text())
        result["speed"] = speed(args.lines)
        result["speed_environment"] = {"git": git_state(), "loadavg": loadavg()}
        (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        report(result, use_markdown=args.markdown)
        return
    result = {
        "accuracy": accuracy(list(range(1, args.seeds + 1)), args.tenants),
        "speed": speed(args.lines),
        "environment": {"machine": machine(), "git": git_state(), "loadavg": loadavg()},
        "seeds": args.seeds,
        "tenants": args.tenants,
        "self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    (HERE / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result, use_markdown=args.markdown)


def report(result: dict[str, Any], *, use_markdown: bool) -> None:
    kinds = result["accuracy"]["kinds"]
    rows = [
        [kind, str(k["labels"]), str(k["findings"]), f"{k['precision']:.3f}", f"{k['recall']:.3f}"]
        for kind, k in kinds.items()
    ]
    print_table(
        "Findings per kind",
        ["kind", "labels", "findings", "precision", "recall"],
        rows,
        right={1, 2, 3, 4},
        use_markdown=use_markdown,
    )
    ttl, fast = result["accuracy"]["ttl"], result["speed"]
    rows = [
        ["retries on the held-out weeks", f"{ttl['retries']:,}"],
        ["covered by the learned TTLs", f"{100 * ttl['coverage']:.3f} %"],
        ["covered by a fixed 24 h", f"{100 * ttl['coverage_fixed_24h']:.3f} %"],
        ["key-seconds, learned / fixed 24 h", f"{100 * ttl['key_seconds_vs_24h']:.1f} %"],
        ["analyze: lines", f"{fast['lines']:,}"],
        ["analyze: seconds", f"{fast['seconds']:.2f}"],
        ["analyze: decisions/s (wall)", f"{fast['decisions_per_second']:,.0f}"],
        ["analyze: CPU seconds", f"{fast.get('cpu_seconds', 0.0):.2f}"],
        ["analyze: decisions per CPU second", f"{fast.get('decisions_per_cpu_second', 0.0):,.0f}"],
        ["analyze: peak memory", f"{fast['peak_rss_mb']:.0f} MB"],
    ]
    plain = fast.get("stdlib_only")
    if plain:
        rows += [
            ["analyze without msgspec: seconds", f"{plain['seconds']:.2f}"],
            ["analyze without msgspec: decisions/s", f"{plain['decisions_per_second']:,.0f}"],
            [
                "analyze without msgspec: decisions per CPU second",
                f"{plain['decisions_per_cpu_second']:,.0f}",
            ],
        ]
    print_table("TTL and speed", ["measure", "value"], rows, right={1}, use_markdown=use_markdown)


if __name__ == "__main__":
    main()
