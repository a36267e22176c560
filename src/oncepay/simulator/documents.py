"""Timestamps and JSON as the simulated acquirer writes them (its ids are
:func:`oncepay.storage.ids.new_id`, the payments service's shape)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

__all__ = ["dumps", "iso"]


def iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# json.dumps(document, separators=(",", ":")) with its encoder built once, not per call.
_compact = json.JSONEncoder(separators=(",", ":")).encode


def dumps(document: dict[str, Any]) -> str:
    return _compact(document)
