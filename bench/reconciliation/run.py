"""Reconciliation benchmark: the report reader and the matcher, no database.

    python bench/reconciliation/run.py                 # 10k, 100k, 1M lines (~1 min)
    python bench/reconciliation/run.py --sizes 10000   # one size
    python bench/reconciliation/run.py --markdown      # the table for RESULTS.md

Each size runs in a fresh child process, so that its peak RSS is its own. The child writes a
settlement report of N lines in the SPEC format (a capture for every payment, every tenth
payment also refunded, lines counted as N) to a temporary file, builds OncePay's N operations
as frozen records, then times, with ``time.perf_counter``:

* read: parsing the whole file through the ``oncepay`` mapping (streaming, csv module);
* match: :func:`oncepay.reconciliation.reconcile` over the already parsed lines;
* end to end: read and match streaming together, as ``oncepay reconcile --report`` does;
  settled pairs go to a sink (as a batched ledger writer would take them), and the peak RSS
  is taken right after it: the operations, their index and the references seen.

Each line is settled cleanly except one planted discrepancy per thousand lines (an amount
changed), so the discrepancy path is exercised too. Not measured here: reading OncePay's
operations from the database, persisting the run, ledger postings (issue 15's full pipeline).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.harness.environment import git_state, machine  # noqa: E402
from bench.harness.report import markdown_table  # noqa: E402
from oncepay.reconciliation import (  # noqa: E402
    Books,
    FeeSchedule,
    Operation,
    read_report,
    reconcile,
)
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE  # noqa: E402

DAY = date(2026, 12, 1)
SIZES = (10_000, 100_000, 1_000_000)


def operations(n: int) -> list[Operation]:
    ops: list[Operation] = []
    payment = 0
    while len(ops) < n:
        pid = f"pay_{payment:08d}"
        ops.append(Operation(f"{pid}_capture", pid, "capture", 1000 + payment % 5000, "EUR", DAY))
        if payment % 10 == 0 and len(ops) < n:
            ops.append(Operation(f"re_{payment:08d}", pid, "refund", 300, "EUR", DAY))
        payment += 1
    return ops


def write_report(ops: list[Operation], path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write("reference,type,amount,currency,fee,net,settled_at,payout_id\n")
        for i, op in enumerate(ops):
            amount = op.amount + (1 if i % 1000 == 999 else 0)  # one mismatch per thousand
            fee = DEFAULT_SCHEDULE.fee(op.type, amount)
            net = FeeSchedule.net(op.type, amount, fee)
            out.write(
                f"{op.reference},{op.type},{amount},{op.currency},{fee},{net},"
                f"{op.day}T12:00:00Z,po_{op.day}_{op.currency}\n"
            )


def measure(n: int) -> dict[str, float | int]:
    ops = operations(n)
    books = Books(ops)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "report.csv"
        write_report(ops, path)
        posted: list[str] = []  # what a batched writer would keep: the references
        start = time.perf_counter()  # streaming first: the peak RSS then is its own
        with path.open("rb") as stream:
            streamed = reconcile(
                read_report(stream),
                books,
                as_of=DAY,
                fees=DEFAULT_SCHEDULE,
                settle=lambda line, op: posted.append(op.reference),
            )
        end_to_end = time.perf_counter() - start
        streaming_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        with path.open("rb") as stream:
            lines = list(read_report(stream))
        read = time.perf_counter() - start
        start = time.perf_counter()
        outcome = reconcile(lines, books, as_of=DAY, fees=DEFAULT_SCHEDULE)
        match = time.perf_counter() - start
    assert streamed.as_json() == outcome.as_json()
    assert len(posted) == outcome.matched
    assert len(outcome.discrepancies) == n // 1000, len(outcome.discrepancies)
    return {
        "lines": n,
        "read_s": read,
        "match_s": match,
        "end_to_end_s": end_to_end,
        "lines_per_s": n / end_to_end,
        "discrepancies": len(outcome.discrepancies),
        "peak_rss_mb": streaming_rss,
    }


def child(n: int) -> dict[str, float | int]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True
    )
    result: dict[str, float | int] = json.loads(out.stdout)
    return result


def table(results: list[dict[str, float | int]]) -> str:
    headers = ("lines", "read s", "match s", "end to end s", "lines/s", "peak RSS MB")
    rows = [
        (
            f"{r['lines']:,}",
            f"{r['read_s']:.2f}",
            f"{r['match_s']:.2f}",
            f"{r['end_to_end_s']:.2f}",
            f"{r['lines_per_s']:,.0f}",
            f"{r['peak_rss_mb']:.0f}",
        )
        for r in results
    ]
    return markdown_table(headers, rows, right=range(len(headers)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    results = [child(n) for n in args.sizes]
    print(table(results))
    if args.json:
        document = {"git": git_state(), "machine": machine(), "results": results}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
