"""OncePay's HTTP surfaces: import them from here."""

from oncepay.http.asgi import IdempotencyMiddleware
from oncepay.http.client import AsyncClient, Client, RetryPolicy
from oncepay.http.wsgi import IdempotencyWSGIMiddleware

__all__ = [
    "AsyncClient",
    "Client",
    "IdempotencyMiddleware",
    "IdempotencyWSGIMiddleware",
    "RetryPolicy",
]
