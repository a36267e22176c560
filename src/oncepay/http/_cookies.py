"""A cookie jar that never stores: every outbound client of OncePay holds one.

httpx keeps the cookies an answer sets and sends them with every later request to that host
(whatever its port). The gateway's one client serves every client of the gateway, and the
webhook worker's one client posts to every merchant's endpoint, so a ``Set-Cookie`` meant for
one of them would ride along on another's request; the acquirer client would likewise carry a
session a proxy set. None of them needs state between requests, so none is kept."""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar

__all__ = ["NoCookies"]


class NoCookies(CookieJar):
    """Drops every cookie offered to it (from an answer's ``Set-Cookie`` or set by hand), so
    it is always empty and a request never carries a ``Cookie`` header from it."""

    def set_cookie(self, cookie: Cookie) -> None:
        del cookie  # refused: see the module docstring
