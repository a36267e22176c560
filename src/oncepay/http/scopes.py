"""Tenant scopes read from a request: which header or cookie names the principal.

Every idempotency record is scoped: the same key from two scopes names two records, and an
answer is never replayed into another scope. The default scope is a SHA-256 of the
``Authorization`` header, and **every request without one shares the single scope
``anonymous``**. That is unsafe wherever users authenticate some other way — browser users
with a session cookie, clients behind a gateway that passes the user on in a header — since
two such users whose keys collide are handed each other's answers.

``scope_from_cookie(name)`` and ``scope_from_header(name)`` scope by what does name the user.
A request without it is refused (400 ``idempotency_scope_missing``) rather than put in a
shared scope: a request that names no principal has nobody to keep its answer for. Give a
``fallback`` scope function to scope such requests some other way instead (API clients by
their token, say); the last of a chain refuses.

Values are hashed (SHA-256), as the default scope hashes ``Authorization``, so records and
key-usage logs carry no credential, and every value of a repeated header or cookie counts.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from oncepay.errors import ConfigurationError, IdempotencyScopeMissing
from oncepay.http.gate import Request, ScopeFunction

__all__ = ["scope_from_cookie", "scope_from_header"]

_LENGTH = struct.Struct(">Q")
# RFC 9110 §5.6.2: header field names and (RFC 6265 §4.1.1) cookie names are tokens.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def scope_from_header(name: str, *, fallback: ScopeFunction | None = None) -> ScopeFunction:
    """Scope keys by the value of the header ``name`` (hashed); a request without it is
    refused, or scoped by ``fallback``."""
    return _HeaderScope(_token(name, "header"), name.lower(), fallback)


def scope_from_cookie(name: str, *, fallback: ScopeFunction | None = None) -> ScopeFunction:
    """Scope keys by the value of the cookie ``name`` (hashed; cookie names are
    case-sensitive); a request without it is refused, or scoped by ``fallback``."""
    return _CookieScope(_token(name, "cookie"), fallback)


def _token(name: str, kind: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ConfigurationError(f"{name!r} is no {kind} name (an RFC 9110 token)")
    return name


@dataclass(frozen=True, slots=True)
class _HeaderScope:
    name: str  # as the user spelled it, for the problem's detail
    lower: str  # as requests carry it
    fallback: ScopeFunction | None

    def __call__(self, request: Request) -> str:
        values = [v for k, v in request.headers if k == self.lower and v.strip(" \t")]
        if values:
            return _digest(f"header {self.lower}", values)
        return _fall_back(self.fallback, request, f"the {self.name!r} header")


@dataclass(frozen=True, slots=True)
class _CookieScope:
    name: str
    fallback: ScopeFunction | None

    def __call__(self, request: Request) -> str:
        values = [v for k, v in _cookies(request) if k == self.name and v]
        if values:
            return _digest(f"cookie {self.name}", values)
        return _fall_back(self.fallback, request, f"the {self.name!r} cookie")


def _cookies(request: Request) -> Iterator[tuple[str, str]]:
    """Every ``name=value`` pair of every ``Cookie`` line (HTTP/2 sends one line per cookie)."""
    for key, line in request.headers:
        if key == "cookie":
            for pair in line.split(";"):
                name, _, value = pair.partition("=")
                yield name.strip(" \t"), value.strip(" \t")


def _digest(source: str, values: list[str]) -> str:
    # The source is hashed in, so that a header and a cookie with one value are two scopes;
    # each value is length-prefixed, so that no two lists of values share one byte stream.
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass"))
    for value in values:
        raw = value.encode("utf-8", "surrogatepass")  # one-to-one, for any str
        digest.update(_LENGTH.pack(len(raw)) + raw)
    return digest.hexdigest()


def _fall_back(fallback: ScopeFunction | None, request: Request, what: str) -> str:
    if fallback is not None:
        return fallback(request)
    raise IdempotencyScopeMissing(
        f"idempotency keys here are scoped by {what}, and the request has none"
    )
