"""``oncepay insight``: analyze (a path or -, --json as SPEC §9 has it), simulate, score."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from oncepay.cli import app
from oncepay.insight.records import to_line
from tests.insight.traffic import T0, normal, ordered, usage

runner = CliRunner()


def _log(tmp_path: Path) -> Path:
    """A tenant's two days with a storm of 409s planted in hour 30, and one bad line."""
    rng = random.Random(1)
    storm = []
    for n in range(60):
        at = T0 + 30 * 3600 + n * 50.0
        storm.append(usage(at, f"s{n}"))
        storm += [usage(at + 0.1 * i, f"s{n}", "in_progress", status=409) for i in range(1, 9)]
    lines = [to_line(u) for u in ordered(normal(rng), iter(storm))]
    lines.insert(10, "this is not a record\n")
    path = tmp_path / "usage.jsonl"
    path.write_text("".join(lines))
    return path


def test_analyze_json_is_the_contract(tmp_path: Path) -> None:
    result = runner.invoke(app, ["insight", "analyze", str(_log(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"findings", "ttl"}
    (finding,) = document["findings"]
    assert set(finding) == {"tenant", "kind", "first_at", "last_at", "events", "detail"}
    assert (finding["tenant"], finding["kind"]) == ("m_1", "no_backoff")
    assert finding["events"] == 60 * 7  # each key's 409s but the first (a double click's)
    (ttl,) = document["ttl"]
    assert set(ttl) == {"tenant", "route", "ttl_seconds", "basis"}
    assert ttl["route"] == "POST /v1/payments"
    assert isinstance(ttl["ttl_seconds"], int)
    assert "1 of" in result.stderr
    assert "line 11" in result.stderr


def test_analyze_reads_stdin_given_as_a_dash(tmp_path: Path) -> None:
    log = _log(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "oncepay", "insight", "analyze", "-", "--json"],
        input=log.read_bytes(),
        capture_output=True,
        check=True,
    )
    assert [f["kind"] for f in json.loads(done.stdout)["findings"]] == ["no_backoff"]
    assert b"were not decision records" in done.stderr


def test_analyze_without_json_says_it_in_sentences(tmp_path: Path) -> None:
    result = runner.invoke(app, ["insight", "analyze", str(_log(tmp_path))])
    assert result.exit_code == 0
    assert "no_backoff" in result.stdout
    assert "Retry-After" in result.stdout


def test_analyze_of_a_missing_log_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["insight", "analyze", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_analyze_refuses_contradictory_ttl_bounds(tmp_path: Path) -> None:
    args = ["insight", "analyze", str(_log(tmp_path)), "--ttl-min", "600", "--ttl-max", "60"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2


def test_simulate_then_score_finds_what_was_planted(tmp_path: Path) -> None:
    out = tmp_path / "week.jsonl"
    args = ["insight", "simulate", "--out", str(out), "--tenants", "10", "--days", "4"]
    result = runner.invoke(app, [*args, "--scale", "0.5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    labels = tmp_path / "week.labels.jsonl"
    assert {json.loads(line)["kind"] for line in labels.read_text().splitlines()} == {
        "key_per_retry", "key_reuse", "replay_storm", "retry_after_expiry", "no_backoff",
    }  # fmt: skip
    held_out = tmp_path / "week.heldout.jsonl"
    args = ["insight", "score", str(out), str(labels), "--held-out", str(held_out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert all(k["recall"] == 1.0 for k in scores["kinds"]), scores
    assert scores["ttl"]["coverage"] >= 0.999
    assert scores["ttl"]["key_seconds_vs_24h"] <= 0.5
