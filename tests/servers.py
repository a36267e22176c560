"""Where the test servers are, and what a test does when one is missing.

Outside CI a test that needs PostgreSQL or Redis skips with a one-line reason; under
``CI=true`` it fails, so a missing server can never turn a run green.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_URL = os.environ.get(
    "ONCEPAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("ONCEPAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require(name: str, host: str, port: int) -> None:
    """Skip (or, under CI, fail) unless ``host:port`` accepts connections."""
    if port_open(host, port):
        return
    reason = f"{name} is not answering on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: tests that need it fail instead of skipping)")
    pytest.skip(reason)


def require_postgres() -> None:
    require("PostgreSQL", "127.0.0.1", 5432)


def require_redis() -> None:
    require("Redis", "127.0.0.1", 6379)


def require_tool(name: str) -> None:
    """Skip (or, under CI, fail) unless the command ``name`` is on PATH."""
    import shutil

    if shutil.which(name) is not None:
        return
    reason = f"the {name} command is not installed"
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: tests that need it fail instead of skipping)")
    pytest.skip(reason)
