"""The payments service's storage: its tables (``schema``) and their versions
(``migrations``), the idempotency store kept in the same database (``idempotency``). The
database itself (SQLite or PostgreSQL by URL, one writer at a time on SQLite) is
:mod:`oncepay.storage.db`, shared with the simulated acquirer."""
