"""Reconciliation end to end: :func:`oncepay.reconciliation.pipeline.reconcile` on a real
payments database, a report of N lines against N captured payments.

    python bench/reconciliation/pipeline.py                  # SQLite, PostgreSQL; 10k, 100k
    python bench/reconciliation/pipeline.py --sizes 1000000  # one size
    python bench/reconciliation/pipeline.py --json bench/reconciliation/pipeline.json

Each (database, size) runs in a fresh child process, so that its peak RSS is its own. The
child seeds N captured payments and their capture journals straight into a migrated payments
database (SQLite in a temporary folder, or a PostgreSQL schema of its own, dropped after),
writes the day's settlement report (one capture line per payment, the fee by the schedule, one
amount mismatch planted per thousand lines), then times one call of ``reconcile(services,
"primary", report=…)``: parse, match, classify, read OncePay's books, persist the run and its
discrepancies, post every matched line to the ledger (guard row, journal of three entries, the
payment's settlement columns, a ``payment.settled`` event). A second call (the re-run, which
writes nothing) is timed too. Seeding is not timed."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from bench.harness.environment import git_state, machine  # noqa: E402
from bench.harness.report import markdown_table  # noqa: E402
from bench.reconciliation.books import seed  # noqa: E402
from oncepay.payments.bootstrap import start  # noqa: E402
from oncepay.payments.settings import Settings  # noqa: E402
from oncepay.reconciliation import pipeline  # noqa: E402
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE, FeeSchedule  # noqa: E402
from oncepay.reconciliation.pipeline import reconcile  # noqa: E402
from oncepay.storage.db import Database, read  # noqa: E402

DAY = date(2026, 12, 1)
SIZES = (10_000, 100_000)
POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


def report(count: int) -> bytes:
    """The day's report: the capture of every seeded payment (``books.payment_row``)."""
    out = ["reference,type,amount,currency,fee,net,settled_at,payout_id\n"]
    for n in range(count):
        amount = 1000 + n % 5000 + (1 if n % 1000 == 999 else 0)  # one mismatch per thousand
        fee = DEFAULT_SCHEDULE.fee("capture", amount)
        net = FeeSchedule.net("capture", amount, fee)
        out.append(
            f"pay_{n:010d}_a1,capture,{amount},EUR,{fee},{net},{DAY}T13:00:00+00:00,po_{DAY}_EUR\n"
        )
    return "".join(out).encode()


