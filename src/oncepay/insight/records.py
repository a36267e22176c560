"""One line of the key-usage log (SPEC §9) as a typed record, and a reader that never stops
at a bad line.

The reader streams: it holds one block of lines (about a megabyte) at a time, whatever the size
of the log. A line that is not JSON, or lacks the fields the analysis needs (``at``,
``tenant``, ``decision``), is counted in :attr:`UsageReader.bad_lines` and skipped; the first
few are kept as examples so that the command can say what was wrong.

Speed: a block is decoded in one call, into plain tuples (:class:`Usage`'s fields in order, no
dictionary per line): by msgspec when it is installed (the ``insight`` extra; a quarter of the
time), else by one regular expression that reads the sink's own layout (the fields in SPEC
order, no spaces). A block where any line is not a well-typed record (a bad line, a ``null``
route, a line in another layout for the regular expression) is read again line by line, the
lenient way (:func:`from_object`), so the records are the same whichever path read them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, Literal, NamedTuple

__all__ = [
    "DECISIONS",
    "Row",
    "Usage",
    "UsageReader",
    "from_object",
    "parse_block",
    "parse_line",
    "to_line",
]

DECISIONS = frozenset({"executed", "replayed", "in_progress", "reused", "invalid", "missing"})

# Characters read per block: about 4,000 lines of the sink's, few enough that memory stays
# flat, many enough that the per-block costs (a call into the regex engine) vanish.
_BLOCK = 1 << 20
# How many bad lines are kept, as examples, for the message on stderr.
_EXAMPLES = 3

# at, tenant, route, key, fingerprint, decision, status, source, ttl: Usage's fields, in order.
Row = tuple[float, str, str, str, str, str, int, "str | None", "float | None"]


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


# The sink's own line. Strings without escapes or control characters, numbers as JSON has them:
# whatever this matches, json.loads reads as the same values.
_NUMBER = r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][-+]?\d+)?"
_STRING = r'"([^"\\\x00-\x1f]*)"'
_SINK_LINE = re.compile(
    rf'^\{{"at":({_NUMBER}),"tenant":{_STRING},"route":{_STRING},"key":{_STRING},'
    rf'"fingerprint":{_STRING},"decision":"(executed|replayed|in_progress|reused|invalid|missing)",'
    rf'"status":(-?(?:0|[1-9]\d*)),"source":(null|"[^"\\\x00-\x1f]*"),"ttl":(null|{_NUMBER})\}}\r?$',
    re.MULTILINE,
)


def _msgspec_decoder() -> Callable[[str | bytes], list[Row]] | None:
    """A block's records by msgspec, all or nothing (ValueError on any line that is not a
    well-typed record); None without msgspec."""
    try:
        import msgspec
    except ImportError:  # pragma: no cover - the insight extra is not installed
        return None

    class Line(msgspec.Struct, kw_only=True, gc=False):  # kw_only: Usage's order
        at: float
        tenant: str
        route: str = ""
        key: str = ""
        fingerprint: str = ""
        decision: Literal["executed", "replayed", "in_progress", "reused", "invalid", "missing"]
        status: int = 0
        source: str | None = None
        ttl: float | None = None

    decode = msgspec.json.Decoder(Line).decode_lines
    astuple = msgspec.structs.astuple

    def rows(block: str | bytes) -> list[Row]:
        return list(map(astuple, decode(block)))

    return rows


# None: the regular expression reads every block.
_decode_fast = _msgspec_decoder()


def _rows(found: list[tuple[str, ...]]) -> list[Row]:
    """The regular expression's groups as records (the source keeps its quotes, so that null
    and "" differ)."""
    return [
        (
            float(at),
            tenant,
            route,
            key,
            fingerprint,
            decision,
            int(status),
            None if source == "null" else source[1:-1],
            None if ttl == "null" else float(ttl),
        )
        for at, tenant, route, key, fingerprint, decision, status, source, ttl in found
    ]


def _number(value: Any) -> float | None:
    """A finite number as a float; None for anything else (1e400 and NaN parse as numbers)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)  # an int past a float's range raises OverflowError
        return number if math.isfinite(number) else None
    return None


def _finite(rows: list[Row]) -> bool:
    """Whether every row's time (and TTL, where given) is a finite number."""
    return all(math.isfinite(row[0]) and (row[8] is None or math.isfinite(row[8])) for row in rows)


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
    moment = _number(at)
    if moment is None or type(tenant) is not str or decision not in DECISIONS:
        return None
    # The optional fields may be absent or null; present with another type (a key that is an
    # object, a status that is a string), the line is not a decision record as SPEC §9 writes
    # one, and is counted as such rather than read with the field blanked.
    texts = (route, key, fingerprint, source)
    if any(value is not None and type(value) is not str for value in texts):
        return None
    if (status is not None and type(status) is not int) or (
        ttl is not None and _number(ttl) is None
    ):
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
    text = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    fast = _SINK_LINE.match(text)
    if fast is not None:
        row = _rows([fast.groups()])[0]
        return Usage(*row) if _finite([row]) else None
    try:
        return from_object(json.loads(text))
    except (ValueError, OverflowError, RecursionError):  # JSONDecodeError alike
        return None


