"""Instructions a payment of ``oncepay serve`` (SQLite, embedded acquirer) at several commits,
under callgrind: deterministic, so it settles what CPU time on a loaded machine cannot.

For each commit: a git worktree under /tmp on this checkout's venv (``PYTHONPATH`` at its
``src``: without it the venv's editable install runs this checkout's code), the server started
under ``valgrind --tool=callgrind``, ``--warm`` payments one after another over HTTP, a dump
(``callgrind_control -d``, which also zeroes the counters), ``--payments`` more, a second dump:
its total over ``--payments`` is the figure (start-up, imports and first-use costs excluded).
Every commit runs at once (callgrind's counts do not depend on the load).

    .venv/bin/python bench/e2e/instructions_history.py 56cb324 6812dab --out /tmp/ir.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.e2e.cpu_history import CHECKOUT, worktree
from bench.harness.processes import stop_group, wait_port
from oncepay.chaos.stack import free_port

BODY = b'{"amount":1250,"currency":"EUR","payment_method":"pm_card_ok"}'
START = 600  # seconds: imports and migrations run ~50x slower under valgrind


def pay(port: int, api_key: str, key: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/payments",
        data=BODY,
        headers={
            "Authorization": f"Bearer {api_key}",
            "Idempotency-Key": key,
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=300) as answer:
        assert answer.status == 201, answer.status


def dump(pid: int, folder: Path) -> int:
    """Dump the counters (and zero them); the total of the new dump file."""
    before = set(folder.glob("cg.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, check=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for path in set(folder.glob("cg.out*")) - before:
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
        time.sleep(0.5)
    raise TimeoutError("no callgrind dump")


def measure(commit: str, warm: int, payments: int) -> dict[str, Any]:
    tree = worktree(commit)
    folder = Path(tempfile.mkdtemp(prefix=f"oncepay-ir-{commit}-"))
    env = {
        **os.environ,
        "PYTHONPATH": str(tree / "src"),
        "PYTHONHASHSEED": "0",
        "ONCEPAY_DATABASE_URL": f"sqlite:///{folder}/p.db",
        "ONCEPAY_ACQUIRER_DATABASE_URL": f"sqlite:///{folder}/a.db",
        "ONCEPAY_RUN_WORKER": "false",
        "ONCEPAY_ACQUIRER_TIMEOUT": "300",  # valgrind is ~50x slower: no call may time out
        "ONCEPAY_LEASE": "250",
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
    command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={folder}/cg.out.%p"]
    command += [python, "-m", "oncepay", "serve", "--port", str(port)]
    server = subprocess.Popen(
        command,
        env=env,
        cwd=tree,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, server, timeout=START)
        for n in range(warm):
            pay(port, api_key, f"warm-{n}")
        dump(server.pid, folder)
        for n in range(payments):
            pay(port, api_key, f"run-{n}")
        total = dump(server.pid, folder)
    finally:
        stop_group(server)
    return {"commit": commit, "instructions_per_payment": round(total / payments)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("commits", nargs="+")
    parser.add_argument("--warm", type=int, default=10)
    parser.add_argument("--payments", type=int, default=30)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with ThreadPoolExecutor(len(args.commits)) as pool:
        found = list(pool.map(lambda c: measure(c, args.warm, args.payments), args.commits))
    for result in found:
        print(json.dumps(result), flush=True)
    args.out.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main()
