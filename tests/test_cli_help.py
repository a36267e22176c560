"""``oncepay --help`` reads cleanly (issue 14): no type beside a flag, whole summaries, and
every command's help renders."""

from __future__ import annotations

from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from oncepay.cli import app

runner = CliRunner()


def _commands() -> list[list[str]]:
    found: list[list[str]] = [[]]
    root: Any = get_command(app)  # typer's own click Group (typer 0.29 vendors click)
    for name, command in root.commands.items():
        found.append([name])
        found.extend([name, sub] for sub in getattr(command, "commands", {}))
    return found


@pytest.mark.parametrize(
    "group", [[], ["merchants"], ["merchants", "keys"], ["insight"], ["ledger"]]
)
def test_the_summaries_are_whole_sentences(group: list[str]) -> None:
    result = runner.invoke(app, [*group, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    commands = result.output.split("Commands:")[1].strip().splitlines()
    assert commands
    for line in commands:
        assert not line.rstrip().endswith("..."), line


@pytest.mark.parametrize("words", _commands(), ids=lambda words: " ".join(words) or "oncepay")
def test_every_help_renders_without_a_type_beside_a_flag(words: list[str]) -> None:
    result = runner.invoke(app, [*words, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    assert "--help  " in result.output or "--help " in result.output
