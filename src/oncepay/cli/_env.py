"""Options as environment variables (SPEC §7; docs/operations.md, "Settings as variables").

Every option reads the variable named after its long option, upper-cased, dashes as
underscores, behind ``ONCEPAY_`` (``--grace-days``: ``ONCEPAY_GRACE_DAYS``), then any older
name of the same setting (``--store``: ``ONCEPAY_STORE``, then ``ONCEPAY_STORE_URL``); the
acquirer's own names (``ONCEPAY_ACQUIRER_PORT``) come before the shared ones. Click takes the
first name that is set and not empty; the command line wins over every variable. A value
refused is named as it was given: the variable when one gave it (Click would name the option,
which the user may never have typed), the option otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperGroup

__all__ = ["Group", "given_as", "on_command_line", "variable_of"]


class Group(TyperGroup):
    """The ``oncepay`` command's group: every sub-command's parsing runs under its ``invoke``,
    so a bad value from a variable is renamed here, once for all of them."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except typer.BadParameter as exc:
            param, where = exc.param, exc.ctx
            if param is not None and exc.param_hint is None and _from_environment(where, param):
                exc.param_hint = variable_of(param)
            raise


def variable_of(param: Any) -> str | None:
    """The variable that gives ``param`` its value, if any: the first of its names set."""
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    return next((name for name in names if os.environ.get(name)), None)


def given_as(name: str) -> str:
    """How the running command's parameter ``name`` was given, for a message: the variable
    that gave its value, or its option (``--name`` for a name that no option has)."""
    ctx, param = _parameter(name)
    if param is None:
        return f"--{name.replace('_', '-')}"
    if _from_environment(ctx, param):
        return variable_of(param) or str(param.opts[0])
    return str(param.opts[0])


def on_command_line(name: str) -> bool:
    """Whether the running command's parameter ``name`` was given on its command line."""
    ctx, param = _parameter(name)
    source = ctx.get_parameter_source(name) if param is not None else None
    return source is not None and source.name == "COMMANDLINE"


def _parameter(name: str) -> tuple[Any, Any]:
    """The running command's context and its parameter ``name`` (None if it has none)."""
    ctx = _current_context()
    params = ctx.command.params if ctx is not None else []
    return ctx, next((p for p in params if p.name == name), None)


def _from_environment(ctx: Any, param: Any) -> bool:
    """Whether ``param`` took its value from a variable (in ``ctx``, its command's context)."""
    source = ctx.get_parameter_source(param.name) if ctx is not None else None
    return source is not None and source.name == "ENVIRONMENT"


def _current_context() -> Any:
    """The running command's Click context (typer 0.2x vendors Click as ``typer._click``)."""
    try:
        from typer._click.globals import get_current_context
    except ImportError:  # a typer on Click itself
        from click import get_current_context  # type: ignore[no-redef]
    return get_current_context(silent=True)
