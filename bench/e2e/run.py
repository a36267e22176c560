"""End-to-end benchmark of the payments service against the limit reference, side by side in one
run: ``POST /v1/payments`` (automatic capture, embedded simulated acquirer, no faults, the
idempotency records in the payments database) on ``oncepay serve`` and on the reference of
``../shared/perf`` (``ref_server.py``: the leanest honest service doing the same durable work,
with 2 or 4 commits a payment), run from where it lives through its own harness
(``bench.py``, via ``refbench.py``) — nothing of it is copied here.

Cells: SQLite with one process, PostgreSQL with one and with two. In each round every cell runs
each system once (on SQLite also the 2-commit reference with group commit, OncePay's own default
durability), the order reversed in every other round. The harness pins single-process servers
to core 0 and wrk (-t2 -c32, ``payment.lua``) to core 1, and measures payments/s, p50/p99, the
CPU per payment of the server processes and of PostgreSQL's backends, and the CPU the machine's
other jobs took meanwhile (a run where they took more than 0.15 of a core is run again, once).

Reports medians over the rounds, OncePay ÷ reference (payments/s, both commit counts) and the
p99 ratio, into results.json, RESULTS.md and the README's end-to-end section.

    .venv/bin/python bench/e2e/run.py [--perf ../shared/perf] [--rounds 3] [--seconds 15]
    .venv/bin/python bench/e2e/run.py --summarize results.json   # tables again, no run
    .venv/bin/python bench/e2e/run.py --rounds 1 --seconds 3 --out /tmp/trial.json  # a trial
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.e2e import refbench
from bench.harness.report import markdown_table

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parents[1]
README = CHECKOUT / "README.md"
# Each invocation of the harness: the cells it runs, and the systems in each.
GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("sqlite-1",), ("ref2", "oncepay", "ref4", "ref2-group")),
    (("postgres-1", "postgres-2"), ("ref2", "oncepay", "ref4")),
)
CELLS = ("sqlite-1", "postgres-1", "postgres-2")
GOAL_RATIO, GOAL_P99 = 0.8, 1.5  # issue 18: at least 0.8 of the reference, p99 within 1.5 x
# A reference run with fewer cores busy than this and at least this much iowait waited on its
# disk's syncs rather than the CPU (CPU-bound runs here keep 1.5-1.9 of the 2 cores busy).
DISK_BOUND_BUSY, DISK_BOUND_IOWAIT = 1.4, 0.3
README_START, README_END = "<!-- bench/e2e:start -->", "<!-- bench/e2e:end -->"
# RESULTS.md below this line is kept as it is (other benches' figures, written by hand).
KEEP = "<!-- bench/e2e/run.py writes what is above this line; the rest is kept -->"


def measure(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Every cell, system and round: the harness's per-run records, with their round."""
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for cells, systems in GROUPS:
            order = systems if r % 2 == 0 else tuple(reversed(systems))
            out = folder / f"round{r + 1}-{cells[0]}.json"
            argv = ["--checkout", str(CHECKOUT), "--out", str(out), "--rounds", "1"]
            argv += ["--seconds", str(args.seconds), "--warmup", str(args.warmup)]
            argv += ["--systems", ",".join(order), "--no-info", "--no-load-wait"]
            argv += [part for cell in cells for part in ("--only", cell)]
            refbench.run(args.perf, argv, quiet_cap=args.quiet_cap)
            report = json.loads(out.read_text())
            for run in report["rounds"][0]["cells"]:
                runs.append({**run, "round": r + 1})
            print(time.strftime("%H:%M:%S"), f"round {r + 1} {'+'.join(cells)} done", flush=True)
    return runs


