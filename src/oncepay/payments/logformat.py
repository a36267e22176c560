"""How the payments service's log lines look (docs/observability.md, "Logs").

``text`` (the default, for a terminal): ``<time> <message>``, e.g. the access log's
``POST /v1/payments 201 12.3ms decision=executed request_id=req_…``. ``json`` (for production,
``oncepay serve --log-format json`` or ``ONCEPAY_LOG_FORMAT=json``): one JSON object a line
through structlog's stdlib integration (:class:`structlog.stdlib.ProcessorFormatter`), for the
``oncepay.*`` loggers and uvicorn's alike: ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``,
``event`` (the message), the fields a call passed as ``extra`` (the access log's ``method``,
``path``, ``status``, ``duration_ms``, ``decision``, ``request_id``) and, while tracing is on,
``trace_id`` and ``span_id`` of the span in progress. structlog is imported only for ``json``.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from oncepay.payments import tracing

__all__ = ["FORMATS", "LogFormat", "formatter_config", "json_formatter"]

LogFormat = Literal["text", "json"]
FORMATS: tuple[LogFormat, ...] = ("text", "json")


def formatter_config(log_format: LogFormat) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` formatter entry for the format."""
    if log_format == "json":
        return {"()": f"{__name__}.json_formatter"}
    return {"format": "%(asctime)s %(message)s"}


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
    ids = tracing.ids()
    if ids is not None:
        event["trace_id"], event["span_id"] = ids
    return event
