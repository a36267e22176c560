"""Cells and ratios.

* In-process cells (``CpuCell``): an async operation run N times on ``concurrency`` tasks of one
  event loop, its client CPU per op over several runs; ``rotated`` gives each run's order, so
  that background load on a shared machine hits every cell alike.
* Pairs (``Pairs``): a variant's server against the bare app's, loaded in turn a second apart;
  ratios per pair, their median and interquartile range, and the pooled ratio.
* ``quartiles``, ``weighted``, ``spread``: the statistics both report.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import itertools
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench.harness.cpu import Usage
from bench.harness.processes import ROOT
from bench.harness.report import markdown_table

__all__ = [
    "CPU_CELL_HEADERS",
    "CpuCell",
    "Op",
    "Pairs",
    "cpu_cell_line",
    "cpu_cells_markdown",
    "drive",
    "grid",
    "implementations",
    "load_class_at",
    "measure_stores",
    "quartiles",
    "rotated",
    "run_rounds",
    "spread",
    "store_arguments",
    "weighted",
]

T = TypeVar("T")
Op = Callable[[int], Awaitable[None]]  # takes a sequence number, unique within the process


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(Q1, median, Q3); one value is all three."""
    if len(values) < 2:
        v = values[0] if values else 0.0
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return q1, q2, q3


