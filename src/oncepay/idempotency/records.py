"""Idempotency records: what a store keeps under one (scope, key)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from enum import StrEnum
from json.encoder import encode_basestring_ascii as _quote

from oncepay._drivers.frozen import quick_init

__all__ = ["Claim", "ClaimOutcome", "Record", "RecordState", "StoredResponse", "next_fence"]

# Every completion encodes its headers and every replay decodes them. Encoding is spelled out
# with the C string quoter (what json.dumps(headers, separators=(",", ":")) writes, byte for
# byte, without building an encoder per call); one shared decoder spares json.loads its own.
_HEADERS_DECODER = json.JSONDecoder()


class RecordState(StrEnum):
    """Life of a record: claimed, then completed with a response or released.

    A released record is a tombstone that keeps the fencing token alive so the next claim's
    token is still larger; to a client it is as if the key had never been used.
    """

    EXECUTING = "executing"
    COMPLETED = "completed"
    RELEASED = "released"


@quick_init
@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response as stored for replay: status, headers in order (repeats kept), body."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def headers_json(self) -> str:
        """The headers as a JSON array of ``[name, value]`` arrays, ASCII only."""
        return "[" + ",".join([f"[{_quote(k)},{_quote(v)}]" for k, v in self.headers]) + "]"

    @staticmethod
    def parse_headers(raw: str | bytes | None) -> tuple[tuple[str, str], ...]:
        if not raw:
            return ()
        if len(raw) <= _REMEMBERED_HEADERS_SIZE and type(raw) in (bytes, str):
            return _remembered_headers(raw)
        return _decoded_headers(raw)


def _decoded_headers(raw: str | bytes) -> tuple[tuple[str, str], ...]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return tuple([(str(name), str(value)) for name, value in _HEADERS_DECODER.decode(text)])


# Replays decode stored headers, and an API's responses share a few header sets (a content
# type, a handful of lengths): the last sets decoded are remembered, keyed by their exact
# stored text. The tuples are immutable, so sharing one between responses is safe.
_REMEMBERED_HEADERS_SIZE = 2048
_remembered_headers = functools.lru_cache(maxsize=256)(_decoded_headers)


@quick_init
@dataclass(frozen=True, slots=True)
class Record:
    """One idempotency record. Times are POSIX seconds from the engine's clock."""

    scope: str
    key: str
    fingerprint: str
    state: RecordState
    fence: int
    created_at: float
    lease_expires_at: float
    expires_at: float
    recovery_point: str | None = None
    response: StoredResponse | None = field(default=None, repr=False)

    def is_expired(self, now: float) -> bool:
        return now >= self.expires_at

    def is_leased(self, now: float) -> bool:
        return self.state is RecordState.EXECUTING and now < self.lease_expires_at


class ClaimOutcome(StrEnum):
    CREATED = "created"  # no live record: this caller executes
    TAKEN_OVER = "taken_over"  # the previous holder's lease ran out: this caller resumes
    EXISTING = "existing"  # a live record stands: the engine decides replay / 409 / 422


@quick_init
@dataclass(frozen=True, slots=True)
class Claim:
    """What a store's atomic ``claim`` reports: the outcome and the record as it now stands."""

    outcome: ClaimOutcome
    record: Record
    # CREATED over the key's own expired record, not yet purged: the key came back after its
    # TTL (a late retry, SPEC §9), and executes afresh. False when the store cannot tell (Redis
    # drops a record at its TTL by itself).
    late: bool = False

    @property
    def claimed(self) -> bool:
        return self.outcome is not ClaimOutcome.EXISTING


def next_fence(previous: int | None, now: float) -> int:
    """The fencing token for a new claim of a key.

    Tokens grow by one on every claim and takeover while a record exists. A key seen for the
    first time (or after its record was purged) starts at the clock in milliseconds, so a
    token handed out before a purge is still smaller than any handed out after it. Both stay
    well below 2**53, so Lua's doubles carry them exactly.
    """
    return max((previous or 0) + 1, int(now * 1000))
