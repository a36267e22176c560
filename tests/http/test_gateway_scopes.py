"""Scoping keys by a header or a cookie (issue 12 #3): the scope functions, the middleware
with them, and the gateway's ``--scope-cookie`` and ``--scope-header`` as real processes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.errors import ConfigurationError, IdempotencyScopeMissing
from oncepay.http import (
    IdempotencyMiddleware,
    IdempotencyWSGIMiddleware,
    scope_from_cookie,
    scope_from_header,
)
from oncepay.http.asgi import Receive, Scope, Send
from oncepay.http.gate import Request
from tests.http.test_gateway import count, gateway
from tests.processes import free_port, running, uvicorn_args


def request(*headers: tuple[str, str]) -> Request:
    return Request("POST", "/pay", "", list(headers))


# -- the scope functions ---------------------------------------------------------------------


def test_a_header_scope_is_a_hash_of_the_value_one_per_principal() -> None:
    scope = scope_from_header("X-User")
    alice = scope(request(("x-user", "alice")))
    assert alice == scope(request(("x-user", "alice"), ("x-trace", "1")))
    assert alice != scope(request(("x-user", "bob")))
    assert len(alice) == 64  # SHA-256 hex: no raw credential kept
    assert "alice" not in alice


def test_a_cookie_scope_reads_its_cookie_among_others() -> None:
    scope = scope_from_cookie("session")
    alice = scope(request(("cookie", "theme=dark; session=s-alice")))
    assert alice == scope(request(("cookie", "session=s-alice;theme=light")))
    assert alice == scope(request(("cookie", "theme=dark"), ("cookie", "session=s-alice")))
    assert alice != scope(request(("cookie", "session=s-bob; theme=dark")))
    assert alice != scope_from_cookie("Session")(request(("cookie", "Session=s-alice")))


def test_every_value_of_a_repeated_cookie_or_header_counts() -> None:
    """A second ``session`` cookie (set by a sibling subdomain, say) cannot move a request
    into the scope its first value names."""
    cookie = scope_from_cookie("session")
    assert cookie(request(("cookie", "session=a; session=b"))) != cookie(
        request(("cookie", "session=a"))
    )
    header = scope_from_header("x-user")
    assert header(request(("x-user", "a"), ("x-user", "b"))) != header(request(("x-user", "a")))


def test_a_header_and_a_cookie_with_one_value_are_different_scopes() -> None:
    value = "shared-value"
    by_header = scope_from_header("session")(request(("session", value)))
    by_cookie = scope_from_cookie("session")(request(("cookie", f"session={value}")))
    assert by_header != by_cookie


@pytest.mark.parametrize(
    "headers",
    [
        (),
        (("cookie", "theme=dark"),),
        (("cookie", "session="),),
        (("cookie", "sessionx=1; xsession=2"),),
        (("x-user", "alice"),),
    ],
)
def test_no_principal_is_refused_not_put_in_a_shared_scope(
    headers: tuple[tuple[str, str], ...],
) -> None:
    with pytest.raises(IdempotencyScopeMissing, match="'session' cookie"):
        scope_from_cookie("session")(request(*headers))
    with pytest.raises(IdempotencyScopeMissing, match="'X-Api-Client' header"):
        scope_from_header("X-Api-Client")(request(*headers, ("x-api-client", "")))


def test_a_fallback_scopes_what_has_no_principal_of_the_first_kind() -> None:
    scope = scope_from_cookie("session", fallback=scope_from_header("authorization"))
    browser = request(("cookie", "session=s1"))
    api = request(("authorization", "Bearer t1"))
    assert scope(browser) == scope_from_cookie("session")(browser)
    assert scope(api) == scope_from_header("authorization")(api)
    with pytest.raises(IdempotencyScopeMissing, match="'authorization' header"):
        scope(request())


@pytest.mark.parametrize("name", ["", "x user", "session=", "a;b"])
def test_a_name_that_is_no_token_is_refused_when_the_scope_is_built(name: str) -> None:
    with pytest.raises(ConfigurationError):
        scope_from_header(name)
    with pytest.raises(ConfigurationError):
        scope_from_cookie(name)


# -- the middleware with them ----------------------------------------------------------------


def whoami_asgi(runs: Counter[str]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        runs["whoami"] += 1
        cookies = dict(scope["headers"]).get(b"cookie", b"").decode()
        body = json.dumps({"cookies": cookies, "run": runs["whoami"]}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})

    return app


def whoami_wsgi(runs: Counter[str]) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        runs["whoami"] += 1
        body = json.dumps({"cookies": environ.get("HTTP_COOKIE", ""), "run": runs["whoami"]})
        start_response("201 Created", [("content-type", "application/json")])
        return [body.encode()]

    return app


def post(client: httpx.Client | httpx.AsyncClient, cookie: str | None) -> Any:
    headers = {"idempotency-key": "same-key"} | ({"cookie": cookie} if cookie else {})
    return client.post("http://test/orders", json={"sku": "A1"}, headers=headers)


async def test_asgi_middleware_scoped_by_a_cookie() -> None:
    runs: Counter[str] = Counter()
    app = IdempotencyMiddleware(whoami_asgi(runs), scope=scope_from_cookie("session"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        alice = await post(client, "session=alice")
        bob = await post(client, "session=bob")
        alice_again = await post(client, "session=alice")
        nobody = await post(client, None)
    assert alice.json()["cookies"] == "session=alice"
    assert bob.json()["cookies"] == "session=bob"  # not alice's answer
    assert alice_again.content == alice.content
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert (nobody.status_code, nobody.json()["code"]) == (400, "idempotency_scope_missing")
    assert runs["whoami"] == 2


def test_wsgi_middleware_scoped_by_a_cookie() -> None:
    runs: Counter[str] = Counter()
    app = IdempotencyWSGIMiddleware(whoami_wsgi(runs), scope=scope_from_cookie("session"))
    with httpx.Client(transport=httpx.WSGITransport(app=app)) as client:
        alice = post(client, "session=alice")
        bob = post(client, "session=bob")
        nobody = post(client, None)
    assert alice.json()["cookies"] == "session=alice"
    assert bob.json()["cookies"] == "session=bob"
    assert (nobody.status_code, nobody.json()["code"]) == (400, "idempotency_scope_missing")
    assert runs["whoami"] == 2


# -- the gateway, as processes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    with running(uvicorn_args("tests.http.upstream:app", port), port):
        yield f"http://127.0.0.1:{port}"


def whoami(url: str, key: str, **headers: str) -> httpx.Response:
    with httpx.Client(timeout=30) as client:
        return client.post(f"{url}/whoami", json={}, headers={"idempotency-key": key, **headers})


@pytest.mark.slow
def test_the_default_scope_puts_cookie_users_together(upstream: str, tmp_path: Path) -> None:
    """What the docs warn about: no Authorization, one 'anonymous' scope for everyone."""
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        alice = whoami(url, "collides", cookie="session=alice")
        bob = whoami(url, "collides", cookie="session=bob")
    assert alice.json()["user"] == "alice"
    assert bob.json()["user"] == "alice"  # bob is handed alice's answer
    assert bob.headers["idempotent-replayed"] == "true"


@pytest.mark.slow
async def test_gateway_scope_cookie_keeps_users_apart(upstream: str, tmp_path: Path) -> None:
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}", "--scope-cookie", "session")
    with process:
        alice = whoami(url, "collides", cookie="theme=dark; session=alice")
        bob = whoami(url, "collides", cookie="session=bob")
        alice_again = whoami(url, "collides", cookie="session=alice")
        before = await count(upstream, "whoami")
        nobody = whoami(url, "collides", authorization="Bearer t")
        after = await count(upstream, "whoami")
    assert (alice.json()["user"], bob.json()["user"]) == ("alice", "bob")
    assert "idempotent-replayed" not in bob.headers
    assert alice_again.content == alice.content
    assert alice_again.headers["idempotent-replayed"] == "true"
    assert (nobody.status_code, nobody.json()["code"]) == (400, "idempotency_scope_missing")
    assert after == before  # refused before the upstream


@pytest.mark.slow
def test_gateway_scope_header_keeps_users_apart(upstream: str, tmp_path: Path) -> None:
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}", "--scope-header", "X-User")
    with process:
        alice = whoami(url, "collides-h", cookie="session=alice", **{"x-user": "alice"})
        bob = whoami(url, "collides-h", cookie="session=bob", **{"x-user": "bob"})
        nobody = whoami(url, "collides-h", cookie="session=carol")
    assert (alice.json()["user"], bob.json()["user"]) == ("alice", "bob")
    assert (nobody.status_code, nobody.json()["code"]) == (400, "idempotency_scope_missing")


@pytest.mark.slow
def test_gateway_scope_cookie_then_header(upstream: str, tmp_path: Path) -> None:
    """Both flags: browsers by their session cookie, API clients by their token."""
    process, url = gateway(
        upstream, f"sqlite:///{tmp_path / 'g.db'}",
        "--scope-cookie", "session", "--scope-header", "Authorization",
    )  # fmt: skip
    with process:
        browser = whoami(url, "k", cookie="session=alice")
        api = whoami(url, "k", authorization="Bearer t1")
        other_api = whoami(url, "k", authorization="Bearer t2")
        nobody = whoami(url, "k")
    assert [r.status_code for r in (browser, api, other_api)] == [201, 201, 201]
    assert not any("idempotent-replayed" in r.headers for r in (api, other_api))
    assert (nobody.status_code, nobody.json()["code"]) == (400, "idempotency_scope_missing")
