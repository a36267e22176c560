"""SPEC §2 through the WSGI middleware, in front of real Flask and Django apps."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.test import Client, TestResponse

from oncepay.errors import ConfigurationError, LeaseLost
from oncepay.http.wsgi import IdempotencyWSGIMiddleware
from oncepay.idempotency import Engine, fingerprint, scope_from_authorization
from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.memory import MemoryStore
from tests.clock import FakeClock
from tests.conftest import make_spec
from tests.http.wsgi_apps import Runs, django_app, flask_app
from tests.processes import free_port

AUTH = {"Authorization": "Bearer tenant-a"}
BODY = b'{"amount": 100}'


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return make_spec(request, request.param, tmp_path).build()


@pytest.fixture(params=["flask", "django"])
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def runs() -> Runs:
    return Runs()


@pytest.fixture
def make(store: Store, framework: str, runs: Runs) -> Iterator[Any]:
    built: list[IdempotencyWSGIMiddleware] = []

    def make(**options: Any) -> tuple[Client, IdempotencyWSGIMiddleware]:
        app = (flask_app if framework == "flask" else django_app)(runs)
        middleware = IdempotencyWSGIMiddleware(app, store=store, **options)
        built.append(middleware)
        return Client(middleware), middleware

    yield make
    for middleware in built:
        middleware.close()


def post(
    client: Client, path: str, key: str | None, body: bytes = BODY, **headers: str
) -> TestResponse:
    all_headers = {**AUTH, "Content-Type": "application/json", **headers}
    if key is not None:
        all_headers["Idempotency-Key"] = key
    return client.post(path, data=body, headers=all_headers)


def problem_code(response: TestResponse) -> str:
    assert response.headers["Content-Type"] == "application/problem+json"
    return str(response.get_json()["code"])


def test_first_request_executes_and_the_retry_replays(make: Any, runs: Runs) -> None:
    client, _ = make()
    first = post(client, "/payments", "k1")
    again = post(client, "/payments", "k1", body=b'{ "amount":100 }')
    assert first.status_code == again.status_code == 201
    assert again.data == first.data
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotency-Key-Expires" in first.headers
    assert runs["pay"] == 1


def test_missing_and_malformed_keys_are_400_and_nothing_runs(make: Any, runs: Runs) -> None:
    client, _ = make()
    assert problem_code(post(client, "/payments", None)) == "idempotency_key_missing"
    assert problem_code(post(client, "/payments", '"open')) == "idempotency_key_invalid"
    assert runs["pay"] == 0


def test_a_different_body_under_the_same_key_is_422(make: Any, runs: Runs) -> None:
    client, _ = make()
    post(client, "/payments", "k1")
    reused = post(client, "/payments", "k1", body=b'{"amount": 5}')
    assert reused.status_code == 422
    assert problem_code(reused) == "idempotency_key_reused"
    assert runs["pay"] == 1


def test_a_body_over_the_limit_is_413(make: Any, runs: Runs) -> None:
    client, _ = make(max_body=100)
    response = post(client, "/payments", "k1", body=b'{"pad": "' + b"x" * 200 + b'"}')
    assert response.status_code == 413
    assert problem_code(response) == "request_too_large"
    assert runs["pay"] == 0


def test_a_duplicate_while_the_first_runs_is_409(make: Any, runs: Runs) -> None:
    client, _ = make()
    runs.hold.clear()
    results: list[TestResponse] = []
    first = threading.Thread(target=lambda: results.append(post(client, "/slow", "k1")))
    first.start()
    assert runs.held.wait(10)  # the first request is inside the app
    busy = post(client, "/slow", "k1")
    runs.hold.set()
    first.join(10)
    assert busy.status_code == 409
    assert problem_code(busy) == "idempotency_request_in_progress"
    assert int(busy.headers["Retry-After"]) >= 1
    assert results[0].status_code == 201
    assert post(client, "/slow", "k1").data == results[0].data
    assert runs["slow"] == 1


def test_a_5xx_releases_the_key(make: Any, runs: Runs) -> None:
    client, _ = make()
    assert post(client, "/fail", "k1").status_code == 503
    assert post(client, "/fail", "k1").status_code == 503
    assert runs["fail"] == 2


def test_only_an_answer_stored_under_its_key_says_when_the_key_expires(
    make: Any, runs: Runs
) -> None:
    client, _ = make()
    released = [post(client, path, "k-" + path) for path in ("/fail", "/status/429", "/refuse")]
    stored, replayed = post(client, "/status/404", "k4"), post(client, "/status/404", "k4")
    assert [r.status_code for r in released] == [503, 429, 400]
    assert all("Idempotency-Key-Expires" not in r.headers for r in released)
    assert stored.headers["Idempotency-Key-Expires"] == replayed.headers["Idempotency-Key-Expires"]


def test_cookies_are_not_replayed_and_headers_are(make: Any, runs: Runs) -> None:
    client, _ = make()
    first = post(client, "/headers", "k1")
    again = post(client, "/headers", "k1")
    assert "Set-Cookie" in first.headers
    assert "Set-Cookie" not in again.headers
    assert again.headers.getlist("X-Multi") == first.headers.getlist("X-Multi")
    assert runs["headers"] == 1


def test_ttl_expiry_and_lease_takeover(store: Store, framework: str, runs: Runs) -> None:
    clock = FakeClock()
    engine = Engine(store, ttl=3600, lease=30, clock=clock)
    app = (flask_app if framework == "flask" else django_app)(runs)
    middleware = IdempotencyWSGIMiddleware(app, engine=engine)
    try:
        client = Client(middleware)
        post(client, "/payments", "k1")
        clock.advance(3600)  # the key has lived its TTL: a new request
        assert "Idempotent-Replayed" not in post(client, "/payments", "k1").headers
        # A worker that died holding a key: its claim stands until the lease lapses.
        scope = scope_from_authorization(AUTH["Authorization"])
        middleware.loop.run(engine.begin(scope, "k2", fingerprint("POST", "/payments", BODY)))
        assert post(client, "/payments", "k2").status_code == 409
        clock.advance(31)
        assert post(client, "/payments", "k2").status_code == 201
        assert runs["pay"] == 3
    finally:
        middleware.close()


def test_an_unreachable_store_is_503_and_nothing_runs(framework: str, runs: Runs) -> None:
    app = (flask_app if framework == "flask" else django_app)(runs)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    middleware = IdempotencyWSGIMiddleware(app, store=dead)
    try:
        response = post(Client(middleware), "/payments", "k1")
    finally:
        middleware.close()
    assert response.status_code == 503
    assert problem_code(response) == "idempotency_store_unavailable"
    assert runs["pay"] == 0


def test_a_post_without_content_length_is_an_empty_body_not_a_hang(
    store: Store, framework: str, runs: Runs
) -> None:
    import io

    app = (flask_app if framework == "flask" else django_app)(runs)
    middleware = IdempotencyWSGIMiddleware(app, store=store)

    class Socket(io.RawIOBase):  # a client that sent its headers and waits for an answer
        def read(self, size: int = -1) -> bytes:
            raise AssertionError("read past the end of a request without Content-Length")

    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/payments", "QUERY_STRING": "",
        "SERVER_NAME": "t", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_IDEMPOTENCY_KEY": "k1", "HTTP_AUTHORIZATION": "Bearer tenant-a",
        "wsgi.input": Socket(), "wsgi.url_scheme": "http", "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False,
        "wsgi.version": (1, 0),
    }  # fmt: skip
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc: Any = None) -> Any:
        statuses.append(status)
        return None

    try:
        b"".join(middleware(environ, start_response))
    finally:
        middleware.close()
    assert statuses[0].startswith("201")
    assert runs["pay"] == 1


def test_the_middleware_still_answers_in_a_forked_child(tmp_path: Path, runs: Runs) -> None:
    import os

    middleware = IdempotencyWSGIMiddleware(flask_app(runs), store=f"sqlite:///{tmp_path}/k.db")
    post(Client(middleware), "/payments", "before-fork")  # the loop thread runs in the parent
    pid = os.fork()
    if pid == 0:  # the child, as under gunicorn --preload
        try:
            ok = post(Client(middleware), "/payments", "in-child").status_code == 201
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    middleware.close()
    assert os.waitstatus_to_exitcode(status) == 0


def test_an_app_that_never_starts_a_response_releases_its_key(store: Store) -> None:
    calls: list[int] = []

    def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        calls.append(1)
        return []

    middleware = IdempotencyWSGIMiddleware(broken, store=store)
    try:
        for _ in range(2):
            with pytest.raises(RuntimeError, match="without calling start_response"):
                post(Client(middleware), "/payments", "k1")
    finally:
        middleware.close()
    assert len(calls) == 2  # released after the first failure, so the retry ran


@pytest.mark.parametrize("status", [408, 425, 429])
def test_not_now_answers_are_not_stored_so_a_retry_runs(make: Any, runs: Runs, status: int) -> None:
    client, _ = make()
    first = post(client, f"/status/{status}", "k1")
    retry = post(client, f"/status/{status}", "k1")
    assert first.status_code == retry.status_code == status
    assert "Idempotent-Replayed" not in retry.headers
    assert runs["status"] == 2


def test_an_app_can_say_a_request_was_refused_before_anything_ran(make: Any, runs: Runs) -> None:
    client, _ = make()
    assert post(client, "/refuse", "k1").status_code == 400
    again = post(client, "/refuse", "k1")
    assert again.status_code == 400
    assert "Idempotent-Replayed" not in again.headers
    assert runs["refuse"] == 2


def test_two_key_header_lines_are_400(make: Any, runs: Runs) -> None:
    # PEP 3333 servers fold repeated lines into one value joined by commas, as werkzeug does
    # here: a bare key holding a comma is refused, a quoted one is a key with a comma in it.
    client, _ = make()
    lines = [*AUTH.items(), ("Content-Type", "application/json"),
             ("Idempotency-Key", "a"), ("Idempotency-Key", "b")]  # fmt: skip
    two = client.post("/payments", data=BODY, headers=lines)
    assert two.status_code == 400
    assert problem_code(two) == "idempotency_key_invalid"
    assert "folded" in two.get_json()["detail"]
    assert post(client, "/payments", '"a,b"').status_code == 201
    assert runs["pay"] == 1


def test_a_route_ttl_shorter_than_the_lease_is_refused_at_start_up(runs: Runs) -> None:
    with pytest.raises(ConfigurationError, match="/v1/refunds"):
        IdempotencyWSGIMiddleware(flask_app(runs), lease=60, route_ttl={"/v1/refunds*": 30})


def test_a_lost_lease_is_a_409_with_retry_after_and_an_honest_log_line(
    runs: Runs, caplog: pytest.LogCaptureFixture
) -> None:
    class Overtaken(MemoryStore):
        async def complete(self, *args: Any, **kwargs: Any) -> None:
            raise LeaseLost("token 1 no longer holds key 'k1'")

    middleware = IdempotencyWSGIMiddleware(flask_app(runs), store=Overtaken())
    try:
        response = post(Client(middleware), "/payments", "k1")
    finally:
        middleware.close()
    assert response.status_code == 409
    assert problem_code(response) == "idempotency_lease_lost"
    assert int(response.headers["Retry-After"]) >= 1
    assert "stays locked" not in caplog.text
    assert "newer attempt holds key 'k1'" in caplog.text


def test_a_test_suite_can_turn_idempotency_off(
    framework: str, runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ONCEPAY_IDEMPOTENCY_DISABLED", "true")
    app = (flask_app if framework == "flask" else django_app)(runs)
    middleware = IdempotencyWSGIMiddleware(app, store=MemoryStore())
    try:
        client = Client(middleware)
        responses = [post(client, "/payments", key) for key in ("k1", "k1", None)]
    finally:
        middleware.close()
    assert [r.status_code for r in responses] == [201, 201, 201]
    assert "Idempotency-Key-Expires" not in responses[1].headers
    assert runs["pay"] == 3
