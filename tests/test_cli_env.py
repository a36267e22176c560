"""SPEC §7: "Every setting is also an environment variable ``ONCEPAY_<NAME>``": every option of
every command reads the variable named after its long option (``--grace-days``:
``ONCEPAY_GRACE_DAYS``), but for the exceptions docs/operations.md lists with their reasons
("Settings as variables"). A black-box review, 2026-12-08, found options reading another name
(``gateway --store``: ``ONCEPAY_STORE_URL``) or none (``reconcile --grace-days``). What the
variables do, as a user runs the commands: tests/http/test_gateway.py (``ONCEPAY_STORE``,
``ONCEPAY_OPTIONAL_KEY``), tests/reconciliation/test_cli.py (``ONCEPAY_GRACE_DAYS``),
tests/payments/test_access_log.py (``ONCEPAY_QUIET``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from oncepay.cli import app

runner = CliRunner()
DOCS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

# Options of one invocation, not settings: what it prints, which rows it lists, the key it
# makes; a forgotten variable would change them unseen (docs/operations.md says why for each).
EVERY_COMMAND = {"--json"}
EXCEPTIONS: dict[str, set[str]] = {
    "reconcile runs": {"--acquirer", "--day-from", "--day-to", "--limit", "--starting-after"},
    "reconcile discrepancies": {"--status", "--kind", "--acquirer", "--payment-id", "--reference"}
    | {"--day-from", "--day-to", "--limit", "--starting-after"},
    "merchants keys create": {"--name", "--scope", "--read-only"},
    "merchants keys roll": {"--overlap"},
    "chaos": {"--database-url"},  # its own ONCEPAY_CHAOS_DATABASE_URL, never the service's
    "acquirer": {"--database-url"},  # its own ONCEPAY_ACQUIRER_DATABASE_URL only
}


def commands(command: Any = None, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every command and group of ``oncepay`` (a group's own options too: reconcile's)."""
    command = command or get_command(app)
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, f"{path} {name}".strip())


def options(command: Any) -> Iterator[tuple[str, list[str]]]:
    """Each option's long name and the variables it reads, in order."""
    for param in command.params:
        if param.param_type_name != "option":
            continue
        long = next(opt for opt in param.opts if opt.startswith("--"))
        names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        yield long, names


def variable(option: str) -> str:
    return "ONCEPAY_" + option.removeprefix("--").upper().replace("-", "_")


def test_every_option_reads_its_oncepay_variable_but_the_documented_exceptions() -> None:
    missing, stale, seen = [], [], set()
    for path, command in commands():
        for option, names in options(command):
            excepted = option in EVERY_COMMAND or option in EXCEPTIONS.get(path, set())
            seen.add((path, option))
            if excepted and variable(option) in names:
                stale.append(f"oncepay {path} {option} is listed as an exception but reads it")
            elif not excepted and variable(option) not in names:
                missing.append(f"oncepay {path} {option}: reads {names or 'no variable'}")
    assert missing == []
    assert stale == []
    listed = {(path, option) for path, names in EXCEPTIONS.items() for option in names}
    assert listed - seen == set()  # no exception for an option that is gone


def test_the_exceptions_and_their_reasons_are_in_the_docs() -> None:
    section = DOCS.read_text().split("## Settings as variables")[1].split("\n## ")[0]
    for path, names in {"": EVERY_COMMAND, **EXCEPTIONS}.items():
        for option in names:
            assert f"`{option}`" in section, (path, option)
        if path:
            assert f"`oncepay {path}`" in section, path


def test_the_acquirers_own_names_come_before_the_shared_ones() -> None:
    """``oncepay acquirer`` beside ``oncepay serve`` in one environment: its
    ``ONCEPAY_ACQUIRER_PORT`` must win over the service's ``ONCEPAY_PORT``."""
    [acquirer] = [command for path, command in commands() if path == "acquirer"]
    for option, names in options(acquirer):
        own = variable(option).replace("ONCEPAY_", "ONCEPAY_ACQUIRER_", 1)
        if option == "--database-url":  # never the payments database's variable
            assert names == [own]
            continue
        assert names == [own, variable(option)], option


@pytest.mark.parametrize(
    ("words", "variable", "value", "said"),
    [
        (["reconcile"], "ONCEPAY_GRACE_DAYS", "soon", "Invalid value for ONCEPAY_GRACE_DAYS:"),
        (["serve"], "ONCEPAY_QUIET", "maybe", "ONCEPAY_QUIET: 'maybe' is not a valid boolean"),
        (["serve"], "ONCEPAY_WORKER", "perhaps", "ONCEPAY_WORKER: 'perhaps' is not a valid"),
        (["gateway"], "ONCEPAY_OPTIONAL_KEY", "2", "ONCEPAY_OPTIONAL_KEY: '2' is not a valid"),
        (["serve"], "ONCEPAY_LOOP", "trio", "Invalid value for ONCEPAY_LOOP: 'trio' is not one"),
        (["reconcile"], "ONCEPAY_DATE", "2026-02-30", "ONCEPAY_DATE '2026-02-30' is not a day"),
        (["reconcile"], "ONCEPAY_MAPPING", "nope", "ONCEPAY_MAPPING must be one of"),
        (["serve"], "ONCEPAY_LOG_FORMAT", "xml", "ONCEPAY_LOG_FORMAT: Input should be"),
    ],
)
def test_a_bad_value_from_a_variable_is_exit_2_naming_the_variable(
    words: list[str],
    variable: str,
    value: str,
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Click named the option (``'--quiet'``), which the user never typed."""
    monkeypatch.setattr("uvicorn.run", _never_served)
    monkeypatch.setenv("ONCEPAY_DATABASE_URL", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv("ONCEPAY_UPSTREAM", "http://127.0.0.1:9")
    monkeypatch.setenv(variable, value)
    result = runner.invoke(app, words, terminal_width=200)
    assert result.exit_code == 2, result.output
    assert said in " ".join(result.output.split())
    assert not (tmp_path / "never.db").exists()  # refused before anything started


def _never_served(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("a server started with a bad setting")


def test_the_command_line_wins_over_the_variable_and_is_named_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCEPAY_DATABASE_URL", f"sqlite:///{tmp_path / 'never.db'}")
    monkeypatch.setenv("ONCEPAY_GRACE_DAYS", "soon")
    monkeypatch.setenv("ONCEPAY_MAPPING", "nope")
    result = runner.invoke(
        app, ["reconcile", "--grace-days", "0", "--mapping", "also-nope"], terminal_width=200
    )
    assert result.exit_code == 2, result.output
    assert "--mapping must be one of" in result.output  # the option, its value: not the variable
    assert "also-nope" in result.output
