"""What a result depends on, recorded beside it: versions, the commit, the machine."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.harness.processes import ROOT

__all__ = ["git_state", "loadavg", "machine", "packages", "wrk_version"]


def packages(names: Iterable[str], missing: str = "-") -> dict[str, str]:
    """The installed version of each distribution (``missing`` where it is not installed)."""
    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = missing
    return out


def wrk_version() -> str:
    try:
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    except OSError:
        return "-"
    return out.stdout.split(" [")[0]


def git_state() -> dict[str, Any]:
    """The commit measured and any uncommitted change under src/ (others edit it meanwhile)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, check=False)
        return out.stdout.strip()

    dirty = git("status", "--short", "--", "src").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "dirty_src": dirty}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "loadavg_at_start": loadavg(),
    }
