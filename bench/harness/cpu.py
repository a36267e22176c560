"""CPU accounting: a server process's, a core's, wrk's (our children's) and our own.

Wall-clock throughput on this small shared machine moves with whatever else runs; CPU time per
request moves much less, so every benchmark reports it beside req/s.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Quiet", "Usage", "busy", "children_cpu", "core_times", "process_cpu"]

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User+sys CPU seconds of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def core_times(cpu: str) -> tuple[float, float, float]:
    """(total, busy, steal) seconds of one CPU since boot."""
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            v = [int(x) / TICK for x in values]
            total = sum(v[:8])
            idle = v[3] + v[4]
            return total, total - idle, v[7]
    return 0.0, 0.0, 0.0


# Long enough to average over the scheduler's ticks, short enough to sample before each cell.
BUSY_INTERVAL = 0.5


def busy(cpus: list[str], interval: float = BUSY_INTERVAL) -> float:
    """The highest busy share (%) among ``cpus`` over ``interval`` seconds."""
    before = [core_times(c) for c in cpus]
    time.sleep(interval)
    after = [core_times(c) for c in cpus]
    shares = [
        100 * (a[1] - b[1]) / (a[0] - b[0]) if a[0] > b[0] else 0.0
        for a, b in zip(after, before, strict=True)
    ]
    return max(shares)


def children_cpu() -> float:
    """User+sys CPU seconds of our children that have ended (each wrk run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Quiet:
    """Before each cell, wait (within a budget) until the CPUs are idle enough: other work
    on this shared machine moves req/s a lot."""

    def __init__(self, cpus: list[str], threshold: float, per_cell: float, budget: float) -> None:
        self.cpus = cpus
        self.threshold, self.per_cell, self.budget = threshold, per_cell, budget

    def wait(self) -> tuple[float, float]:
        """(seconds waited, busy share at the end)."""
        start = time.monotonic()
        while True:
            share = busy(self.cpus)
            waited = time.monotonic() - start
            if self.threshold <= 0 or share <= self.threshold:
                break
            if waited >= min(self.per_cell, self.budget):
                break
        self.budget = max(0.0, self.budget - waited)
        return waited, share


@dataclass(frozen=True)
class Usage:
    """This process's CPU (``process_time``: every thread), its user/sys split (``getrusage``)
    and the wall clock, at one moment; ``later - earlier`` is what a stretch of work cost."""

    cpu: float
    user: float
    sys: float
    wall: float

    @classmethod
    def now(cls) -> Usage:
        rusage, cpu = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        return cls(cpu, rusage.ru_utime, rusage.ru_stime, time.perf_counter())

    def __sub__(self, earlier: Usage) -> Usage:
        return Usage(
            self.cpu - earlier.cpu,
            self.user - earlier.user,
            self.sys - earlier.sys,
            self.wall - earlier.wall,
        )