def parse_block(block: str | bytes) -> tuple[list[Row], list[int]]:
    """The records of ``block`` (whole lines), and the 0-based numbers of its bad lines (blank
    lines are neither)."""
    newline = b"\n" if isinstance(block, bytes) else "\n"
    lines = block.count(newline) + (0 if block.endswith(newline) else 1)  # type: ignore[arg-type]
    rows = _fast(block)
    if rows is not None and len(rows) == lines:  # one record a line, none blank, none bad
        return rows, []
    text = _decoded(block)
    found: list[Row] = []
    bad: list[int] = []
    for number, line in enumerate(text.split("\n")[:lines]):
        if not line.strip():
            continue
        usage = parse_line(line)
        if usage is None:
            bad.append(number)
        else:
            found.append(usage)
    return found, bad


def _fast(block: str | bytes) -> list[Row] | None:
    """Every record of the block the fast way, or None when a line needs a closer look."""
    if _decode_fast is not None:
        try:
            rows = _decode_fast(block)
        except ValueError:  # msgspec's errors, and bytes that are not UTF-8
            return None
    else:
        rows = _rows(_SINK_LINE.findall(_decoded(block)))
    return rows if _finite(rows) else None  # 1e400 is a float to both: look line by line


class UsageReader:
    """The records of a log, in file order; ``lines`` and ``bad_lines`` count as it reads.

    ``source``: a file (text or binary; read in blocks) or any iterable of lines. Iterating
    gives :class:`Usage` records; :meth:`blocks` gives the same as lists of plain rows, which
    is what the analyzer reads fast."""

    def __init__(self, source: IO[str] | IO[bytes] | Iterable[str | bytes]) -> None:
        self._source = source
        self.lines = 0
        self.bad_lines = 0
        self.bad_examples: list[int] = []  # line numbers, 1-based

    def __iter__(self) -> Iterator[Usage]:
        for block in self.blocks():
            for row in block:
                yield row if isinstance(row, Usage) else Usage(*row)

    def blocks(self) -> Iterator[list[Row]]:
        """The records, a block at a time."""
        number = 0  # lines before this block
        for block in _blocks(self._source):
            rows, bad = parse_block(block)
            lines = block.count(b"\n" if isinstance(block, bytes) else "\n")  # type: ignore[arg-type]
            self.lines += len(rows) + len(bad)
            for index in bad:
                self._bad(number + index + 1)
            number += lines
            yield rows

    def _bad(self, number: int) -> None:
        self.bad_lines += 1
        if len(self.bad_examples) < _EXAMPLES:
            self.bad_examples.append(number)


def _blocks(source: IO[str] | IO[bytes] | Iterable[str | bytes]) -> Iterator[str | bytes]:
    """Blocks of whole lines, each ending in a newline, as read (bytes or text)."""
    read = getattr(source, "read", None)
    if read is None:
        yield from _joined(source)
        return
    rest: Any = None  # what follows the last newline: the start of the next block's first line
    while chunk := read(_BLOCK):
        data = chunk if rest is None else rest + chunk
        end = data.rfind(b"\n" if isinstance(data, bytes) else "\n") + 1
        rest = data[end:]
        if end:
            yield data[:end]
    if rest:
        yield rest + (b"\n" if isinstance(rest, bytes) else "\n")


def _joined(lines: Iterable[str | bytes]) -> Iterator[str]:
    """An iterable of lines as blocks."""
    batch: list[str] = []
    size = 0
    for raw in lines:
        text = _decoded(raw)
        if not text.endswith("\n"):
            text += "\n"
        batch.append(text)
        size += len(text)
        if size >= _BLOCK:
            yield "".join(batch)
            batch, size = [], 0
    if batch:
        yield "".join(batch)


def _decoded(raw: str | bytes) -> str:
    """Text; bytes that are not UTF-8 become U+FFFD (the line is then bad JSON or a record with
    an odd name, never a crash)."""
    if isinstance(raw, str):
        return raw
    return raw.decode("utf-8", errors="replace")


def to_line(usage: Usage) -> str:
    """A record as one line of the log (what the sink writes), newline included."""
    return json.dumps(usage._asdict(), separators=(",", ":")) + "\n"
