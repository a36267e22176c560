"""Idempotency keys, tenant scopes and request fingerprints.

A key arrives either as a bare token (Stripe style, ``Idempotency-Key: 8e03978e-40d5``) or as an
RFC 8941 sf-string (IETF draft style, ``Idempotency-Key: "8e03978e-40d5"``). Both name the same
key. After parsing, a key is 1-255 printable ASCII characters (0x20-0x7E).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import struct

from oncepay._jsontext import encoder
from oncepay.errors import IdempotencyKeyInvalid

__all__ = [
    "MAX_KEY_LENGTH",
    "canonical_json",
    "fingerprint",
    "parse_key",
    "scope_from_authorization",
]

# 255 is Stripe's limit and fits the VARCHAR(255) most stores index cheaply.
MAX_KEY_LENGTH = 255
ANONYMOUS_SCOPE = "anonymous"


class _ExactNumber:
    """A JSON number no double carries exactly, kept as its canonical decimal text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _HasExactNumbers(Exception):
    """Raised by the fast encoder on an :class:`_ExactNumber`: encode the slow way."""


def _exact_number(value: object) -> object:
    raise _HasExactNumbers if isinstance(value, _ExactNumber) else TypeError(value)


def _parse_number(text: str) -> float | _ExactNumber:
    """A JSON number with a fraction or an exponent, canonicalised without losing a digit.

    When the double nearest to ``text`` is exactly the number ``text`` writes, the number is
    that float, encoded as always (``repr``): the usual bodies keep the fingerprints their
    records hold. Otherwise (more digits than a double has, ``1e400``, ``1e-400``) it is its
    exact value in one normal form, ``d.ddde±x``. Either text denotes exactly the number sent,
    so two writings of one number agree and two numbers never share a text; and neither looks
    like an int (JSON's ``100`` and ``100.0`` stay two requests, as they always were).
    """
    number = float(text)
    if repr(number) == text:  # the common case: the text is the float's own shortest form
        return number
    exact = _exact_value(text)
    if math.isfinite(number) and _exact_value(repr(number)) == exact:
        return number
    sign, digits, exponent = exact
    point = f"{digits[0]}.{digits[1:]}" if len(digits) > 1 else digits
    return _ExactNumber(f"{sign}{point}e{exponent + len(digits) - 1:+d}")


def _exact_value(text: str) -> tuple[str, str, int]:
    """A decimal number as (sign, significant digits, exponent of the last digit): equal
    tuples for equal values. Plain text arithmetic: a ``Decimal`` would round to its context's
    28 digits on normalising, and refuses exponents beyond its range."""
    mantissa, _, exponent = text.lower().partition("e")
    sign = "-" if mantissa.startswith("-") else ""
    whole, _, fraction = mantissa.lstrip("-").partition(".")
    digits = (whole + fraction).lstrip("0")
    significant = digits.rstrip("0")
    if not significant:
        return sign, "", 0  # zero, however written (its sign is kept, as a float keeps it)
    return sign, significant, int(exponent or 0) - len(fraction) + len(digits) - len(significant)


# Hot path: one shared encoder/decoder (json.dumps re-builds an encoder from its keywords on
# every call) and one struct for the length prefixes.
_DECODER = json.JSONDecoder(parse_float=_parse_number)
# json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False), its C
# encoder built once (oncepay._jsontext: no check for circular containers, which parsed JSON
# cannot have; byte for byte the same text, tests/test_keys.py). Its default is only ever
# called for an _ExactNumber.
_canonical = encoder(sort_keys=True, ensure_ascii=False, default=_exact_number)
_LENGTH = struct.Struct(">Q")
_quote = json.encoder.encode_basestring  # ensure_ascii=False, as _canonical
# Every fingerprint parses and re-encodes the body. JSONDecoder.decode wraps the C scanner in two
# regex matches for surrounding whitespace: the scanner is called directly (the decoder still
# handles bodies with surrounding whitespace).
_scan_once = _DECODER.scan_once  # type: ignore[attr-defined]


def parse_key(raw: str) -> str:
    """Return the key named by an ``Idempotency-Key`` header value, or raise
    :class:`IdempotencyKeyInvalid` with a detail a client can act on."""
    value = raw.strip(" \t")
    if value.startswith('"'):
        value = _parse_sf_string(value)
    if not value:
        raise IdempotencyKeyInvalid("Idempotency-Key must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise IdempotencyKeyInvalid(
            f"Idempotency-Key is {len(value)} characters long; the limit is {MAX_KEY_LENGTH}"
        )
    # For ASCII text, isprintable() is exactly 0x20-0x7E.
    if not (value.isascii() and value.isprintable()):
        raise IdempotencyKeyInvalid("Idempotency-Key must be printable ASCII (0x20-0x7E)")
    return value


