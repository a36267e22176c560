"""Start real server processes for a test and stop them afterwards."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

# A uvicorn process imports the app and binds within a second or two on this machine; 30 s
# leaves room for a loaded CI box without hiding a server that never comes up.
START_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent
# A server process imports the tree under test: its src/ first, then the repository (tests.*),
# whichever checkout the virtualenv's editable install points at (a second worktree shares it).
PYTHONPATH = os.pathsep.join((str(ROOT / "src"), str(ROOT)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # polling a condition with a deadline, not hoping for an order
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


@contextmanager
def running(
    args: Sequence[str], port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server until the block ends; its stderr is shown if it dies on start."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            list(args),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            try:
                wait_for_port(port, process)
            except RuntimeError as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}:\n{log.read().decode(errors='replace')}") from None
            yield process
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def uvicorn_args(app: str, port: int) -> list[str]:
    # A test server must not wait out requests still hanging on purpose when it is stopped.
    return [
        sys.executable, "-m", "uvicorn", app, "--port", str(port), "--log-level", "warning",
        "--timeout-graceful-shutdown", "1",
    ]  # fmt: skip


def oncepay_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "oncepay", *args]


def read_banner(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Read ``oncepay serve``'s start banner from its text stdout; return the banner and the
    test merchant's API key it prints (a database it created shows one)."""
    assert process.stdout is not None
    banner = ""
    while "try: curl" not in banner:
        line = process.stdout.readline()
        assert line, f"serve ended before its banner: {banner}"
        banner += line
    found = re.search(r"sk_test_[A-Za-z0-9_-]+", banner)
    assert found, banner
    return banner, found.group()
