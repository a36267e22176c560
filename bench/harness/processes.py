"""Start the servers a benchmark measures, wait until they answer, stop them, read their memory.

The port comes from the kernel (``free_port``, the chaos stack's); a server is up when it
accepts a connection (``wait_port``) or answers a health check (``wait_http``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from oncepay.chaos.stack import free_port

__all__ = [
    "HOST",
    "ROOT",
    "children",
    "free_port",
    "last_line",
    "peak_rss_mb",
    "stop",
    "stop_group",
    "wait_http",
    "wait_port",
]

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
# A server importing the service (and migrating its database) binds within seconds here; a
# minute leaves room for a loaded machine without hiding one that never comes up.
START_TIMEOUT = 60.0
# How often to look again while a server starts: short next to a start-up, cheap on the CPU.
POLL = 0.1


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> None:
    """Until something accepts connections on ``port``; fails if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(POLL)
    raise TimeoutError(port)


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until ``url`` answers 200; fails, quoting the server's last log line, if it exits or
    does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited ({process.returncode}): {last_line(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {last_line(log)}")
        time.sleep(POLL)


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def stop(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGINT (uvicorn shuts down gracefully: the lifespan closes the stores), then SIGKILL."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_group(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    """SIGTERM to the process group of a server started with ``start_new_session=True``: the
    server and the worker processes it forked."""
    with contextlib.suppress(ProcessLookupError):  # it died on its own (it failed to start)
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def peak_rss_mb(pid: int) -> float:
    """The most resident memory ``pid`` has used (VmHWM), in MB; 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0