class Stages:
    """Wall and CPU seconds spent in the pipeline's stages (its module functions wrapped):
    reading the books, posting (the settlement batches, database writes included), keeping
    the run; the rest is the report's two passes (validate, then parse and match)."""

    NAMES = ("_books", "post_settlements", "_keep")

    def __init__(self) -> None:
        self.wall: dict[str, float] = dict.fromkeys(self.NAMES, 0.0)
        self.cpu: dict[str, float] = dict.fromkeys(self.NAMES, 0.0)
        # Calls of a stage under way, and when the first of them began: on PostgreSQL two
        # settlement batches are posted at once, and their overlapping intervals are counted
        # once (the union), not summed.
        self._active: dict[str, int] = dict.fromkeys(self.NAMES, 0)
        self._since: dict[str, tuple[float, float]] = {}
        for name in self.NAMES:
            setattr(pipeline, name, self._timed(name, getattr(pipeline, name)))

    def _timed(self, name: str, function: Any) -> Any:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            if self._active[name] == 0:
                self._since[name] = (time.perf_counter(), time.process_time())
            self._active[name] += 1
            try:
                return await function(*args, **kwargs)
            finally:
                self._active[name] -= 1
                if self._active[name] == 0:
                    wall, cpu = self._since.pop(name)
                    self.wall[name] += time.perf_counter() - wall
                    self.cpu[name] += time.process_time() - cpu

        return timed

    def reset(self) -> None:
        for name in self.NAMES:
            self.wall[name] = self.cpu[name] = 0.0


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS to its current RSS (Linux: ``clear_refs`` 5); the
    current RSS in MB. Without it the peak would be the seeding's or the report's build."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for row in Path("/proc/self/status").read_text().splitlines():
        if row.startswith(field + ":"):
            return int(row.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


AT = datetime(2026, 12, 1, 12, tzinfo=UTC).timestamp()


async def seed_only(url: str, count: int) -> None:
    """Seed the database (run in a process of its own: the measuring process's memory is then
    the run's, not what seeding a million rows left behind)."""
    settings = Settings(database_url=url, acquirer_url="http://127.0.0.1:9", run_worker=False)
    services = await start(settings)
    try:
        await seed(services.db, count, AT)
    finally:
        await services.aclose()


async def measure(url: str, count: int) -> dict[str, float | int | str]:
    settings = Settings(database_url=url, acquirer_url="http://127.0.0.1:9", run_worker=False)
    services = await start(settings)
    db = services.db
    try:
        at = AT
        content = report(count)
        gc.collect()
        seeded_rss = _reset_peak_rss()  # the RSS with the report built, before the run
        stages = Stages()
        load_before = load()
        begun, cpu = time.perf_counter(), time.process_time()
        first = await reconcile(services, "primary", day=DAY, report=content, now=at + 7200)
        elapsed, cpu = time.perf_counter() - begun, time.process_time() - cpu
        load_after = load()
        rss = _peak_rss_mb()
        split = {f"{name.strip('_')}_s": round(stages.wall[name], 3) for name in stages.NAMES}
        split |= {f"{name.strip('_')}_cpu_s": round(stages.cpu[name], 3) for name in stages.NAMES}
        split["report_cpu_s"] = round(cpu - sum(stages.cpu.values()), 3)
        stages.reset()
        begun, rerun_cpu = time.perf_counter(), time.process_time()
        again = await reconcile(services, "primary", day=DAY, report=content, now=at + 7300)
        rerun, rerun_cpu = time.perf_counter() - begun, time.process_time() - rerun_cpu
        assert first.matched == first.settled == count - count // 1000, first
        assert len(first.discrepancies) == count // 1000
        assert (again.settled, again.opened, again.new_run) == (0, 0, False)
        entries = await _count(db, "ledger_entries")
        return {
            "database": db.dialect,
            "lines": count,
            "seconds": elapsed,
            "lines_per_s": count / elapsed,
            "rerun_s": rerun,
            "rerun_cpu_s": rerun_cpu,
            "peak_rss_mb": rss,  # of the first run (from the RSS before it, seeded_rss_mb)
            "before_rss_mb": seeded_rss,
            "ledger_entries": entries,
            "cpu_s": cpu,
            "cpu_us_per_line": cpu / count * 1e6,
            "load_before": load_before,
            "load_after": load_after,
            **split,
        }
    finally:
        if db.schema:
            async with db.engine.begin() as conn:
                await conn.execute(text(f'DROP SCHEMA IF EXISTS "{db.schema}" CASCADE'))
        await services.aclose()


async def _count(db: Database, table: str) -> int:
    async with read(db) as conn:
        return int((await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())


def one(backend: str, count: int) -> dict[str, float | int | str]:
    with tempfile.TemporaryDirectory() as tmp:
        if backend == "sqlite":
            url = f"sqlite:///{Path(tmp) / 'payments.db'}"
        else:
            url = f"{POSTGRES}?schema=bench_pipe_{uuid.uuid4().hex[:8]}"
        subprocess.run([sys.executable, __file__, "--seed", url, str(count)], check=True)
        return asyncio.run(measure(url, count))


def child(backend: str, count: int) -> dict[str, float | int | str]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", backend, str(count)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float | int | str] = json.loads(out.stdout.splitlines()[-1])
    return result


def table(results: list[dict[str, float | int | str]]) -> str:
    headers = (
        "database",
        "lines",
        "end to end s",
        "lines/s",
        "CPU s",
        "CPU µs/line",
        "re-run s",
        "peak RSS MB",
        "load",
    )
    rows = [
        (
            "SQLite" if r["database"] == "sqlite" else "PostgreSQL",
            f"{r['lines']:,}",
            f"{r['seconds']:.2f}",
            f"{r['lines_per_s']:,.0f}",
            f"{r['cpu_s']:.2f}",
            f"{r['cpu_us_per_line']:.0f}",
            f"{r['rerun_s']:.2f}",
            f"{r['peak_rss_mb']:.0f}",
            f"{r['load_before']:.0f}-{r['load_after']:.0f}",
        )
        for r in results
    ]
    return markdown_table(headers, rows, right=range(1, len(headers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--seed", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.seed:
        asyncio.run(seed_only(args.seed[0], int(args.seed[1])))
        return
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    results = []
    for count in args.sizes:
        for backend in args.databases:
            results.append(child(backend, count))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(table(results))
    if args.json:
        document = {"git": git_state(), "machine": machine(), "results": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
