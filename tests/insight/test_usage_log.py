"""The key-usage log writer (SPEC §9): the format, hashed keys, and that neither a stalled
writer nor a dead disk ever reaches the caller (a full buffer drops and counts)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from oncepay.insight.usage_log import SECRET_ENV, UsageLog

FIELDS = ["at", "tenant", "route", "key", "fingerprint", "decision", "status", "source", "ttl"]
# A writer that never wakes on its own: a test flushes or closes it when it chooses.
NEVER = 3600.0


def entry(key: str = "k-1", decision: str = "executed") -> tuple[Any, ...]:
    return ("tenant-a", "POST /v1/payments", key, "ab" * 32, decision, 201, "10.0.0.7", 86400.0)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_decision_is_one_json_line_with_the_spec_fields(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", raw_keys=True, interval=NEVER)
    usage.record(*entry())
    usage.record('t"b', "POST /x", "k\n2", "", "missing", 400, None, None)
    usage.close()
    first, second = lines(tmp_path / "usage.jsonl")
    assert list(first) == FIELDS
    assert first["tenant"] == "tenant-a"
    assert first["route"] == "POST /v1/payments"
    assert first["key"] == "k-1"
    assert first["decision"] == "executed"
    assert first["status"] == 201
    assert first["source"] == "10.0.0.7"
    assert first["ttl"] == 86400.0
    assert isinstance(first["at"], float)
    assert second["tenant"] == 't"b'
    assert second["key"] == "k\n2"
    assert second["source"] is None
    assert second["ttl"] is None
    assert usage.written == 2
    assert usage.dropped == 0


def test_keys_are_a_keyed_hash_by_default_stable_across_logs_on_one_path(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    for _ in range(2):  # a restart: the secret kept beside the log hashes the key alike
        usage = UsageLog(path, interval=NEVER)
        usage.record(*entry("raw-key-123"))
        usage.close()
    first, second = lines(path)
    assert "raw-key-123" not in path.read_text()
    assert len(first["key"]) == 32
    assert first["key"] == second["key"]
    assert (tmp_path / "usage.jsonl.secret").stat().st_mode & 0o777 == 0o600


def test_a_missing_key_is_written_as_none_not_as_a_hash(tmp_path: Path) -> None:
    """A ``missing`` decision has no key: with hashing on (the default) it was written as the
    hash of "" (the same 32 hex digits every time), which reads as a key sent many times."""
    path = tmp_path / "usage.jsonl"
    usage = UsageLog(path, interval=NEVER)
    usage.record("tenant-a", "POST /v1/payments", "", "", "missing", 400, None, None)
    usage.record(*entry("raw-key-123"))
    usage.close()
    missing, sent = lines(path)
    assert missing["key"] == ""
    assert len(sent["key"]) == 32


def test_another_secret_hashes_differently(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "from-the-environment")
    by_env = UsageLog(tmp_path / "a.jsonl", interval=NEVER)
    given = UsageLog(tmp_path / "b.jsonl", secret=b"given", interval=NEVER)
    for usage in (by_env, given):
        usage.record(*entry("same-key"))
        usage.close()
    assert lines(tmp_path / "a.jsonl")[0]["key"] != lines(tmp_path / "b.jsonl")[0]["key"]
    assert not (tmp_path / "a.jsonl.secret").exists()


class BlockedFile:
    """A file whose first write blocks until the test lets it go: a stalled disk."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.data = b""

    def write(self, data: bytes) -> int:
        self.entered.set()
        assert self.release.wait(30), "the test never released the writer"
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_a_full_buffer_drops_and_counts_without_blocking() -> None:
    file = BlockedFile()
    usage = UsageLog(file, capacity=3, interval=0.001)  # type: ignore[arg-type]
    usage.record(*entry("k-0"))
    assert file.entered.wait(30)  # the writer holds k-0 and is stuck in write()
    for i in range(1, 6):  # returns at once: 3 buffered, 2 dropped
        usage.record(*entry(f"k-{i}"))
    assert usage.dropped == 2
    file.release.set()
    usage.close()
    assert usage.written == 4
    assert usage.dropped == 2
    assert len(file.data.splitlines()) == 4


class DeadFile:
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass


def test_a_failing_write_is_counted_and_logged_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    usage = UsageLog(DeadFile(), interval=NEVER)  # type: ignore[arg-type]
    usage.record(*entry("k-1"))
    usage.record(*entry("k-2"))
    usage.flush()
    usage.record(*entry("k-3"))
    usage.close()
    assert usage.write_errors == 2
    assert usage.dropped == 3
    assert usage.written == 0
    errors = [r for r in caplog.records if r.name == "oncepay.insight"]
    assert len(errors) == 1
    assert "cannot be written" in errors[0].getMessage()


def test_a_vanished_directory_is_counted_then_recovers(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    usage = UsageLog(folder / "usage.jsonl", interval=NEVER)
    shutil.rmtree(folder)
    usage.record(*entry("k-1"))
    usage.flush()
    assert usage.write_errors == 1
    assert usage.dropped == 1
    folder.mkdir()  # the disk is back: the next batch reopens the file
    usage.record(*entry("k-2"))
    usage.close()
    assert usage.written == 1
    assert len(lines(folder / "usage.jsonl")) == 1


def test_close_writes_the_last_batch_and_later_records_are_dropped(tmp_path: Path) -> None:
    usage = UsageLog(tmp_path / "usage.jsonl", interval=NEVER)
    for i in range(100):
        usage.record(*entry(f"k-{i}"))
    usage.close()
    usage.close()  # idempotent
    assert len(lines(tmp_path / "usage.jsonl")) == 100
    usage.record(*entry("late"))
    assert usage.dropped == 1


def test_the_prometheus_counters_follow_the_attributes(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    dropped, errors = (
        value("oncepay_usage_log_dropped_total"),
        value("oncepay_usage_log_write_errors_total"),
    )
    usage = UsageLog(DeadFile(), interval=NEVER)  # type: ignore[arg-type]
    usage.record(*entry())
    usage.close()
    assert value("oncepay_usage_log_dropped_total") == dropped + 1
    assert value("oncepay_usage_log_write_errors_total") == errors + 1


def test_a_forked_child_writes_its_own_records_only(tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    usage = UsageLog(path, interval=NEVER)
    usage.record(*entry("parent"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        usage.record(*entry("child"))
        usage.close()
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    usage.close()
    assert len(lines(path)) == 2  # each record once: the child did not write the parent's
