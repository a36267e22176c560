"""The payments service's storage: the database (``db``: SQLite or PostgreSQL by URL, one
writer at a time on SQLite), its tables (``schema``) and their versions (``migrations``), the
idempotency store kept in the same database (``idempotency``), and the SQLite driver written
for the event loop (``_sqlite``, imported by ``db`` only)."""
