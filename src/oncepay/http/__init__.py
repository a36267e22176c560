"""OncePay's HTTP surfaces: import them from here."""

from oncepay.http.asgi import IdempotencyMiddleware

__all__ = ["IdempotencyMiddleware"]
