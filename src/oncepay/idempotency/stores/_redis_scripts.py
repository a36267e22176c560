"""The Lua side of the Redis stores: one script per primitive, and how records are encoded.

Nothing here talks to a server. ``redis.py`` runs these scripts through redis-py; another
transport (a hand-written pipelined RESP client, say) can run the very same ones: all it needs
is ``EVALSHA`` with an ``EVAL`` fallback, ``HGETALL``, and (S)SUBSCRIBE for wait mode.

**Record layout.** One Redis hash per (scope, key), named ``<prefix>{<digest>}``, where
``digest`` is the SHA-256 of the length-prefixed scope followed by the key. Any character of a
key or scope (braces, colons, quotes) is therefore safe, two pairs can never name the same
hash, and the hash tag puts each record in a slot of its own on Redis Cluster. Fields:

| field                  | value                                                           |
|------------------------|-----------------------------------------------------------------|
| ``scope``, ``key``     | as given, so a record can be read back without the digest       |
| ``fingerprint``        | the request's fingerprint                                       |
| ``state``              | ``executing`` / ``completed`` / ``released`` (a tombstone)       |
| ``fence``              | the fencing token, a decimal integer                            |
| ``created_at``, ``lease_expires_at``, ``expires_at`` | seconds, ``%.17g``: doubles, exact  |
| ``recovery_point``     | only once checkpointed                                          |
| ``status``, ``headers``, ``body`` | only once completed; headers as JSON, body raw bytes |

The hash carries a relative ``PEXPIRE`` of the record's TTL, set when the record is created, so
Redis deletes it by itself; the scripts also treat ``expires_at <= now`` as expired, because the
engine's clock (``now``, passed in) is the one that counts. A released record stays until then,
so the next claim's token is still larger; after it vanishes the token restarts from the clock in
milliseconds (``next_fence``).

**Notifications.** ``complete`` and ``release`` publish the new state on a channel named like
the record (channels and keys are separate namespaces; the shared name keeps the slot). The
single-node store uses PUBLISH; the cluster store uses SPUBLISH, which stays inside the shard
that owns the slot instead of being broadcast over the cluster bus.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from oncepay.idempotency.records import (
    Claim,
    ClaimOutcome,
    Record,
    RecordState,
    StoredResponse,
)

__all__ = [
    "CLUSTER_SCRIPTS",
    "SINGLE_NODE_SCRIPTS",
    "Script",
    "Scripts",
    "checkpoint_args",
    "claim_args",
    "complete_args",
    "decode_claim",
    "decode_record",
    "record_name",
]

# Floats go to the driver as they are: ours (hiredis) and redis-py both write one as its repr(),
# the shortest text that reads back as the same double, in Lua as in Python.
Arg = str | bytes | float

# Hot path: bytes from the server to enum members by dict, not by calling the enum class.
_STATES = {state.value.encode(): state for state in RecordState}
_OUTCOMES = {outcome.value.encode(): outcome for outcome in ClaimOutcome}

# Helpers every script starts with. Lua numbers are doubles: integers are formatted with %.0f
# (tostring() would print a fence as 1.7e+12), times with %.17g (17 significant digits give back
# the very same double, so comparisons match the engine's to the bit).
_PRELUDE = """
local NOTIFY = '{notify}'
local function as_int(n) return string.format('%.0f', n) end
local function as_time(t) return string.format('%.17g', t) end
local function holds(record, fence)
    local current = redis.call('HMGET', record, 'state', 'fence')
    return current[1] == 'executing' and current[2] == fence
end
"""

# KEYS[1] record; ARGV scope, key, fingerprint, now, lease, ttl (seconds).
# Returns {'created', fence} for a new record (the caller knows every other field: it sent them),
# else {outcome, <_RECORD_FIELDS in that order>}: the record as it now stands, absent fields nil.
# The rule is resolve_claim's (stores/base.py), numbered the same way.
_CLAIM = """
local record = KEYS[1]
local scope, key, fingerprint = ARGV[1], ARGV[2], ARGV[3]
local now, lease, ttl = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local current = redis.call('HMGET', record,
    'state', 'fence', 'fingerprint', 'lease_expires_at', 'expires_at')
