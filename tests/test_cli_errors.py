"""Wrong arguments get one clear line and exit 2, never a traceback (SPEC §8; a black-box
review of the CLI, 2026-12-07: each case below printed a traceback, or started a service that
could not work, before its fix)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from oncepay.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("words", "said"),
    [
        (["serve", "--acquirer-url", "notaurl"], "--acquirer-url: 'notaurl' is not an http(s) URL"),
        (["worker", "--once", "--acquirer-url", "ftp://x"], "'ftp://x' is not an http(s) URL"),
        (["serve", "--secondary-acquirer-url", "x"], "--secondary-acquirer-url: 'x' is not"),
        (["serve", "--usage-log", "/nonexistent/d/x.log"], "its directory '/nonexistent/d'"),
        (["serve", "--port", "99999"], "--port: Input should be less than or equal to 65535"),
        (["serve", "--log-format", "xml"], "--log-format: Input should be 'text', 'json' or"),
    ],
)
def test_a_bad_service_option_is_one_line_and_exit_2(
    words: list[str], said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCEPAY_DATABASE_URL", f"sqlite:///{tmp_path / 'never.db'}")
    result = runner.invoke(app, words, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert "validation error for Settings" not in result.output  # pydantic's block, as it was
    assert not (tmp_path / "never.db").exists()  # refused before anything started


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("ONCEPAY_RATE_LIMIT_PER_KEY", "bogus", "RATE_LIMIT_PER_KEY: 'bogus' is not a rate"),
        ("ONCEPAY_PORT", "99999", "ONCEPAY_PORT: Input should be less than or equal to 65535"),
    ],
)
def test_a_bad_variable_is_named_as_the_variable_not_an_option(
    variable: str, value: str, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad ``ONCEPAY_RATE_LIMIT_PER_KEY`` was reported as ``--rate-limit-per-key``, an option
    ``oncepay serve`` does not have (a review of the docs)."""
    monkeypatch.setenv("ONCEPAY_DATABASE_URL", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, ["serve"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())
    assert "--rate-limit" not in result.output
    assert not (tmp_path / "never.db").exists()


def test_insight_refuses_a_bad_out_or_labels_file_cleanly(tmp_path: Path) -> None:
    out = runner.invoke(
        app,
        ["insight", "simulate", "--out", str(tmp_path / "no" / "x.jsonl"), "--tenants", "1"],
        terminal_width=200,
    )
    assert out.exit_code == 2, out.output
    assert "its directory does not exist" in " ".join(out.output.split())
    log = tmp_path / "empty.jsonl"
    log.write_text("")
    for text, said in (("{}\n", "KeyError('tenant')"), ("nope\n", "JSONDecodeError")):
        labels = tmp_path / "labels.jsonl"
        labels.write_text(text)
        scored = runner.invoke(app, ["insight", "score", str(log), str(labels)], terminal_width=200)
        assert scored.exit_code == 2, scored.output
        said_all = " ".join(scored.output.split())
        assert "line 1 is not a label" in said_all
        assert said in said_all
    missing = runner.invoke(
        app, ["insight", "score", str(log), str(tmp_path / "none")], terminal_width=200
    )
    assert missing.exit_code == 2, missing.output
    assert "cannot be read" in " ".join(missing.output.split())


def test_a_compact_date_is_not_a_day(tmp_path: Path) -> None:
    """``date.fromisoformat`` reads 20261207 as 2026-12-07; the docs say YYYY-MM-DD."""
    result = runner.invoke(
        app,
        ["reconcile", "--date", "20261207", "--database-url", f"sqlite:///{tmp_path / 'r.db'}"],
        terminal_width=200,
    )
    assert result.exit_code == 2, result.output
    assert "is not a day YYYY-MM-DD" in " ".join(result.output.split())
