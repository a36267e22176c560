"""Load generation: one run of wrk and the summary its script prints.

Every benchmark's Lua script ends with ``done = harness.done`` (``wrkscript.lua``), which writes
one line, ``WRK_JSON {...}``: requests, duration, bytes, latency percentiles in µs, and errors
by kind. wrk's duration is whole seconds.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MARKER", "Load", "errors", "rate", "wrk"]

MARKER = "WRK_JSON "


@dataclass(frozen=True)
class Load:
    """How wrk loads a server: its threads and connections, and optionally the CPU it is
    pinned to (``taskset -c``) and a per-request timeout (``5s``)."""

    connections: int
    threads: int
    cpu: str = ""
    timeout: str = ""
    latency: bool = False  # print wrk's own latency distribution (the summary has it anyway)

    def command(self, url: str, script: Path, seconds: float, args: Sequence[str]) -> list[str]:
        pin = ["taskset", "-c", self.cpu] if self.cpu else []
        options = ["-t", str(self.threads), "-c", str(self.connections), "-d", f"{seconds:g}s"]
        options += ["--timeout", self.timeout] if self.timeout else []
        options += ["--latency"] if self.latency else []
        return [*pin, "wrk", *options, "-s", str(script), url, "--", *args]


def wrk(load: Load, url: str, script: Path, seconds: float, *args: str) -> dict[str, Any]:
    """One run of ``seconds``; ``args`` go to the script's ``init``. Returns its summary."""
    command = load.command(url, script, seconds, args)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith(MARKER):
            return dict(json.loads(line.removeprefix(MARKER)))
    raise RuntimeError(f"no summary from wrk:\n{out}")


def rate(summary: Mapping[str, Any]) -> float:
    """Requests per second over the run."""
    return float(summary["requests"]) / (float(summary["duration_us"]) / 1e6)


def errors(summary: Mapping[str, Any]) -> int:
    """Non-2xx/3xx answers, socket errors and timeouts."""
    return sum(int(v) for k, v in summary.items() if k.startswith("err_"))
