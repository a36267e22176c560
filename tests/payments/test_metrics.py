"""``oncepay serve --workers N`` shares one prometheus multiprocess directory (the summing
itself is tested with real processes in test_processes.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from oncepay.cli.serve import shared_metrics


def test_one_process_needs_no_shared_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with shared_metrics(1) as directory:
        assert directory is None
        assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_several_processes_get_a_fresh_directory_removed_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with shared_metrics(2) as directory:
        assert directory is not None
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == directory
        assert list(Path(directory).iterdir()) == []  # no stale figures of an earlier run
        (Path(directory) / "counter_1.db").write_bytes(b"")
    assert not Path(directory).exists()
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def test_a_directory_given_by_the_environment_is_used_and_kept(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with shared_metrics(4) as directory:
        assert directory == str(tmp_path)
    assert tmp_path.exists()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
