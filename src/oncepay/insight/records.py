"""One line of the key-usage log (SPEC §9) as a typed record, and a reader that never stops
at a bad line.

The reader streams: it holds one batch of lines at a time, whatever the size of the log. A line
that is not JSON, or lacks the fields the analysis needs (``at``, ``tenant``, ``decision``), is
counted in :attr:`UsageReader.bad_lines` and skipped; the first few are kept as examples so that
the command can say what was wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

__all__ = ["DECISIONS", "Usage", "UsageReader", "from_object", "parse_line", "to_line"]

DECISIONS = frozenset({"executed", "replayed", "in_progress", "reused", "invalid", "missing"})

# Lines decoded per json.loads call: one call for a batch costs far less than one a line, and a
# batch of 2,000 lines (~500 kB) keeps the reader's memory flat.
_BATCH = 2000
# How many bad lines are kept, as examples, for the message on stderr.
_EXAMPLES = 3


class Usage(NamedTuple):
    """One idempotency decision. ``key`` is "" when the request had none (``missing``)."""

    at: float
    tenant: str
    route: str
    key: str
    fingerprint: str
    decision: str
    status: int
    source: str | None
    ttl: float | None


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def from_object(obj: Any) -> Usage | None:
    """The record a decoded line holds, or None when it is not a decision record."""
    try:
        at, tenant, decision = obj["at"], obj["tenant"], obj["decision"]
        route, key, fingerprint = obj.get("route"), obj.get("key"), obj.get("fingerprint")
        status, source, ttl = obj.get("status"), obj.get("source"), obj.get("ttl")
    except (TypeError, KeyError, AttributeError):  # not an object, or no time, tenant, decision
        return None
    # The sink's own lines, every field of its type: one test each, no conversion (the reader
    # spends most of its time here, and this is every line of a well-formed log).
    if (
        type(at) is float
        and type(tenant) is str
        and type(route) is str
        and type(key) is str
        and type(fingerprint) is str
        and type(status) is int
        and (source is None or type(source) is str)
        and (ttl is None or type(ttl) is float)
        and decision in DECISIONS
    ):
        return Usage(at, tenant, route, key, fingerprint, decision, status, source, ttl)
    return _converted(at, tenant, decision, route, key, fingerprint, status, source, ttl)


def _converted(
    at: Any,
    tenant: Any,
    decision: Any,
    route: Any,
    key: Any,
    fingerprint: Any,
    status: Any,
    source: Any,
    ttl: Any,
) -> Usage | None:
    """Any other line: what the analysis needs checked, the rest made do with."""
    moment = _number(at)
    if moment is None or type(tenant) is not str or decision not in DECISIONS:
        return None
    return Usage(
        moment,
        tenant,
        _text(route) or "",
        _text(key) or "",
        _text(fingerprint) or "",
        decision,
        status if type(status) is int else 0,
        _text(source),
        _number(ttl),
    )


def parse_line(line: str | bytes) -> Usage | None:
    """One line decoded, or None for a bad one."""
    try:
        return from_object(json.loads(line))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
        return None


class UsageReader:
    """The records of a log, in file order; ``lines`` and ``bad_lines`` count as it reads."""

    def __init__(self, lines: Iterable[str | bytes]) -> None:
        self._lines = lines
        self.lines = 0
        self.bad_lines = 0
        self.bad_examples: list[int] = []  # line numbers, 1-based

    def __iter__(self) -> Iterator[Usage]:
        batch: list[str] = []
        numbers: list[int] = []
        for number, raw in enumerate(self._lines, 1):
            text = _decoded(raw).strip()
            if not text:  # a blank line is no record, and no error either
                continue
            self.lines += 1
            batch.append(text)
            numbers.append(number)
            if len(batch) >= _BATCH:
                yield from self._batch(batch, numbers)
                batch, numbers = [], []
        yield from self._batch(batch, numbers)

    def _batch(self, batch: list[str], numbers: list[int]) -> Iterator[Usage]:
        """A batch decoded in one call; should one line spoil it, line by line."""
        if not batch:
            return
        try:
            objects = json.loads("[" + ",".join(batch) + "]")
        except ValueError:
            objects = None
        if objects is None or len(objects) != len(batch):  # bad JSON, or a line holding two
            objects = [_loaded(text) for text in batch]
        for number, obj in zip(numbers, objects, strict=True):
            usage = from_object(obj)
            if usage is None:
                self._bad(number)
            else:
                yield usage

    def _bad(self, number: int) -> None:
        self.bad_lines += 1
        if len(self.bad_examples) < _EXAMPLES:
            self.bad_examples.append(number)


def _decoded(raw: str | bytes) -> str:
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", errors="replace")


def _loaded(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def to_line(usage: Usage) -> str:
    """A record as one line of the log (what the sink writes), newline included."""
    return json.dumps(usage._asdict(), separators=(",", ":")) + "\n"