def kept(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last attempt of each (round, cell, system): the one the harness kept."""
    last: dict[tuple[int, str, str], dict[str, Any]] = {}
    for run in runs:
        last[(run["round"], run["cell"], run["system"])] = run
    return list(last.values())


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """cell -> system -> medians over the rounds."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in kept(runs):
        entry = out.setdefault(run["cell"], {}).setdefault(run["system"], {"runs": []})
        entry["runs"].append(run)
    for systems in out.values():
        for entry in systems.values():
            rs = entry.pop("runs")
            entry.update(
                rounds=len(rs),
                payments_per_s=median([r["payments_per_s"] for r in rs]),
                p50_ms=median([r["p50_ms"] for r in rs]),
                p99_ms=median([r["p99_ms"] for r in rs]),
                # a negative figure is the harness's accounting of a process that ended
                # mid-run (a replaced worker), not a measure: left out
                server_cpu_ms=median(
                    [x for r in rs if (x := r["cpu_ms_per_payment"]["server"]) >= 0]
                ),
                pg_cpu_ms=median([r["cpu_ms_per_payment"]["pg_backends"] for r in rs]),
                other_cores=median([r["cpu_cores"]["other"] for r in rs]),
                # what bound the run: the machine's two cores, or waits (the disk's syncs)
                busy_cores=median([r["cpu_cores"]["machine_busy"] for r in rs]),
                iowait_cores=median([r["cpu_cores"].get("iowait", 0.0) for r in rs]),
                errors=sum(r["errors"] for r in rs),
                contaminated=sum(bool(r.get("contaminated")) for r in rs),
                commits_per_payment=median(
                    [r["pg_per_payment"]["xact_commit"] for r in rs if "pg_per_payment" in r]
                ),
                # the harness counts unbalanced transactions and payments whose payable
                # disagrees with their capture as {"<count>": <count>}
                ledger_ok=all(
                    not any(r["rows"][check].values())
                    for r in rs
                    if "rows" in r
                    for check in ("unbalanced_txns", "payable_mismatch")
                ),
            )
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "—"


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    same = same_commits(summary)  # the goal's p99 is against the reference with OncePay's commits
    headers = (
        "cell",
        "reference, 2 commits",
        "reference, 4 commits",
        "OncePay",
        "OncePay ÷ ref 2",
        "OncePay ÷ ref 4",
        "p50 / p99 ms: OncePay",
        "p99: ref 2 / ref 4",
        f"p99 OncePay ÷ ref {same[-1]}",
        "server CPU ms a payment: OncePay / ref 2 / ref 4",
    )
    lines = []
    for cell in CELLS:
        s = summary.get(cell, {})
        if not {"ref2", "ref4", "oncepay"} <= set(s):
            continue
        o, r2, r4 = s["oncepay"], s["ref2"], s["ref4"]
        lines.append(
            (
                cell,
                f"{r2['payments_per_s']:.0f}",
                f"{r4['payments_per_s']:.0f}",
                f"{o['payments_per_s']:.0f}",
                ratio(o["payments_per_s"], r2["payments_per_s"]),
                ratio(o["payments_per_s"], r4["payments_per_s"]),
                f"{o['p50_ms']:.0f} / {o['p99_ms']:.0f}",
                f"{r2['p99_ms']:.0f} / {r4['p99_ms']:.0f}",
                ratio(o["p99_ms"], s[same]["p99_ms"]),
                f"{o['server_cpu_ms']:.1f} / {r2['server_cpu_ms']:.1f} / {r4['server_cpu_ms']:.1f}",
            )
        )
    return markdown_table(headers, lines, right=set(range(1, 10)))


def details(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    headers: tuple[str, ...] = ("cell", "system", "rounds", "payments/s", "p50 ms", "p99 ms")
    headers += ("server CPU ms", "PostgreSQL CPU ms", "commits (PG)", "other jobs, cores")
    headers += ("cores busy", "iowait, cores", "errors", "ledger")
    lines = []
    for cell in CELLS:
        for system, e in sorted(summary.get(cell, {}).items()):
            commits = e["commits_per_payment"]
            lines.append(
                (
                    cell,
                    system,
                    str(e["rounds"]),
                    f"{e['payments_per_s']:.1f}",
                    f"{e['p50_ms']:.0f}",
                    f"{e['p99_ms']:.0f}",
                    f"{e['server_cpu_ms']:.2f}",
                    f"{e['pg_cpu_ms']:.2f}" if cell.startswith("postgres") else "—",
                    f"{commits:.1f}" if commits == commits else "—",  # NaN on SQLite
                    f"{e['other_cores']:.2f}",
                    f"{e['busy_cores']:.2f}",
                    f"{e['iowait_cores']:.2f}",
                    str(e["errors"]),
                    "balances" if e["ledger_ok"] else "VIOLATED",
                )
            )
    return markdown_table(headers, lines, right=set(range(2, 13)))


def group_note(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """SQLite beside the reference with OncePay's own durability (group commit)."""
    s = summary.get("sqlite-1", {})
    if not {"ref2-group", "oncepay"} <= set(s):
        return ""
    o, g = s["oncepay"], s["ref2-group"]
    return (
        f"On SQLite OncePay runs with group commit (its default, as durable as FULL); the "
        f"2-commit reference with group commit made {g['payments_per_s']:.0f} payments/s "
        f"(p99 {g['p99_ms']:.0f} ms, server CPU {g['server_cpu_ms']:.1f} ms a payment): "
        f"OncePay ÷ it {ratio(o['payments_per_s'], g['payments_per_s'])}, p99 ratio "
        f"{ratio(o['p99_ms'], g['p99_ms'])}."
    )


def regime_note(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Cells whose same-commit reference was not bound by the CPU: well under the machine's two
    cores busy, with cores idle on a sync outstanding. There the ratio measures the syncs (the
    reference's acquirer on SQLite syncs every commit; OncePay's group commit shares them) as
    much as the CPU a payment, so the note says so and gives the ratio of the CPU a payment."""
    same = same_commits(summary)
    notes = []
    for cell in CELLS:
        s = summary.get(cell, {})
        if not {same, "oncepay"} <= set(s):
            continue
        r, o = s[same], s["oncepay"]
        if r["busy_cores"] < DISK_BOUND_BUSY and r["iowait_cores"] >= DISK_BOUND_IOWAIT:
            cpu = (o["server_cpu_ms"] + o["pg_cpu_ms"]) / (r["server_cpu_ms"] + r["pg_cpu_ms"])
            notes.append(
                f"{cell} (the reference {r['busy_cores']:.2f} cores busy, "
                f"{r['iowait_cores']:.2f} in iowait; OncePay's CPU a payment, server and "
                f"PostgreSQL, {cpu:.2f}x the reference's)"
            )
    if not notes:
        return ""
    return (
        "Not bound by the CPU: the same-commit reference in " + "; ".join(notes) + ". There "
        "it waited on its syncs, so the ratio shows OncePay's group commit as much as its CPU; "
        "in a sitting where the reference is CPU-bound the ratio follows the CPU a payment."
    )


def same_commits(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The reference with OncePay's number of commits a payment, as PostgreSQL counted them
    (SQLite cannot count them; the same code commits as often there): ``ref2`` at two, else
    ``ref4`` (the reference comes with 2 or 4; three commits were held against 4)."""
    counts = [
        commits
        for s in summary.values()
        if "oncepay" in s and (commits := s["oncepay"]["commits_per_payment"]) == commits  # not NaN
    ]
    return "ref2" if counts and statistics.median(counts) <= 2.5 else "ref4"


def verdict(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    same = same_commits(summary)
    met = []
    for cell in CELLS:
        s = summary.get(cell, {})
        if not {"ref2", "ref4", "oncepay"} <= set(s):
            continue
        o, r = s["oncepay"], s[same]
        ok = (
            o["payments_per_s"] >= GOAL_RATIO * r["payments_per_s"]
            and o["p99_ms"] <= GOAL_P99 * r["p99_ms"]
        )
        met.append(f"{cell} {'met' if ok else 'not met'}")
    return (
        f"Goal (issue 18): OncePay ≥ {GOAL_RATIO}x the reference with the same number of "
        f"commits (here the {same[-1]}-commit one: OncePay's commits a payment as PostgreSQL "
        f"counted them) and p99 within {GOAL_P99}x of it, every cell: " + "; ".join(met) + "."
    )


def conditions(report: dict[str, Any]) -> str:
    loads = report["load1"]
    other = [r["cpu_cores"]["other"] for r in kept(report["runs"])]
    return (
        f"{report['started']} - {report['finished']} UTC, OncePay at `{report['commit']}` "
        + (
            "(with uncommitted changes in the working tree), "
            if report.get("dirty", True)
            else "(a clean working tree), "
        )
        + f"{report['rounds']} rounds of {report['seconds']} s after {report['warmup']} s of "
        f"warm-up. The machine was shared: 1-minute load average {min(loads):.1f}-"
        f"{max(loads):.1f} during the run, other jobs took {max(0.0, min(other)):.2f}-"
        f"{max(other):.2f} "
        f"cores while the kept runs were measured ({report['contaminated']} of "
        f"{len(kept(report['runs']))} kept runs above the harness's 0.15-core limit). "
        + ", ".join(f"{k} {v}" for k, v in report.get("versions", {}).items())
        + "."
    )


def render(report: dict[str, Any]) -> str:
    summary = report["summary"]
    return (
        "\n\n".join(
            [
                "# End-to-end benchmark: POST /v1/payments, OncePay beside the limit reference",
                "`bench/e2e/run.py` runs `../shared/perf`'s reference and harness from their place "
                "beside `oncepay serve` (embedded acquirer, no faults, idempotency records in the "
                "payments database, SQLite with its default group commit), alternating the order "
                "every round: single-process servers pinned to core 0, wrk -t2 -c32 to core 1. "
                "Medians over the rounds; CPU per payment from /proc (server processes, "
                "PostgreSQL backends). " + conditions(report),
                table(summary),
                " ".join(filter(None, [verdict(summary), regime_note(summary)])),
                "Every system and cell:",
                details(summary),
                "`ref2-group` is the 2-commit reference with group commit on SQLite (OncePay's "
                "default durability); `commits (PG)` is `pg_stat_database.xact_commit` a payment "
                "(read transactions that commit count too); `cores busy`: the machine's two "
                "cores' busy share while the system ran (2 = CPU-bound); `iowait, cores`: idle "
                "time with a disk sync outstanding.",
            ]
        )
        + "\n"
    )


def readme_section(report: dict[str, Any]) -> str:
    summary = report["summary"]
    return "\n\n".join(
        [
            README_START,
            "`bench/e2e/run.py`: `POST /v1/payments` on `oncepay serve` (embedded simulated "
            "acquirer, no faults) beside the limit reference of `../shared/perf` — the leanest "
            "honest Python service doing the same durable work, with 2 or 4 commits a payment — "
            "in alternating rounds of one run: wrk -c32 on one core, single-process servers "
            "pinned to the other; medians. " + conditions(report),
            table(summary),
            " ".join(filter(None, [verdict(summary), regime_note(summary), group_note(summary)]))
            + " Every figure, and what each cell costs in CPU: "
            "[bench/e2e/RESULTS.md](bench/e2e/RESULTS.md); where the time goes: "
            "[bench/e2e/PROFILE.md](bench/e2e/PROFILE.md).",
            README_END,
        ]
    )


def update_readme(section: str) -> None:
    """Only the end-to-end section: between its markers, or (the first time) the paragraphs
    from the section's first line to its last."""
    text = README.read_text()
    if README_START in text:
        pattern = re.escape(README_START) + ".*?" + re.escape(README_END)
        text = re.sub(pattern, lambda _: section, text, count=1, flags=re.S)
    else:
        start = text.index("`bench/e2e/run.py`: `POST /v1/payments`")
        end = text.index("SQLite has one writer.\n", start) + len("SQLite has one writer.")
        text = text[:start] + section + text[end:]
    README.write_text(text)


def write(report: dict[str, Any], out: Path | None) -> None:
    """results.json, RESULTS.md and the README's section; with ``out``, only that JSON file."""
    report["summary"] = summarize(report["runs"])
    report["contaminated"] = sum(bool(r.get("contaminated")) for r in kept(report["runs"]))
    (out or HERE / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    if out is None:
        results = HERE / "RESULTS.md"
        old = results.read_text() if results.exists() else ""
        rest = old[old.index(KEEP) :] if KEEP in old else KEEP + "\n"
        results.write_text(render(report) + "\n" + rest)
        update_readme(readme_section(report))
    print(render(report))


# What the service runs on: a later run on other versions says so (the regression of issue 18
# was first blamed on a FastAPI release; see PROFILE.md).
DEPENDENCIES = [
    "fastapi",
    "starlette",
    "pydantic",
    "sqlalchemy",
    "asyncpg",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in DEPENDENCIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "-"
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--perf", type=Path, default=CHECKOUT.parent / "shared" / "perf")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quiet-cap", type=float, default=60, help="harness's quiet wait, s")
    parser.add_argument("--summarize", type=Path, help="a results.json: tables again, no run")
    parser.add_argument("--out", type=Path, help="write only this JSON file (a trial run)")
    args = parser.parse_args()
    if args.summarize:
        write(json.loads(args.summarize.read_text()), args.out)
        return
    commit = subprocess.run(
        ["git", "-C", str(CHECKOUT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(CHECKOUT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": commit,
        "dirty": bool(dirty),
        "versions": versions(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "perf": str(args.perf.resolve()),
    }
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="oncepay-e2e-") as folder:
        report["runs"] = measure(args, Path(folder))
    loads += [r["load1_at_start"] for r in report["runs"]] + [os.getloadavg()[0]]
    report.update(finished=time.strftime("%H:%M", time.gmtime()), load1=loads)
    write(report, args.out)


if __name__ == "__main__":
    main()
