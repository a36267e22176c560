"""A cookie jar that never stores: every outbound client of the payments service holds one.

httpx keeps the cookies an answer sets and sends them with every later request to that host
(whatever its port). The webhook worker's one client posts to every merchant's endpoint, so
merchant A's ``Set-Cookie`` would ride along on merchant B's delivery; the acquirer client would
likewise carry a session a proxy set. Neither needs state between requests, so none is kept."""

from __future__ import annotations

from http.cookiejar import Cookie, CookieJar

__all__ = ["NoCookies"]


class NoCookies(CookieJar):
    """Drops every cookie offered to it (from an answer's ``Set-Cookie`` or set by hand), so
    it is always empty and a request never carries a ``Cookie`` header from it."""

    def set_cookie(self, cookie: Cookie) -> None:
        del cookie  # refused: see the module docstring
