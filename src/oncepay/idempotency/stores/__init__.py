"""Idempotency stores, chosen by URL scheme.

| scheme                | class                          | extra      |
|-----------------------|--------------------------------|------------|
| ``memory://``         | ``MemoryStore``                | —          |
| ``sqlite:///path``    | ``SQLiteStore``                | —          |
| ``postgresql://…``    | ``PostgresStore``              | postgres   |
| ``redis://…``         | ``RedisStore``                 | redis      |
| ``redis+cluster://…`` | ``RedisClusterStore``          | redis      |

The registry maps a scheme to ``module:Class``; the module is imported on first use, so an
application that only uses SQLite never imports a Redis or PostgreSQL driver.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from oncepay.errors import ConfigurationError
from oncepay.idempotency.stores.base import Store

__all__ = ["SCHEMES", "Store", "store_from_url"]

SCHEMES: dict[str, str] = {
    "memory": "oncepay.idempotency.stores.memory:MemoryStore",
    "sqlite": "oncepay.idempotency.stores.sqlite:SQLiteStore",
    "postgresql": "oncepay.idempotency.stores.postgres:PostgresStore",
    "postgres": "oncepay.idempotency.stores.postgres:PostgresStore",
    "redis": "oncepay.idempotency.stores.redis:RedisStore",
    "rediss": "oncepay.idempotency.stores.redis:RedisStore",
    "redis+cluster": "oncepay.idempotency.stores.redis:RedisClusterStore",
    "rediss+cluster": "oncepay.idempotency.stores.redis:RedisClusterStore",
}


# Options OncePay reads from a store URL's query string (``redis://h/0?prefix=app:``), so that
# a URL alone — an environment variable, a CLI flag — can say everything.
URL_OPTIONS = frozenset({"prefix", "table"})


def store_from_url(url: str, **options: Any) -> Store:
    """Build the store a URL names; ``options`` go to the store class (e.g. ``table=``).

    ``prefix`` (Redis) and ``table`` (SQL) may also be given in the URL's query string.
    """
    url, from_query = _split_options(url)
    options = {**from_query, **options}
    scheme = urlsplit(url).scheme.lower()
    target = SCHEMES.get(scheme)
    if target is None:
        known = ", ".join(sorted(f"{s}://" for s in SCHEMES))
        raise ConfigurationError(f"unknown store URL scheme {scheme!r}; use one of {known}")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if (exc.name or "").startswith("oncepay"):
            raise
        extra = "postgres" if "postgres" in module_name else "redis"
        raise ConfigurationError(
            f"the {scheme}:// store needs an extra: pip install 'oncepay[{extra}]' ({exc})"
        ) from exc
    store: Store = getattr(module, class_name).from_url(url, **options)
    return store


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in URL_OPTIONS}
    if not ours:
        return url, {}
    rest = urlencode([(k, v) for k, v in pairs if k not in URL_OPTIONS])
    # Rejoin the text rather than urlunsplit(), which would fold sqlite:////abs into a host.
    base = url.split("?", 1)[0]
    return (f"{base}?{rest}" if rest else base), ours
