"""OncePay's HTTP surfaces: import them from here."""

from oncepay.http.asgi import IdempotencyMiddleware
from oncepay.http.wsgi import IdempotencyWSGIMiddleware

__all__ = ["IdempotencyMiddleware", "IdempotencyWSGIMiddleware"]
