"""The Redis keys and PostgreSQL schemas a benchmark writes: made, cleared, and the servers'
versions. Every run writes under its own prefix or schema and removes it at the end."""

from __future__ import annotations

from typing import Any

__all__ = ["pg_execute", "pg_version", "redis_client", "redis_delete", "redis_version"]

# A command that takes longer is a server in trouble; the benchmark should say so, not hang.
TIMEOUT = 5
# Keys per SCAN reply and per UNLINK: large enough to clear a run's keys in a few round trips.
BATCH = 1000


def redis_client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url, socket_timeout=TIMEOUT)


def redis_delete(url: str, prefix: str) -> int:
    """Remove every key under ``prefix``; how many there were."""
    client = redis_client(url)
    deleted = 0
    batch: list[bytes] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=2 * BATCH):
            batch.append(key)
            if len(batch) >= BATCH:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted


def redis_version(url: str) -> str:
    client = redis_client(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def pg_execute(dsn: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=TIMEOUT) as conn:
        conn.execute(statement)


def pg_version(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=2) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else "-"
