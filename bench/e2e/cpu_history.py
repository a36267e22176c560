"""Server CPU per payment across the project's history, same venv: for each commit given, a git
worktree under /tmp (this checkout's venv linked in, ``PYTHONPATH`` at its ``src`` — without
it the venv's editable install would run this checkout's code whatever the worktree), then
``oncepay serve`` (SQLite, embedded acquirer) pinned to core 0 and wrk -t2 -c8 on core 1 with
this checkout's ``payment.lua``, in alternating order over ``--rounds``.

CPU time per payment is what a loaded machine distorts least (throughput there is mostly the
other jobs'); it still rises with contention, so compare commits measured in the same run.

    .venv/bin/python bench/e2e/cpu_history.py 56cb324 6812dab [...] --out /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu
from bench.harness.load import Load, errors, rate, wrk
from bench.harness.processes import stop_group, wait_port
from oncepay.chaos.stack import free_port

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]
LOAD = Load(connections=8, threads=2, cpu="1")
WARM_UP = 3  # seconds: connections, caches


def worktree(commit: str) -> Path:
    sha = subprocess.run(
        ["git", "-C", str(CHECKOUT), "rev-parse", "--short", commit],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = Path(f"/tmp/oncepay-{sha}")
    if not path.exists():
        git = ["git", "-C", str(CHECKOUT), "worktree", "add", "--detach", str(path), sha]
        subprocess.run(git, capture_output=True, check=True)
        (path / ".venv").symlink_to(CHECKOUT / ".venv")
    return path


def measure(tree: Path, seconds: float, folder: Path) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "ONCEPAY_DATABASE_URL": f"sqlite:///{folder / tag}.db",
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder / tag}-acq.db",
        "ONCEPAY_WORKERS": "1",
        "ONCEPAY_RUN_WORKER": "false",
    }
    python = str(CHECKOUT / ".venv" / "bin" / "python")
    created = subprocess.run(
        [python, "-m", "oncepay", "merchants", "create", "bench"],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
    )
    api_key = json.loads(created.stdout)["api_key"]
    port = free_port()
    command = ["taskset", "-c", "0", python, "-m", "oncepay", "serve", "--port", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=tree,
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
        "payments_per_s": round(rate(summary), 1),
        "server_cpu_ms_per_payment": round(cpu / max(1, summary["requests"]) * 1000, 2),
        "errors": errors(summary),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    trees = {commit: worktree(commit) for commit in args.commits}
    found: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oncepay-cpu-") as tmp:
        for r in range(args.rounds):
            order = args.commits if r % 2 == 0 else list(reversed(args.commits))
            for commit in order:
                result = {"round": r + 1, "commit": commit, "load1": round(os.getloadavg()[0], 1)}
                try:
                    result.update(measure(trees[commit], args.seconds, Path(tmp)))
                except (subprocess.CalledProcessError, RuntimeError) as exc:
                    result["error"] = str(exc)  # a commit that does not start: say so, go on
                print(json.dumps(result), flush=True)
                found.append(result)
                args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
