"""OncePay's HTTP surfaces: import them from here.

The middleware needs nothing beyond OncePay itself; the client needs the ``client`` extra
(httpx and tenacity) and ``RequestTicketDep`` needs FastAPI: each is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from oncepay.http.asgi import IdempotencyMiddleware
from oncepay.http.scopes import scope_from_cookie, scope_from_header
from oncepay.http.transaction import RequestTicket, request_ticket
from oncepay.http.wsgi import IdempotencyWSGIMiddleware

if TYPE_CHECKING:
    from oncepay.http._fastapi import RequestTicketDep
    from oncepay.http.client import AsyncClient, Client, RetryPolicy

__all__ = [
    "AsyncClient",
    "Client",
    "IdempotencyMiddleware",
    "IdempotencyWSGIMiddleware",
    "RequestTicket",
    "RequestTicketDep",
    "RetryPolicy",
    "request_ticket",
    "scope_from_cookie",
    "scope_from_header",
]

_LAZY = {"AsyncClient", "Client", "RetryPolicy"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from oncepay.http import client

        return getattr(client, name)
    if name == "RequestTicketDep":  # needs FastAPI
        from oncepay.http import _fastapi

        return _fastapi.RequestTicketDep
    raise AttributeError(f"module 'oncepay.http' has no attribute {name!r}")
