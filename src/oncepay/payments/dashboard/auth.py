"""Who may see the dashboard: the operator, by the operator token (SPEC §11), sent as a bearer
token or entered once on the sign-in page.

Signing in sets a session cookie that holds no secret: an expiry, a random nonce and an HMAC
of both keyed by the token (so changing ``ONCEPAY_ADMIN_TOKEN`` signs every session out). A
session is checked without the database; signing out records the session's HMAC in the
database (``dashboard_signouts``, shared by every API process, kept until the session would
have expired), and a recorded session is refused everywhere from then on. The cookie is
``HttpOnly``, ``SameSite=Strict`` and scoped to ``/dashboard``. Every form that changes
something carries a CSRF token, an HMAC of the session, checked on the way in: a cookie alone
never acts."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from fastapi import Request

__all__ = [
    "COOKIE",
    "SESSION_SECONDS",
    "NotSignedIn",
    "Operator",
    "csrf_token",
    "new_session",
    "operator",
    "session_id",
    "valid_session",
]

COOKIE = "oncepay_operator"
SESSION_SECONDS = 12 * 3600  # a working day; then sign in again


class NotSignedIn(Exception):
    """No operator token and no valid session: the page sends the browser to sign in."""


@dataclass(frozen=True, slots=True)
class Operator:
    session: str  # the cookie's value, or "" for a bearer-token request

    def csrf(self, token: str) -> str:
        return csrf_token(token, self.session)


def _mac(token: str, message: str) -> str:
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def new_session(token: str, now: float | None = None) -> str:
    """A new session's cookie value: ``<expiry>.<nonce>.<HMAC>``; two sign-ins in the same
    second are two sessions (signing one out leaves the other)."""
    expires = int((now if now is not None else time.time()) + SESSION_SECONDS)
    nonce = secrets.token_hex(8)
    return f"{expires}.{nonce}.{_mac(token, f'session:{expires}:{nonce}')}"


def valid_session(token: str, value: str, now: float | None = None) -> bool:
    expires, _, rest = value.partition(".")
    nonce, _, mac = rest.partition(".")
    if not expires.isdigit() or int(expires) < (now if now is not None else time.time()):
        return False
    return hmac.compare_digest(mac, _mac(token, f"session:{expires}:{nonce}"))


def session_id(value: str) -> tuple[str, float]:
    """A valid session's identity as sign-out records it (its HMAC), and its expiry."""
    expires, _, rest = value.partition(".")
    return rest.rpartition(".")[2], float(expires)


def csrf_token(token: str, session: str) -> str:
    return _mac(token, f"csrf:{session}")


def bearer_matches(request: Request, token: str) -> bool:
    scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


def operator(request: Request, token: str) -> Operator:
    """The operator behind ``request``, or :class:`NotSignedIn`."""
    if bearer_matches(request, token):
        return Operator("")
    session = request.cookies.get(COOKIE, "")
    if session and valid_session(token, session):
        return Operator(session)
    raise NotSignedIn