def weighted(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total if total else 0.0


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how much the runs of one cell disagree."""
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else 0.0


def rotated(items: list[T], shift: int) -> list[T]:
    """``items`` starting at ``shift``: so that no item always follows the same one."""
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


@dataclass
class Pairs:
    """A variant against the bare app in alternating short loads (``--pairs``)."""

    variant: str
    path: str
    verify: str = ""
    seconds: float = 0.0
    bare_rps: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    bare_cpu_us: list[float] = field(default_factory=list)  # server CPU per request
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0
    status: str = "ok"

    @property
    def ratios(self) -> list[float]:
        return [v / b for v, b in zip(self.rps, self.bare_rps, strict=True) if b]

    @property
    def cpu_ratios(self) -> list[float]:
        return [b / v for v, b in zip(self.cpu_us, self.bare_cpu_us, strict=True) if v]

    def add(self, bare: bool, rps: float, cpu_us: float) -> None:
        """One load's throughput and server CPU per request, on the bare side or ours."""
        (self.bare_rps if bare else self.rps).append(rps)
        (self.bare_cpu_us if bare else self.cpu_us).append(cpu_us)

    def pooled(self) -> tuple[float, float]:
        """(req/s ratio, CPU ratio) over all pairs: equal time on each side, so sums compare."""
        rps = sum(self.rps) / sum(self.bare_rps) if sum(self.bare_rps) else 0.0
        bare_cpu = weighted(self.bare_cpu_us, self.bare_rps)
        cpu = weighted(self.cpu_us, self.rps)
        return rps, (bare_cpu / cpu if cpu else 0.0)


async def drive(op: Op, ops: int, concurrency: int, counter: itertools.count[int]) -> float:
    """Run ``ops`` operations on ``concurrency`` tasks; returns wall seconds."""

    async def worker(share: int) -> None:
        for _ in range(share):
            await op(next(counter))

    shares = [ops // concurrency + (i < ops % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(*(worker(share) for share in shares))
    return time.perf_counter() - started


@dataclass
class CpuCell:
    """One implementation's workload at one concurrency: client CPU per op, run after run."""

    impl: str
    workload: str
    concurrency: int
    ops: int
    cpu_us: list[float] = field(default_factory=list)
    user_us: list[float] = field(default_factory=list)
    sys_us: list[float] = field(default_factory=list)
    ops_per_s: list[float] = field(default_factory=list)

    async def measure(self, op: Op, counter: itertools.count[int], warm_up: int) -> None:
        """One run: ``warm_up`` ops untimed, then ``ops`` timed."""
        await drive(op, warm_up, self.concurrency, counter)
        before = Usage.now()
        wall = await drive(op, self.ops, self.concurrency, counter)
        used = Usage.now() - before
        self.cpu_us.append(used.cpu / self.ops * 1e6)
        self.user_us.append(used.user / self.ops * 1e6)
        self.sys_us.append(used.sys / self.ops * 1e6)
        self.ops_per_s.append(self.ops / wall)

    def row(self) -> dict[str, Any]:
        return {
            "impl": self.impl,
            "workload": self.workload,
            "conc": self.concurrency,
            "ops": self.ops,
            "cpu_us_per_op": round(statistics.median(self.cpu_us), 1),
            "user_us": round(statistics.median(self.user_us), 1),
            "sys_us": round(statistics.median(self.sys_us), 1),
            "ops_per_s": round(statistics.median(self.ops_per_s)),
            "spread": round(spread(self.cpu_us), 2),
            "runs": [round(v, 1) for v in self.cpu_us],
        }


CPU_CELL_HEADERS: tuple[str, ...] = (
    "store",
    "workload",
    "conc",
    "ops",
    "CPU us/op",
    "user",
    "sys",
    "ops/s",
)
CPU_CELL_HEADERS += ("spread", "runs")


def cpu_cell_line(r: dict[str, Any]) -> tuple[str, ...]:
    """A ``CpuCell.row()`` as table cells."""
    runs = ", ".join(map(str, r["runs"]))
    return (
        *(r["impl"], r["workload"], str(r["conc"]), f"{r['ops']:,}", str(r["cpu_us_per_op"])),
        *(str(r["user_us"]), str(r["sys_us"]), f"{r['ops_per_s']:,}", f"{r['spread']:.0%}", runs),
    )


def grid(impls: Iterable[str], sizes: dict[str, int], concurrency: Iterable[int]) -> list[CpuCell]:
    """A cell for each implementation, workload (``sizes``: its ops per run) and concurrency."""
    levels = list(concurrency)
    return [CpuCell(i, w, c, sizes[w]) for i in impls for w in sizes for c in levels]


async def run_rounds(
    cells: list[CpuCell], ops: dict[str, dict[str, Op]], runs: int, warm_up: int
) -> list[dict[str, Any]]:
    """``runs`` runs of every cell (``ops``: implementation -> workload -> op), the cells in a
    rotated order each run; the rows."""
    counter = itertools.count()
    for run in range(runs):
        for cell in rotated(cells, run):
            await cell.measure(ops[cell.impl][cell.workload], counter, warm_up)
        print(f"run {run + 1}/{runs} done", file=sys.stderr)
    return [cell.row() for cell in cells]


async def measure_stores(
    stores: dict[str, Any],
    seed: Callable[[Any], Awaitable[None]],
    workloads: Callable[[str, Any], dict[str, Op]],
    args: argparse.Namespace,
    warm_up: int,
) -> list[dict[str, Any]]:
    """The store scripts' loop: seed each store, then every (store, workload, concurrency)
    cell ``args.runs`` times (``--replays`` and ``--cycles`` ops); the stores closed at the end."""
    try:
        for store in stores.values():
            await seed(store)
        ops = {name: workloads(name, store) for name, store in stores.items()}
        sizes = {"replay": args.replays, "claim+complete": args.cycles}
        return await run_rounds(grid(stores, sizes, args.concurrency), ops, args.runs, warm_up)
    finally:
        for store in stores.values():
            await store.aclose()


def store_arguments(description: str, url: str, module: str) -> argparse.ArgumentParser:
    """The store scripts' options (``module``: the store module ``--against`` loads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default=url)
    parser.add_argument("--against", metavar="REV", help=f"also run {module} of this revision")
    parser.add_argument("--replays", type=int, default=20_000)
    parser.add_argument("--cycles", type=int, default=10_000, help="claim+complete ops")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    return parser


def cpu_cells_markdown(rows: list[dict[str, Any]]) -> str:
    return markdown_table(CPU_CELL_HEADERS, [cpu_cell_line(r) for r in rows], right=range(2, 9))


def implementations(
    current: type[Any], revision: str | None, path: str, moved: dict[str, str]
) -> dict[str, type[Any]]:
    """The installed class as "current", after the same class at ``revision`` if one is given."""
    if not revision:
        return {"current": current}
    return {revision: load_class_at(revision, path, current.__name__, moved), "current": current}


def load_class_at(
    revision: str, path: str, name: str, moved: dict[str, str] | None = None
) -> type[Any]:
    """Class ``name`` of the module at ``path`` (from the checkout's root) as it was at a git
    revision, loaded beside the installed one. ``moved``: old module name -> where it lives
    now, for what the old source imports under a name that has since moved."""
    for old, new in (moved or {}).items():
        sys.modules.setdefault(old, importlib.import_module(new))
    show = ["git", "show", f"{revision}:{path}"]
    source = subprocess.run(show, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    copy = Path(tempfile.mkdtemp()) / f"{Path(path).stem}_at_revision.py"
    copy.write_text(source)
    spec = importlib.util.spec_from_file_location(f"oncepay_bench_{copy.stem}_{revision}", copy)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    found: type[Any] = getattr(module, name)
    return found