def _parse_sf_string(value: str) -> str:
    """Parse an RFC 8941 §3.3.3 sf-string: quotes around, only ``\\"`` and ``\\\\`` escapes."""
    if len(value) < 2 or not value.endswith('"'):
        end = _closing_quote(value)
        if end is not None:  # "abc";p=1: an sf-item's parameters, which a key does not take
            raise IdempotencyKeyInvalid(
                f"Idempotency-Key has {value[end + 1 :]!r} after its quoted string; send the "
                "key alone, without parameters"
            )
        raise IdempotencyKeyInvalid("Idempotency-Key opens a quoted string but does not close it")
    out: list[str] = []
    chars = iter(value[1:-1])
    for ch in chars:
        if ch == "\\":
            escaped = next(chars, "")
            if escaped not in ('"', "\\"):
                raise IdempotencyKeyInvalid(
                    'Idempotency-Key quoted string may only escape \\" and \\\\'
                )
            out.append(escaped)
        elif ch == '"':
            raise IdempotencyKeyInvalid("Idempotency-Key quoted string has an unescaped quote")
        else:
            out.append(ch)
    return "".join(out)


def _closing_quote(value: str) -> int | None:
    """The index of the quote closing the sf-string ``value`` opens, or None."""
    escaped = False
    for index in range(1, len(value)):
        if escaped:
            escaped = False
        elif value[index] == "\\":
            escaped = True
        elif value[index] == '"':
            return index
    return None


def scope_from_authorization(authorization: str | None) -> str:
    """The default tenant scope: SHA-256 of the ``Authorization`` header value.

    Requests without credentials share the ``anonymous`` scope.
    """
    if not authorization:
        return ANONYMOUS_SCOPE
    return hashlib.sha256(authorization.encode("latin-1")).hexdigest()


def canonical_json(body: bytes) -> bytes | None:
    """The canonical form of a JSON body (sorted keys, no insignificant whitespace), or
    ``None`` when the body is not valid UTF-8 JSON."""
    try:
        text = body.decode()
        try:
            document, end = _scan_once(text, 0)
        except StopIteration:
            end = -1  # not a document at offset 0 (whitespace first?): the decoder decides
        if end != len(text):
            document = _DECODER.decode(text)
        # A lone surrogate (\ud800) parses but cannot be re-encoded: hash such a body raw.
        try:
            return _canonical(document).encode()
        except _HasExactNumbers:  # rare: a number past a double's digits or range
            return _encode_exactly(document).encode()
    except (ValueError, RecursionError):  # Unicode{De,En}codeError are ValueErrors
        return None


def _encode_exactly(value: object) -> str:
    """What the canonical encoder writes, with each :class:`_ExactNumber` as its text."""
    if isinstance(value, _ExactNumber):
        return value.text
    if isinstance(value, dict):
        items = sorted(value.items())
        return "{" + ",".join([f"{_quote(k)}:{_encode_exactly(v)}" for k, v in items]) + "}"
    if isinstance(value, list):
        return "[" + ",".join([_encode_exactly(item) for item in value]) + "]"
    return _canonical(value)


def fingerprint(
    method: str,
    target: str,
    body: bytes,
    *,
    json_body: bool = True,
    secret: bytes | None = None,
) -> str:
    """Fingerprint of a request: SHA-256 (or HMAC-SHA-256 with ``secret``) over the method, the
    path with its query, and the body.

    With ``json_body`` a body that parses as JSON is canonicalised first, so field order and
    whitespace do not matter; any other body is hashed as sent. Headers are deliberately left
    out: a retry carrying a new trace id or timestamp is the same request.
    """
    if json_body:
        body = canonical_json(body) or body
    verb = _VERBS.get(method) or _verb(method)
    # ASGI paths arrive percent-decoded as UTF-8 (/pay/€); surrogateescape keeps any byte.
    path = target.encode("utf-8", "surrogateescape")
    # Length-prefix every part so that no two different requests share one byte stream.
    data = b"".join((verb, _LENGTH.pack(len(path)), path, _LENGTH.pack(len(body)), body))
    if secret:
        return hmac.new(secret, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def _verb(method: str) -> bytes:
    """The method's part of the fingerprint's byte stream: its length, then the method."""
    verb = method.upper().encode("ascii")
    return _LENGTH.pack(len(verb)) + verb


# The method part of the usual methods, built once (a fingerprint is taken on every request).
_VERBS = {method: _verb(method) for method in ("POST", "PATCH", "PUT", "DELETE")}
