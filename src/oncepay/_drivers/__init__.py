"""Hand-written drivers: infrastructure written for speed, fenced off from the logic.

* ``resp``: the RESP2 client under the single-node ``RedisStore``;
* ``pgpool``: the asyncpg connection pool under ``PostgresStore``;
* ``sqlite``: the payments service's SQLite connection for the event loop (under SQLAlchemy's
  aiosqlite dialect), and the retried switch to WAL the SQLite store uses too;
* ``frozen``: ``quick_init``, a generated ``__init__`` for the frozen value classes every
  request builds.

The rule: **logic never imports a driver directly.** Each driver is imported by the one adapter
that wraps it and translates its errors at the boundary — ``resp`` by
``idempotency/stores/redis.py``, ``pgpool`` by ``idempotency/stores/postgres.py``, ``sqlite`` by
``storage/db.py`` (and ``idempotency/stores/sqlite.py`` for its WAL switch) — and by
its own tests. ``frozen`` is a class decorator, not a connection: the modules that define the value
classes (``idempotency/records.py``, ``idempotency/engine.py``, ``http/gate.py``) apply it and
nothing else imports it. ``tests/test_drivers_fence.py`` checks the rule; each driver has its own
tests (``test_resp.py``, ``test_pgpool.py``, ``test_frozen.py``,
``payments/test_sqlite_driver.py``). A driver imports nothing from
OncePay but ``oncepay.errors``.
"""
