"""Transactional completion through the WSGI middleware (SPEC §3): Flask with
Flask-SQLAlchemy and Django's ORM inside ``transaction.atomic()``, on SQLite and PostgreSQL.

Django's settings are per process, so each Django case runs its requests in a child process
of its own (a real process either way: the crash cases kill one with SIGKILL)."""

from __future__ import annotations

import multiprocessing
import uuid
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client

from oncepay.errors import ConfigurationError
from oncepay.http import IdempotencyWSGIMiddleware
from oncepay.idempotency import Engine, RecordState
from oncepay.idempotency.keys import scope_from_authorization
from tests.clock import FakeClock
from tests.http.transactional_apps import (
    AUTH,
    Database,
    answer,
    dispose_engines,
    django_app,
    flask_sqlalchemy,
    postgres_database,
    sqlite_database,
)

SIGKILLED = -9  # a child's exitcode when SIGKILL ended it
CHILD_TIMEOUT = 60.0  # spawning an interpreter, setting Django up, a few requests
LEASE = 30.0
BUILDERS = {"flask": flask_sqlalchemy, "django": django_app}

Reply = tuple[int, dict[str, str], bytes]


def _params() -> list[Any]:
    return [
        pytest.param((f, kind), id=f"{f}-{kind}",
                     marks=[pytest.mark.postgres] if kind == "postgres" else [])
        for f in ("flask", "django") for kind in ("sqlite", "postgres")
    ]  # fmt: skip


@pytest.fixture(params=_params())
def variant(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Database]:
    framework, kind = request.param
    if kind == "sqlite":
        return framework, sqlite_database(str(tmp_path))
    return framework, postgres_database(request.getfixturevalue("postgres_schema"))


def _serve(framework: str, db: Database, requests: list[tuple[str, dict[str, str], float]],
           clock: FakeClock) -> list[Reply]:  # fmt: skip
    """Send ``requests`` (key, extra headers, seconds to move the clock first) through the
    middleware in front of the app; the replies as (status, headers, body)."""
    store = db.build_store()
    engine = Engine(store, clock=clock, ttl=3600.0, lease=LEASE)
    built = IdempotencyWSGIMiddleware(BUILDERS[framework](db), engine=engine, transactional=True)
    client = Client(built)
    replies: list[Reply] = []
    try:
        for key, extra, advance in requests:
            clock.advance(advance)
            headers = {"Authorization": AUTH, "Idempotency-Key": key, **extra}
            reply = client.post("/payments", json={"amount": 100}, headers=headers)
            replies.append(
                (reply.status_code, {k.lower(): v for k, v in reply.headers}, reply.get_data())
            )
        assert built.gate.mismatches == 0, "what was sent is what was stored"
    finally:
        built.close()
        dispose_engines()
    return replies


def _child(framework: str, db: Database, requests: list[tuple[str, dict[str, str], float]],
           start: float, out: Connection) -> None:  # fmt: skip
    out.send(_serve(framework, db, requests, FakeClock(start)))


def serve(framework: str, db: Database, requests: list[tuple[str, dict[str, str], float]],
          clock: FakeClock) -> tuple[int | None, list[Reply]]:  # fmt: skip
    """:func:`_serve` here (Flask) or in a child process (Django); with the child's exit code."""
    if framework == "flask":
        return 0, _serve(framework, db, requests, clock)
    context = multiprocessing.get_context("spawn")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(framework, db, requests, clock.now, sending))
    child.start()
    sending.close()
    replies: list[Reply] = receiving.recv() if receiving.poll(CHILD_TIMEOUT) else []
    child.join(CHILD_TIMEOUT)
    return child.exitcode, replies


def _scope() -> str:
    return scope_from_authorization(AUTH)


def test_the_views_row_and_the_stored_response_commit_together(
    variant: tuple[str, Database], clock: FakeClock
) -> None:
    framework, db = variant
    key = uuid.uuid4().hex
    _, replies = serve(framework, db, [(key, {}, 0.0), (key, {}, 0.0)], clock)
    (status, _, body), (again, headers, replayed) = replies
    assert (status, body and _json(body)) == (201, answer(key))
    assert (again, headers.get("idempotent-replayed"), replayed) == (201, "true", body)
    assert db.rows(key) == 1


def test_a_rollback_leaves_neither_row_nor_record_and_the_key_runs_again(
    variant: tuple[str, Database], clock: FakeClock
) -> None:
    framework, db = variant
    key = uuid.uuid4().hex
    requests = [(key, {"x-rollback": "1"}, 0.0), (key, {}, LEASE + 1)]
    _, ((failed, _, _), (retried, headers, body)) = serve(framework, db, requests, clock)
    assert failed == 500
    assert (retried, "idempotent-replayed" in headers, _json(body)) == (201, False, answer(key))
    assert db.rows(key) == 1


@pytest.mark.slow
async def test_a_process_killed_after_the_commit_replays_on_retry_with_one_row(
    variant: tuple[str, Database], clock: FakeClock
) -> None:
    framework, db = variant
    key = uuid.uuid4().hex
    context = multiprocessing.get_context("spawn")
    _, sending = context.Pipe(duplex=False)
    child = context.Process(
        target=_child, args=(framework, db, [(key, {"x-crash": "1"}, 0.0)], clock.now, sending)
    )
    child.start()
    child.join(CHILD_TIMEOUT)
    assert child.exitcode == SIGKILLED
    assert db.rows(key) == 1
    store = db.build_store()
    record = await store.get(_scope(), key)
    await store.aclose()
    assert record is not None
    assert record.state is RecordState.COMPLETED
    exitcode, replies = serve(framework, db, [(key, {}, LEASE + 1)], clock)
    assert exitcode == 0
    ((status, headers, body),) = replies
    assert (status, headers.get("idempotent-replayed"), _json(body)) == (201, "true", answer(key))
    assert db.rows(key) == 1


def _json(body: bytes) -> Any:
    import json

    return json.loads(body)


def test_a_store_that_cannot_complete_in_a_transaction_is_refused_when_built() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        return []

    with pytest.raises(ConfigurationError, match="MemoryStore cannot complete"):
        IdempotencyWSGIMiddleware(app, store="memory://", transactional=True)
