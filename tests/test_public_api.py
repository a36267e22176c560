"""The public surface is small and explicit: what users import from ``oncepay``."""

from __future__ import annotations

import oncepay
from oncepay import errors


def test_every_public_name_resolves() -> None:
    for name in oncepay.__all__:
        assert getattr(oncepay, name) is not None, name


def test_the_public_surface_does_not_grow_by_accident() -> None:
    assert set(oncepay.__all__) == {
        "CachedStore", "ClientError", "ConfigurationError", "Decision", "Engine", "Execute",
        "IdempotencyKeyInvalid", "IdempotencyKeyMissing", "IdempotencyKeyReused", "InProgress",
        "Invalid", "LeaseLost", "OncePayError", "Record", "RecordState", "Replay",
        "RequestInProgress", "RequestTooLarge", "RetryableError", "Reused", "Store",
        "StoreUnavailable", "StoredResponse", "Ticket", "TtlPolicy", "__version__", "fingerprint",
        "idempotent", "parse_key", "scope_from_authorization", "store_from_url",
    }  # fmt: skip


def test_the_http_surface_resolves_and_does_not_grow_by_accident() -> None:
    import oncepay.http

    assert set(oncepay.http.__all__) == {
        "AsyncClient", "Client", "IdempotencyMiddleware", "IdempotencyWSGIMiddleware",
        "RequestTicket", "RequestTicketDep", "RetryPolicy", "request_ticket",
        "scope_from_cookie", "scope_from_header",
    }  # fmt: skip
    for name in oncepay.http.__all__:
        assert getattr(oncepay.http, name) is not None, name


def test_every_error_is_in_the_one_tree_and_split_by_what_the_client_does() -> None:
    leaves = [getattr(errors, name) for name in errors.__all__]
    for cls in leaves:
        assert issubclass(cls, oncepay.OncePayError)
    for cls in (errors.IdempotencyKeyMissing, errors.IdempotencyKeyInvalid,
                errors.IdempotencyKeyReused, errors.RequestTooLarge):  # fmt: skip
        assert issubclass(cls, errors.ClientError)
        assert 400 <= cls.status < 500
    for cls in (errors.RequestInProgress, errors.LeaseLost, errors.StoreUnavailable):
        assert issubclass(cls, errors.RetryableError)
    codes = [cls.code for cls in leaves]
    assert len(codes) == len(set(codes)), "every error has its own stable code"


def test_the_core_imports_no_web_framework() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, oncepay, oncepay.idempotency, oncepay.idempotency.stores.memory;"
        "bad = [m for m in ('starlette', 'fastapi', 'flask', 'django', 'httpx', 'oncepay.http',"
        " 'oncepay.payments') if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