local state, fence = current[1], tonumber(current[2])

local function answer(outcome)
    local reply = redis.call('HMGET', record, {fields})
    table.insert(reply, 1, outcome)
    return reply
end

-- 1. no record, a released one or an expired one: a new record that only carries the fence on
if not state or state == 'released' or tonumber(current[5]) <= now then
    local next_fence = as_int(math.max((fence or 0) + 1, math.floor(now * 1000)))
    if state then redis.call('DEL', record) end  -- a tombstone's fields must not linger
    redis.call('HSET', record, 'scope', scope, 'key', key, 'fingerprint', fingerprint,
        'state', 'executing', 'fence', next_fence, 'created_at', as_time(now),
        'lease_expires_at', as_time(now + lease), 'expires_at', as_time(now + ttl))
    redis.call('PEXPIRE', record, as_int(math.ceil(ttl * 1000)))
    return {'created', next_fence}
end
-- 2.-4. another request's key, a stored response, or a lease that still runs: the engine decides
if current[3] ~= fingerprint or state == 'completed' or now < tonumber(current[4]) then
    return answer('existing')
end
-- 5. the holder's lease ran out: the next token takes over; TTL and recovery point stay
redis.call('HSET', record, 'fence', as_int(fence + 1), 'lease_expires_at', as_time(now + lease))
return answer('taken_over')
"""

# What the claim script reads back of a record that was already there, in this order.
_RECORD_FIELDS = (
    "scope",
    "key",
    "fingerprint",
    "state",
    "fence",
    "created_at",
    "lease_expires_at",
    "expires_at",
    "recovery_point",
    "status",
    "headers",
    "body",
)
_CLAIM = _CLAIM.replace("{fields}", ", ".join(f"'{name}'" for name in _RECORD_FIELDS))

# KEYS[1] record; ARGV fence, status, headers (JSON), body. Returns 1, or 0 for a stale token.
_COMPLETE = """
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'completed',
    'status', ARGV[2], 'headers', ARGV[3], 'body', ARGV[4])
redis.call(NOTIFY, KEYS[1], 'completed')
return 1
"""

# KEYS[1] record; ARGV fence. Returns 1, or 0 for a stale token. The record stays as a
# tombstone until its TTL, so the fence keeps growing.
_RELEASE = """
if not holds(KEYS[1], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'state', 'released')
redis.call(NOTIFY, KEYS[1], 'released')
return 1
"""

# KEYS[1] record; ARGV fence, recovery point, now, lease. Returns 1, or 0 for a stale token.
_CHECKPOINT = """
if not holds(KEYS[1], ARGV[1]) then return 0 end
local lease_expires_at = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'recovery_point', ARGV[2],
    'lease_expires_at', as_time(lease_expires_at))
return 1
"""


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and the SHA-1 the server caches it under."""

    name: str
    source: str
    sha: str

    @classmethod
    def of(cls, name: str, body: str, *, notify: str) -> Script:
        source = _PRELUDE.replace("{notify}", notify) + body
        return cls(name, source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest())


@dataclass(frozen=True, slots=True)
class Scripts:
    """One script per primitive (``get`` is a plain HGETALL; ``purge_expired`` is Redis's)."""

    claim: Script
    complete: Script
    release: Script
    checkpoint: Script

    @classmethod
    def notifying_with(cls, notify: str) -> Scripts:
        return cls(
            claim=Script.of("claim", _CLAIM, notify=notify),
            complete=Script.of("complete", _COMPLETE, notify=notify),
            release=Script.of("release", _RELEASE, notify=notify),
            checkpoint=Script.of("checkpoint", _CHECKPOINT, notify=notify),
        )


