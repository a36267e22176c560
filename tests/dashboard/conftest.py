"""The dashboard's HTTP tests run on SQLite and PostgreSQL, like the payments tests."""

from tests.payments.conftest import payments_url, stack

__all__ = ["payments_url", "stack"]
