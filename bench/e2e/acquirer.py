"""The embedded acquirer's cost a call, beside the limit reference's in-process acquirer.

OncePay's side is what ``oncepay serve`` runs for every payment with no acquirer URL: the
acquirer client (``EmbeddedAcquirer``: retries, breaker, throttle, budget, health, journal,
metrics) calling the simulator as a function (validation, fingerprint, one SQLite
transaction with group commit, the answer). The reference's side is ``../shared/perf``'s
``acquirer_authorize`` (imported from there, not copied): one SQLite transaction claiming the
reference, the authorization and its capture. Both authorize-and-capture at ``--concurrency``
calls in flight on one uvloop loop, each on a fresh database.

    .venv/bin/python bench/e2e/acquirer.py cpu [--rounds 5] [--calls 3000]
        # alternating rounds in one run: process CPU a call, medians and the ratio
    .venv/bin/python bench/e2e/acquirer.py instructions [--src DIR]
        # callgrind, (Ir(600) - Ir(200)) / 400 a call: deterministic to ~0.5 %

``--ref-sync GROUP`` (default: the reference with group commit, as OncePay's default) or
``FULL`` (what ``bench/e2e/run.py``'s PostgreSQL cells give the reference's acquirer).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PERF = ROOT.parent / "shared" / "perf"
Call = Callable[[str], Awaitable[Any]]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _oncepay(folder: str) -> Call:
    from oncepay.payments.acquirers.control import RetryControl
    from oncepay.payments.acquirers.embedded import EmbeddedAcquirer
    from oncepay.payments.settings import Settings
    from oncepay.simulator import create_app

    app = create_app(f"sqlite:///{folder}/a.db")
    control = RetryControl.from_settings(Settings())
    acquirer = EmbeddedAcquirer("primary", app, control=control)

    async def one(n: str) -> Any:
        return await acquirer.authorize(
            reference=f"pay_{n}_a1",
            order_id=f"pay_{n}",
            amount=1250,
            currency="EUR",
            payment_method="pm_card_ok",
            capture=True,
        )

    return one


async def _reference(folder: str, sync: str) -> Call:
    os.environ["REF_SYNC"] = sync  # read when the module is imported
    sys.path.insert(0, str(PERF))
    import ref_server  # type: ignore[import-not-found]  # ../shared/perf, run from its place

    ref_server.STATE["acq"] = ref_server.Lite(f"{folder}/r.db", ref_server.ACQ_SCHEMA)

    async def one(n: str) -> Any:
        return await ref_server.acquirer_authorize(
            f"pay_{n}_a1", f"pay_{n}", 1250, "EUR", "pm_card_ok", True
        )

    return one


async def measure(system: str, calls: int, concurrency: int, warm: int, sync: str) -> float:
    """Process CPU microseconds a call (after ``warm`` calls)."""
    folder = tempfile.mkdtemp(prefix="oncepay-acq-")
    one = await (_oncepay(folder) if system == "oncepay" else _reference(folder, sync))
    tag = uuid.uuid4().hex[:6]
    for n in range(warm):
        await one(f"w{tag}{n}")
    numbers = iter(range(calls))

    async def worker() -> None:
        for n in numbers:
            await one(f"{tag}{n}")

    before = _cpu()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (_cpu() - before) / calls * 1e6


def _child(system: str, calls: int, args: argparse.Namespace, env: dict[str, str]) -> str:
    command = [sys.executable, __file__, "one", system, "--calls", str(calls)]
    command += ["--concurrency", str(args.concurrency), "--ref-sync", args.ref_sync]
    command += ["--warm", str(args.warm)]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["cpu", "instructions", "one"])
    parser.add_argument("system", nargs="?", default="oncepay")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warm", type=int, default=100)
    parser.add_argument("--ref-sync", choices=["GROUP", "FULL"], default="GROUP")
    parser.add_argument("--src", help="OncePay's source tree (default: this checkout's src)")
    args = parser.parse_args()
    if args.what == "one":
        import uvloop

        cost = uvloop.run(
            measure(args.system, args.calls, args.concurrency, args.warm, args.ref_sync)
        )
        print(f"{cost:.1f}")
        return
    env = {**os.environ, "PYTHONPATH": args.src or str(ROOT / "src")}
    if args.what == "cpu":
        found: dict[str, list[float]] = {"oncepay": [], "reference": []}
        for n in range(args.rounds):
            order = ["oncepay", "reference"] if n % 2 == 0 else ["reference", "oncepay"]
            for system in order:
                found[system].append(float(_child(system, args.calls, args, env)))
            print(f"round {n + 1}: " + ", ".join(f"{s} {v[-1]:.0f} µs" for s, v in found.items()))
        medians = {system: statistics.median(values) for system, values in found.items()}
        print(
            f"CPU a call (median of {args.rounds}): OncePay {medians['oncepay']:.0f} µs, "
            f"reference ({args.ref_sync}) {medians['reference']:.0f} µs, "
            f"OncePay ÷ reference {medians['oncepay'] / medians['reference']:.2f}"
        )
        return
    counts = {}
    for calls in (200, 600):
        out = Path(tempfile.mkdtemp()) / "callgrind.out"
        command = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
        command += [__file__, "one", args.system, "--calls", str(calls), "--warm", "20"]
        command += ["--ref-sync", args.ref_sync, "--concurrency", str(args.concurrency)]
        subprocess.run(command, env=env, capture_output=True, check=True)
        summary = next(
            line
            for line in out.read_text().splitlines()
            if line.startswith(("summary:", "totals:"))
        )
        counts[calls] = int(summary.split()[1])
    per_call = (counts[600] - counts[200]) / 400
    print(f"instructions a call ({args.system}, {args.concurrency} in flight): {per_call:,.0f}")


if __name__ == "__main__":
    main()
