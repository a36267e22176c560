"""The payments service's storage: the database (``db``: SQLite or PostgreSQL by URL, one
writer at a time on SQLite), its tables (``schema``) and their versions (``migrations``), the
idempotency store kept in the same database (``idempotency``). The SQLite driver written for
the event loop is ``oncepay._drivers.sqlite``, imported by ``db`` only."""
