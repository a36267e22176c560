"""Identifiers, timestamps and JSON as the simulated acquirer writes them."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

__all__ = ["dumps", "iso", "new_id"]


def iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))
