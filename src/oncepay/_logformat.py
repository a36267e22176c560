"""How the long-running commands' log lines look (``serve``, ``worker``, ``gateway``,
``acquirer``; docs/observability.md, "Logs"). SPEC §11: logs are structured and carry trace ids.

``--log-format`` / ``ONCEPAY_LOG_FORMAT``:

* ``json``: one JSON object a line through structlog's stdlib integration
  (:class:`structlog.stdlib.ProcessorFormatter`), for the ``oncepay.*`` loggers and uvicorn's
  alike: ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``event`` (the message), the
  fields a call passed as ``extra`` (the access log's ``method``, ``path``, ``status``,
  ``duration_ms``, ``decision``, ``request_id``) and, while tracing is on, ``trace_id`` and
  ``span_id`` of the span in progress. structlog is imported only for ``json``.
* ``text``, for a person at a terminal: ``<time> <message>``, e.g. the access log's ``POST
  /v1/payments 201 12.3ms decision=executed request_id=req_…``, with `` trace_id=… span_id=…``
  after it while a span is in progress.
* ``auto``, the default: ``text`` when the log's stream (stderr) is a terminal, ``json`` when
  it is not (a pipe, a file, a container's log collector), decided once at start.

Trace ids come from whatever tracing the process runs: the payments service's tracing
registers its look-up with :func:`trace_ids_from` when it starts (nothing here imports it).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable
from typing import IO, Any, Literal

__all__ = [
    "FORMATS",
    "LogFormat",
    "Resolved",
    "TextFormatter",
    "json_formatter",
    "oncepay_logging",
    "resolve",
    "trace_ids_from",
    "uvicorn_logging",
]

LogFormat = Literal["text", "json", "auto"]
Resolved = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json", "auto")

TraceIds = Callable[[], tuple[str, str] | None]


def _no_trace() -> tuple[str, str] | None:
    return None


_trace_ids: TraceIds = _no_trace


def trace_ids_from(source: TraceIds) -> None:
    """Take (trace id, span id) of the span in progress from ``source`` (None: no span)."""
    global _trace_ids  # noqa: PLW0603 -- one look-up a process, set when its tracing starts
    _trace_ids = source


def resolve(log_format: LogFormat, stream: IO[str] | None = None) -> Resolved:
    """``auto`` as ``text`` for a terminal, ``json`` for anything else; the others as they are.
    ``stream`` is where the lines go: stderr unless told."""
    if log_format != "auto":
        return log_format
    stream = sys.stderr if stream is None else stream
    try:
        terminal = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no stream, or a closed one: nobody is looking
        terminal = False
    # The service and gateway extras install structlog; an install without it logs text rather
    # than failing to start.
    return "text" if terminal or importlib.util.find_spec("structlog") is None else "json"


class TextFormatter(logging.Formatter):
    """``<time> <message>``, and the trace and span ids while a span is in progress."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _trace_ids()
        return line if ids is None else f"{line} trace_id={ids[0]} span_id={ids[1]}"


def formatter_config(log_format: Resolved) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` formatter entry for the format."""
    factory = "json_formatter" if log_format == "json" else "TextFormatter"
    return {"()": f"{__name__}.{factory}"}


def oncepay_logging(log_format: Resolved, *, access: bool = False) -> dict[str, Any]:
    """A ``dictConfig`` for OncePay's loggers: warnings and errors on stderr, in the format;
    the access log (``oncepay.access``, a line a request) too when ``access`` is on."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"oncepay": formatter_config(log_format)},
        "handlers": {
            "oncepay": {
                "class": "logging.StreamHandler",
                "formatter": "oncepay",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            "oncepay": {"handlers": ["oncepay"], "level": "WARNING", "propagate": False},
            "oncepay.access": {
                "handlers": ["oncepay"],
                "level": "INFO" if access else "WARNING",
                "propagate": False,
            },
        },
    }


def uvicorn_logging(log_format: Resolved, *, access: bool = False) -> dict[str, Any]:
    """uvicorn's logging (its ``log_config``; it applies it in every worker process), quiet
    below warnings, plus OncePay's loggers: all of it JSON in ``json``; in ``text`` uvicorn's
    own lines keep uvicorn's formatter."""
    import json

    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = json.loads(json.dumps(LOGGING_CONFIG))  # a deep copy
    if log_format == "json":
        for name in ("default", "access"):
            config["formatters"][name] = formatter_config(log_format)
    ours = oncepay_logging(log_format, access=access)
    for part in ("formatters", "handlers", "loggers"):
        config[part].update(ours[part])
    return config


def json_formatter() -> logging.Formatter:
    """A formatter writing each record, stdlib or structlog, as one JSON object."""
    import structlog

    chain: list[Any] = [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_ids,
    ]
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )


def add_trace_ids(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    """structlog processor: the trace and span ids of the span in progress, if tracing."""
    ids = _trace_ids()
    if ids is not None:
        event["trace_id"], event["span_id"] = ids
    return event
