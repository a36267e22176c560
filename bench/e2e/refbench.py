"""The shared limit-reference harness (``../shared/perf/bench.py``), run from where it lives.

The harness reads wrk's summary from a line ``E2E_JSON {...}``, which ``payment.lua`` printed
when the harness was written; this checkout's script prints the same summary as
``WRK_JSON {...}`` (``bench/harness/wrkscript.lua``). This module loads the harness by its path,
lets its wrk step take either line, and runs its ``main`` with the arguments given — nothing of
the reference is copied into the project.

    .venv/bin/python bench/e2e/refbench.py [--perf ../shared/perf] -- --checkout . --out r.json
"""

from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

CHECKOUT = Path(__file__).resolve().parents[2]
DEFAULT_PERF = CHECKOUT.parent / "shared" / "perf"
SUMMARIES = ("WRK_JSON ", "E2E_JSON ")


def harness(perf: Path, quiet_cap: float | None = None) -> ModuleType:
    """``perf/bench.py`` as a module, its wrk step reading either summary line; ``quiet_cap``
    shortens its wait for a quiet machine before each server (60 s), which on a machine busy
    with other jobs never comes and only stretches the run."""
    spec = importlib.util.spec_from_file_location("oncepay_perf_bench", perf / "bench.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(perf / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def wrk(
        args: Any, port: int, api_key: str, seconds: int, prefix: str, lua: str
    ) -> dict[str, Any]:
        cmd = ["taskset", "-c", "1", "wrk", "-t", "2", "-c", "32", "-d", f"{seconds}s"]
        cmd += ["--latency", "-s", lua, f"http://127.0.0.1:{port}", "--", api_key, prefix]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith(SUMMARIES))
        summary: dict[str, Any] = json.loads(line.split(" ", 1)[1])
        return summary

    module.wrk = wrk  # type: ignore[attr-defined]
    if quiet_cap is not None:
        module.quiet = functools.partial(module.quiet, cap=quiet_cap)  # type: ignore[attr-defined]
    return module


def run(perf: Path, argv: list[str], quiet_cap: float | None = None) -> None:
    """The harness's ``main`` with ``argv`` as its command line."""
    module = harness(perf.resolve(), quiet_cap)
    saved = sys.argv
    sys.argv = [str(perf / "bench.py"), *argv]
    try:
        module.main()
    finally:
        sys.argv = saved


def main() -> None:
    argv = sys.argv[1:]
    perf = DEFAULT_PERF
    if argv[:1] == ["--perf"]:
        perf, argv = Path(argv[1]), argv[2:]
    run(perf, argv[1:] if argv[:1] == ["--"] else argv)


if __name__ == "__main__":
    main()
