"""The regression question of issue 18, settled side by side: ``oncepay serve`` at two commits
(two git worktrees sharing this checkout's venv), each pinned to one core and not pinned, in
alternating order, SQLite, one process, POST /v1/payments with wrk -c32.

Each measurement is one call of the shared harness (``../shared/perf/bench.py`` through
``refbench.py``, OncePay only, one round) with ``PYTHONPATH`` pointing at the worktree's
``src`` (the venv's editable install points at the main checkout). Prints one JSON line per
measurement and writes them all to ``--out``.

    git worktree add --detach /tmp/oncepay-56cb324 56cb324
    ln -s $PWD/.venv /tmp/oncepay-56cb324/.venv
    .venv/bin/python bench/e2e/regression.py --old /tmp/oncepay-56cb324 --new /tmp/oncepay-head \
        --out /tmp/regression.json [--rounds 2] [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]


def measure(perf: Path, checkout: Path, pinned: bool, seconds: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [
            sys.executable,
            str(Path(__file__).resolve().parent / "refbench.py"),
            "--perf",
            str(perf),
            "--checkout",
            str(checkout),
            "--out",
            out.name,
            "--rounds",
            "1",
            "--seconds",
            str(seconds),
            "--only",
            "sqlite-1",
            "--systems",
            "oncepay",
            "--no-info",
            "--no-load-wait",
            *([] if pinned else ["--no-pin"]),
        ]
        env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
        subprocess.run(command, env=env, check=True)
        report = json.loads(Path(out.name).read_text())
    cell = report["rounds"][0]["cells"][-1]
    keep = ("payments_per_s", "p50_ms", "p99_ms", "errors", "cpu_ms_per_payment", "cpu_cores")
    return {"checkout": str(checkout), "pinned": pinned, **{k: cell[k] for k in keep}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--perf", type=Path, default=CHECKOUT.parent / "shared" / "perf")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=int, default=15)
    args = parser.parse_args()
    order = [(args.new, True), (args.old, True), (args.old, False), (args.new, False)]
    found: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for checkout, pinned in order if r % 2 == 0 else list(reversed(order)):
            result = {"round": r + 1, "load1": os.getloadavg()[0]}
            result.update(measure(args.perf.resolve(), checkout, pinned, args.seconds))
            print(json.dumps(result), flush=True)
            found.append(result)
            args.out.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
