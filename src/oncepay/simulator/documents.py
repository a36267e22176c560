"""Timestamps and JSON as the simulated acquirer writes them (its ids are
:func:`oncepay.storage.ids.new_id`, the payments service's shape)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from starlette.responses import Response

from oncepay._jsontext import encoder

__all__ = ["Answer", "dumps", "iso"]


class Answer(Response):
    """A JSON answer that keeps the document it encodes: a caller in this process (the
    embedded acquirer) reads it as it is instead of parsing the body again."""

    media_type = "application/json"

    def __init__(self, document: dict[str, Any], status_code: int, content: str) -> None:
        super().__init__(content, status_code)  # content: dumps(document)
        self.document = document


def iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# json.dumps(document, separators=(",", ":")) with its encoder built once, not per call.
_compact = encoder()


def dumps(document: dict[str, Any]) -> str:
    return _compact(document)