SINGLE_NODE_SCRIPTS = Scripts.notifying_with("PUBLISH")
CLUSTER_SCRIPTS = Scripts.notifying_with("SPUBLISH")


# Every request names its record twice (claim, then completion) and every replay of a key names
# the same record again: remembering the last names asked for turns ~0.65 us of SHA-256 into a
# ~0.1 us lookup (a first name costs ~0.25 us more). 1024 covers the claims in flight between
# a claim and its completion on a busy process; the name is a pure function of its arguments,
# so an evicted one is only computed again.
@functools.lru_cache(maxsize=1024)
def record_name(prefix: str, scope: str, key: str) -> str:
    """``<prefix>{<digest>}``: the record's hash and its notification channel."""
    scope_bytes = scope.encode()
    material = b"%d:%s%s" % (len(scope_bytes), scope_bytes, key.encode())
    return f"{prefix}{{{hashlib.sha256(material).hexdigest()}}}"


def claim_args(
    scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
) -> list[Arg]:
    return [scope, key, fingerprint, float(now), float(lease), float(ttl)]


def complete_args(fence: int, response: StoredResponse) -> list[Arg]:
    return [str(fence), str(response.status), response.headers_json(), response.body]


def checkpoint_args(fence: int, recovery_point: str, *, now: float, lease: float) -> list[Arg]:
    return [str(fence), recovery_point, float(now), float(lease)]


def decode_claim(
    reply: Sequence[Any],
    scope: str,
    key: str,
    fingerprint: str,
    *,
    now: float,
    lease: float,
    ttl: float,
) -> Claim:
    """The claim script's reply to a claim made with these arguments.

    A new record comes back as its fence alone: every other field is what the claim sent, and
    ``now + lease`` is the same double here as in Lua (IEEE addition of the same two doubles).
    """
    if reply[0] == b"created":
        fence = int(reply[1])
        record = Record(
            scope, key, fingerprint, RecordState.EXECUTING, fence, now, now + lease, now + ttl
        )
        return Claim(ClaimOutcome.CREATED, record)
    return Claim(_OUTCOMES[reply[0]], _standing(reply, scope, key))


def _standing(reply: Sequence[Any], scope: str, key: str) -> Record:
    """The record in ``{outcome, <_RECORD_FIELDS>}``: the first eight are always there. Its
    scope and key are the claim's (the record's name is their digest): not decoded again."""
    _, _, _, fp, state, fence, created, lease_expires, expires, point, status = reply[:11]
    response = None
    if status is not None:
        headers, body = reply[11], reply[12]
        response = StoredResponse(int(status), StoredResponse.parse_headers(headers), body or b"")
    return Record(
        scope,
        key,
        fp.decode(),
        _STATES[state],
        int(fence),
        float(created),
        float(lease_expires),
        float(expires),
        None if point is None else point.decode(),
        response,
    )


def decode_record(fields: Mapping[bytes, bytes] | Sequence[bytes]) -> Record | None:
    """A record from its hash fields (as a mapping or a flat HGETALL list); None if empty."""
    if not isinstance(fields, Mapping):
        fields = _pairs(fields)
    if not fields:
        return None
    return Record(
        scope=fields[b"scope"].decode(),
        key=fields[b"key"].decode(),
        fingerprint=fields[b"fingerprint"].decode(),
        state=RecordState(fields[b"state"].decode()),
        fence=int(fields[b"fence"]),
        created_at=float(fields[b"created_at"]),
        lease_expires_at=float(fields[b"lease_expires_at"]),
        expires_at=float(fields[b"expires_at"]),
        recovery_point=_text(fields.get(b"recovery_point")),
        response=_response(fields),
    )


def _response(fields: Mapping[bytes, bytes]) -> StoredResponse | None:
    if b"status" not in fields:
        return None
    return StoredResponse(
        status=int(fields[b"status"]),
        headers=StoredResponse.parse_headers(fields.get(b"headers")),
        body=fields.get(b"body", b""),
    )


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode()


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
