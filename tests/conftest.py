"""Shared fixtures: one store spec per backend, each on a real server, isolated per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from oncepay.idempotency.stores import Store, store_from_url
from tests.clock import FakeClock
from tests.servers import POSTGRES_URL, REDIS_URL, require_postgres, require_redis

BACKENDS = ["memory", "sqlite", "postgres", "redis", "cluster"]
SHARED_BACKENDS = [b for b in BACKENDS if b != "memory"]  # visible across processes
PG_SCHEMA = f"oncepay_test_{os.getpid()}"
# Per process: two sessions at once (pytest-xdist workers, two checkouts) never clean up
# each other's keys.
REDIS_PREFIX = f"oncepay-test-{os.getpid()}:"


@dataclass(frozen=True)
class StoreSpec:
    """How to build a store: picklable, so child processes can build their own."""

    backend: str
    url: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Store:
        return store_from_url(self.url, **self.options)


def _unique() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def postgres_schema() -> Iterator[str]:
    require_postgres()
    import psycopg

    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}")
    yield PG_SCHEMA
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PG_SCHEMA} CASCADE")


@pytest.fixture(scope="session")
def redis_namespace() -> Iterator[str]:
    require_redis()
    import redis

    yield REDIS_PREFIX
    client = redis.Redis.from_url(REDIS_URL)
    for name in client.scan_iter(match=f"{REDIS_PREFIX}*", count=1000):
        client.delete(name)
    client.close()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A 3-master Redis Cluster of our own on spare ports, torn down after the session."""
    require_redis()  # the binaries ship with the server
    from tests.redis_cluster import running_cluster

    with running_cluster(masters=3) as url:
        yield url


def make_spec(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> StoreSpec:
    if backend == "memory":
        return StoreSpec("memory", "memory://")
    if backend == "sqlite":
        return StoreSpec("sqlite", f"sqlite:///{tmp_path / 'keys.db'}")
    if backend == "postgres":
        schema = request.getfixturevalue("postgres_schema")
        return StoreSpec("postgres", POSTGRES_URL, {"table": f"{schema}.rec_{_unique()}"})
    if backend == "redis":
        prefix = request.getfixturevalue("redis_namespace")
        return StoreSpec("redis", REDIS_URL, {"prefix": f"{prefix}{_unique()}:"})
    if backend == "cluster":
        url = request.getfixturevalue("redis_cluster_url")
        return StoreSpec("cluster", url, {"prefix": f"{REDIS_PREFIX}{_unique()}:"})
    raise AssertionError(backend)


def _params(backends: list[str]) -> list[Any]:
    marks = {
        "postgres": [pytest.mark.postgres],
        "redis": [pytest.mark.redis],
        "cluster": [pytest.mark.redis, pytest.mark.cluster],
    }
    return [pytest.param(b, id=b, marks=marks.get(b, [])) for b in backends]


@pytest.fixture(params=_params(BACKENDS))
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    return make_spec(request, request.param, tmp_path)


@pytest.fixture(params=_params(SHARED_BACKENDS))
def shared_store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSpec:
    return make_spec(request, request.param, tmp_path)


@pytest.fixture
async def store(store_spec: StoreSpec) -> AsyncIterator[Store]:
    built = store_spec.build()
    try:
        yield built
    finally:
        await built.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
