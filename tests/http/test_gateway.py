"""The gateway as real processes: an upstream that counts executions, gateways sharing one store."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from oncepay import fingerprint, scope_from_authorization, store_from_url
from tests.conftest import make_spec
from tests.http.upstream import TEXT
from tests.processes import (
    PYTHONPATH,
    free_port,
    oncepay_args,
    running,
    uvicorn_args,
    wait_for_port,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    with running(uvicorn_args("tests.http.upstream:app", port), port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    spec = make_spec(request, request.param, tmp_path)
    if spec.backend == "redis":  # the gateway takes a URL only: the namespace rides in it
        return f"{spec.url}?prefix={spec.options['prefix']}"
    return spec.url


def gateway(upstream: str, store: str, *extra: str) -> tuple[Any, str]:
    port = free_port()
    args = oncepay_args(
        "gateway", "--upstream", upstream, "--store", store, "--port", str(port), *extra
    )
    return running(args, port), f"http://127.0.0.1:{port}"


def body_upstream(kind: str) -> tuple[Any, str]:
    """An upstream of ``tests.http.upstream``'s ``serve``: wsgiref, http.server or django."""
    port = free_port()
    args = [sys.executable, "-m", "tests.http.upstream", kind, str(port)]
    return running(args, port), f"http://127.0.0.1:{port}"


Answer = tuple[int, list[tuple[str, str]], bytes]


def exactly(
    url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b""
) -> Answer:
    """Send these headers and no others (http.client adds Host, and Content-Length for a
    body; httpx would add its own Accept, Accept-Encoding and User-Agent)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body or method == "POST":
            connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.getheaders(), response.read()
    finally:
        connection.close()


def all_of(name: str, headers: list[tuple[str, str]]) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


async def count(upstream: str, path: str) -> int:
    async with httpx.AsyncClient() as client:
        counts = (await client.get(f"{upstream}/count")).json()
    return int(counts.get(path, 0))


async def test_two_gateways_sharing_a_store_execute_a_key_once(
    upstream: str, store_url: str
) -> None:
    first, url_a = gateway(upstream, store_url)
    second, url_b = gateway(upstream, store_url)
    key = f"one-key-{store_url[:6]}-{id(store_url)}"
    before = await count(upstream, "pay")
    with first, second:
        async with httpx.AsyncClient(timeout=30) as client:

            async def send(i: int) -> httpx.Response:
                base = url_a if i % 2 else url_b
                headers = {"idempotency-key": key}
                return await client.post(f"{base}/pay", json={"amount": 100}, headers=headers)

            responses = await asyncio.gather(*(send(i) for i in range(200)))
    statuses = {r.status_code for r in responses}
    assert statuses <= {201, 409}, statuses
    winners = {r.content for r in responses if r.status_code == 201}
    assert len(winners) == 1, "every 201 is the one execution's answer"
    assert await count(upstream, "pay") == before + 1


async def test_headers_stream_and_forwarding(upstream: str, tmp_path: Path) -> None:
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            echoed = await client.post(
                f"{url}/echo?x=1",
                content=b"a" * 100_000,
                headers={"idempotency-key": "e1", "connection": "keep-alive", "x-custom": "kept"},
            )
            streamed = await client.post(f"{url}/stream", headers={"idempotency-key": "s1"})
            replayed = await client.post(f"{url}/stream", headers={"idempotency-key": "s1"})
            health = await client.get(f"{url}/health")
            utf8 = await client.post(f"{url}/utf8", headers={"idempotency-key": "u1"})
            utf8_again = await client.post(f"{url}/utf8", headers={"idempotency-key": "u1"})
    assert utf8.status_code == utf8_again.status_code == 201
    assert dict(utf8.headers.raw)[b"x-merchant"] == "Z\u00fcrich \u20ac".encode()
    assert utf8_again.headers["idempotent-replayed"] == "true"
    seen = dict(echoed.json()["headers"])
    assert echoed.json()["size"] == 100_000
    assert echoed.json()["query"] == "x=1"
    assert seen["x-custom"] == "kept"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["forwarded"].startswith('for="127.0.0.1"')
    assert streamed.text == replayed.text == "".join(f"part-{i}\n" for i in range(10))
    assert replayed.headers["idempotent-replayed"] == "true"
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "store": "ok"}


async def test_an_unreachable_upstream_is_502_and_the_key_is_released(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    process, url = gateway(dead, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"idempotency-key": "k"}
            first = await client.post(f"{url}/pay", json={}, headers=headers)
            again = await client.post(f"{url}/pay", json={}, headers=headers)
    assert first.status_code == again.status_code == 502
    assert first.json()["code"] == "upstream_unavailable"
    assert "idempotent-replayed" not in again.headers  # released, so it ran again
    assert "idempotency-key-expires" not in first.headers  # nor does it say the key lasts


async def test_an_upstream_timeout_is_504(upstream: str, tmp_path: Path) -> None:
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}", "--timeout", "0.5")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{url}/hang", json={}, headers={"idempotency-key": "h"})
    assert response.status_code == 504
    assert response.json()["code"] == "upstream_timeout"


async def test_bad_input_gets_4xx_problems_and_reaches_nothing(
    upstream: str, tmp_path: Path
) -> None:
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    before = await count(upstream, "echo")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:

            async def send(body: bytes, **headers: str) -> httpx.Response:
                return await client.post(f"{url}/echo", content=body, headers=headers)

            missing = await send(b"{}")
            malformed = await send(b"{}", **{"idempotency-key": '"x'})
            too_big = await send(b"x" * (1024 * 1024 + 1), **{"idempotency-key": "big"})
            json_headers = {"idempotency-key": "j", "content-type": "application/json"}
            broken_json = await send(b'{"a":', **json_headers)
    assert [r.status_code for r in (missing, malformed, too_big)] == [400, 400, 413]
    assert broken_json.status_code == 200  # not JSON to the gateway's eye: fingerprinted raw
    assert await count(upstream, "echo") == before + 1


async def test_decision_table_rows_through_the_gateway(upstream: str, store_url: str) -> None:
    process, url = gateway(upstream, store_url, "--timeout", "3")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:

            async def pay(key: str, amount: int = 100, path: str = "/pay") -> httpx.Response:
                headers = {"idempotency-key": key, "authorization": "Bearer t1"}
                return await client.post(f"{url}{path}", json={"amount": amount}, headers=headers)

            first = await pay("row-1")
            replay = await pay("row-1")
            reused = await pay("row-1", amount=5)
            other_tenant = await client.post(
                f"{url}/pay", json={"amount": 100},
                headers={"idempotency-key": "row-1", "authorization": "Bearer t2"},
            )  # fmt: skip

            hangs_before = await count(upstream, "hang")
            slow = asyncio.create_task(pay("row-2", path="/hang"))
            # Poll the other process until the first request is upstream (holding the key).
            while await count(upstream, "hang") == hangs_before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            busy = await pay("row-2", path="/hang")
            timed_out = await slow
            # The upstream got the request and may have acted: the key stays locked.
            after_timeout = await pay("row-2", path="/hang")
            hangs_after = await count(upstream, "hang")
    assert first.status_code == replay.status_code == 201
    assert replay.content == first.content
    assert replay.headers["idempotent-replayed"] == "true"
    assert "idempotency-key-expires" in first.headers
    assert (reused.status_code, reused.json()["code"]) == (422, "idempotency_key_reused")
    assert other_tenant.status_code == 201
    assert "idempotent-replayed" not in other_tenant.headers
    assert (busy.status_code, busy.json()["code"]) == (409, "idempotency_request_in_progress")
    assert int(busy.headers["retry-after"]) >= 1
    assert timed_out.status_code == 504
    assert timed_out.headers["idempotency-outcome"] == "unknown"
    assert after_timeout.status_code == 409
    assert hangs_after == hangs_before + 1  # not run a second time


async def test_an_unreachable_store_is_503_and_the_upstream_is_not_called(upstream: str) -> None:
    dead_store = f"redis://127.0.0.1:{free_port()}/0"
    process, url = gateway(upstream, dead_store)
    before = await count(upstream, "pay")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.post(f"{url}/pay", json={}, headers={"idempotency-key": "k"})
            health = await client.get(f"{url}/health")
    assert response.status_code == 503
    assert response.json()["code"] == "idempotency_store_unavailable"
    # The store's address is for the log, not for whoever asks (a black-box review).
    assert "127.0.0.1" not in response.text
    assert health.status_code == 503
    assert health.json() == {"status": "degraded", "store": "unavailable"}
    assert await count(upstream, "pay") == before


async def test_fail_open_passes_requests_through_a_store_outage(upstream: str) -> None:
    """SPEC §2: fail closed; fail open is an explicit option (the gateway had none)."""
    dead_store = f"redis://127.0.0.1:{free_port()}/0"
    process, url = gateway(upstream, dead_store, "--fail-open")
    before = await count(upstream, "pay")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"idempotency-key": "open-1"}
            first = await client.post(f"{url}/pay", json={}, headers=headers)
            second = await client.post(f"{url}/pay", json={}, headers=headers)
    assert first.status_code == second.status_code == 201  # unprotected: it ran twice
    assert "idempotent-replayed" not in second.headers
    assert await count(upstream, "pay") == before + 2


def test_no_cookie_state_and_only_the_clients_headers_go_upstream(
    upstream: str, tmp_path: Path
) -> None:
    """Issue 12 #1: a Set-Cookie sent to client A must never ride on client B's request."""
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}", "--optional-key")
    with process:
        with httpx.Client(timeout=30) as alice:
            signed_in = alice.post(f"{url}/set-cookie?user=alice", headers={"idempotency-key": "a"})
        managed = exactly(url, "POST", "/echo", [("idempotency-key", "b"), ("x-client", "bob")])
        unmanaged = exactly(url, "GET", "/echo", [("x-client", "bob")])
    assert signed_in.cookies["upstream-session"] == "alice"  # Set-Cookie reaches its client
    forwarded = {"forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"}
    status, _, body = managed
    seen = [name for name, _ in httpx.Response(status, content=body).json()["headers"]]
    assert "cookie" not in seen, "alice's cookie rode on bob's request"
    assert sorted(seen) == sorted(
        {"host", "content-length", "idempotency-key", "x-client"} | forwarded
    )
    status, _, body = unmanaged
    seen = [name for name, _ in httpx.Response(status, content=body).json()["headers"]]
    assert "cookie" not in seen, "alice's cookie rode on bob's request"
    assert sorted(seen) == sorted({"host", "x-client"} | forwarded)


def test_only_the_clients_accept_encoding_is_forwarded(upstream: str, tmp_path: Path) -> None:
    """Issue 12 #5: no gzip the client never asked for, neither answered nor stored."""
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        first = exactly(url, "POST", "/compressible", [("idempotency-key", "plain")])
        replay = exactly(url, "POST", "/compressible", [("idempotency-key", "plain")])
        with httpx.Client(timeout=30) as client:
            gzipped = client.post(
                f"{url}/compressible",
                headers={"idempotency-key": "zipped", "accept-encoding": "gzip"},
            )
    for status, headers, body in (first, replay):
        assert status == 201
        assert all_of("content-encoding", headers) == []
        assert all_of("x-seen-accept-encoding", headers) == ["(none)"]
        assert body == TEXT
    assert all_of("idempotent-replayed", replay[1]) == ["true"]
    assert gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.headers["x-seen-accept-encoding"] == "gzip"
    assert gzipped.content == TEXT  # httpx decoded it: the gzip body passed through intact


def test_one_date_and_one_server_header_on_every_answer(upstream: str, tmp_path: Path) -> None:
    """Issue 12 #6: the ASGI server's Date and Server stay; the upstream's are dropped."""
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        answers = {
            "executed": exactly(url, "POST", "/echo", [("idempotency-key", "d")]),
            "replayed": exactly(url, "POST", "/echo", [("idempotency-key", "d")]),
            "unmanaged": exactly(url, "GET", "/echo", []),
            "problem": exactly(url, "POST", "/echo", []),
        }
    assert [status for status, _, _ in answers.values()] == [200, 200, 200, 400]
    for what, (_, headers, _) in answers.items():
        assert len(all_of("date", headers)) == 1, (what, headers)
        assert len(all_of("server", headers)) == 1, (what, headers)
    assert all_of("idempotent-replayed", answers["replayed"][1]) == ["true"]


def test_a_failed_upstream_says_what_became_of_the_key(tmp_path: Path) -> None:
    """Issue 12 #7: no "locked key" for a request that had none; the truth for one that had."""
    upstream_process, upstream_url = body_upstream("http.server")
    with upstream_process:
        process, url = gateway(
            upstream_url, f"sqlite:///{tmp_path / 'g.db'}", "--optional-key", "--timeout", "1"
        )
        with process, httpx.Client(timeout=30) as client:
            no_key = client.post(f"{url}/drop", content=b"{}")
            safe_method = client.get(f"{url}/drop", headers={"idempotency-key": "g"})
            timed_out = client.post(f"{url}/hang", content=b"{}")
            keyed = client.post(f"{url}/drop", content=b"{}", headers={"idempotency-key": "k"})
            again = client.post(f"{url}/drop", content=b"{}", headers={"idempotency-key": "k"})
    for unmanaged in (no_key, safe_method, timed_out):
        assert unmanaged.status_code in {502, 504}
        assert unmanaged.json()["code"] in {"upstream_failed", "upstream_timeout"}
        assert "key" not in unmanaged.json()["detail"].lower(), unmanaged.json()
    assert (keyed.status_code, keyed.json()["code"]) == (502, "upstream_failed")
    assert "idempotency key stays locked" in keyed.json()["detail"]
    assert again.status_code == 409  # the truth: it is locked


def test_an_upstream_that_breaks_off_mid_body_keeps_the_key_locked(tmp_path: Path) -> None:
    """A black-box review: the upstream ran, answered its head and part of the body, then hung
    up; the key was released and a retry ran it again. Now it stays locked (409) as for any
    failure after the request left."""
    upstream_process, upstream_url = body_upstream("http.server")
    with upstream_process:
        process, url = gateway(upstream_url, f"sqlite:///{tmp_path / 'g.db'}")
        with process, httpx.Client(timeout=30) as client:
            headers = {"idempotency-key": "c1"}
            with pytest.raises(httpx.TransportError):  # the answer is cut short, not completed
                client.post(f"{url}/cut", content=b"{}", headers=headers)
            again = client.post(f"{url}/cut", content=b"{}", headers=headers)
            ran = client.get(f"{upstream_url}/cuts").text
    assert again.status_code == 409
    assert again.json()["code"] == "idempotency_request_in_progress"
    assert ran == "1"


async def test_the_clients_host_and_connection_cannot_forge_what_goes_upstream(
    upstream: str, tmp_path: Path
) -> None:
    """A black-box review: a quote in Host added a ``for=`` of the client's choosing to
    Forwarded, and a header the client's Connection named went upstream."""
    process, url = gateway(upstream, f"sqlite:///{tmp_path / 'g.db'}")
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            echoed = await client.post(
                f"{url}/echo",
                content=b"{}",
                headers={
                    "idempotency-key": "f1",
                    "host": 'a";for="10.9.9.9',
                    "connection": "x-secret, keep-alive",
                    "x-secret": "internal",
                    "x-kept": "yes",
                },
            )
    seen = dict(echoed.json()["headers"])
    assert seen["forwarded"] == 'for="127.0.0.1";host="a\\";for=\\"10.9.9.9";proto=http'
    assert "x-secret" not in seen
    assert seen["x-kept"] == "yes"


async def test_fingerprint_secret_makes_fingerprints_hmacs(upstream: str, tmp_path: Path) -> None:
    """Issue 12 #21: the gateway's --fingerprint-secret (or ONCEPAY_FINGERPRINT_SECRET)."""
    store_url = f"sqlite:///{tmp_path / 'g.db'}"
    process, url = gateway(upstream, store_url, "--fingerprint-secret", "s3cret")
    body = b'{"amount": 100}'
    headers = {"idempotency-key": "hmac", "content-type": "application/json"}
    with process:
        async with httpx.AsyncClient(timeout=30) as client:
            first = await client.post(f"{url}/pay", content=body, headers=headers)
            replay = await client.post(f"{url}/pay", content=body, headers=headers)
    store = store_from_url(store_url)
    try:
        record = await store.get(scope_from_authorization(None), "hmac")
    finally:
        await store.aclose()
    assert record is not None
    assert record.fingerprint == fingerprint("POST", "/pay", body, secret=b"s3cret")
    assert record.fingerprint != fingerprint("POST", "/pay", body)
    assert first.status_code == replay.status_code == 201
    assert replay.headers["idempotent-replayed"] == "true"


def test_keys_are_optional_by_the_documented_variable_too(upstream: str, tmp_path: Path) -> None:
    """docs/gateway.md gives ``ONCEPAY_KEY_REQUIRED=false`` for ``--optional-key``; the
    command overwrote the variable from the flag, so it had no effect (a review)."""
    store = f"sqlite:///{tmp_path / 'g.db'}"

    def answer_without_a_key(required: str) -> httpx.Response:
        port = free_port()
        args = oncepay_args(
            "gateway", "--upstream", upstream, "--store", store, "--port", str(port)
        )
        with running(args, port, env={"ONCEPAY_KEY_REQUIRED": required}):
            return httpx.post(f"http://127.0.0.1:{port}/echo", timeout=30)

    assert answer_without_a_key("false").status_code == 200
    refused = answer_without_a_key("true")
    assert (refused.status_code, refused.json()["code"]) == (400, "idempotency_key_missing")
    bad = subprocess.run(
        oncepay_args("gateway", "--upstream", upstream, "--store", store),
        env={**os.environ, "ONCEPAY_KEY_REQUIRED": "maybe"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "ONCEPAY_KEY_REQUIRED must be true or false" in bad.stdout + bad.stderr


def test_the_store_is_oncepay_store_before_its_older_name(upstream: str, tmp_path: Path) -> None:
    """SPEC §7: ``--store`` is ``ONCEPAY_STORE``; it read ``ONCEPAY_STORE_URL`` only (a
    black-box review), which still works, after SPEC's name (docs/operations.md)."""
    spec, older = tmp_path / "spec.db", tmp_path / "older.db"

    def pay_through_a_gateway(env: dict[str, str]) -> int:
        port = free_port()
        args = oncepay_args("gateway", "--upstream", upstream, "--port", str(port))
        with running(args, port, env=env):
            headers = {"idempotency-key": f"store-{len(env)}"}
            return httpx.post(f"http://127.0.0.1:{port}/pay", json={}, headers=headers).status_code

    both = {"ONCEPAY_STORE": f"sqlite:///{spec}", "ONCEPAY_STORE_URL": f"sqlite:///{older}"}
    assert pay_through_a_gateway(both) == 201
    assert _keys_in(spec) == ["store-2"]
    assert not older.exists()  # the first name set wins
    assert pay_through_a_gateway({"ONCEPAY_STORE_URL": f"sqlite:///{older}"}) == 201
    assert _keys_in(older) == ["store-1"]


def _keys_in(database: Path) -> list[str]:
    with sqlite3.connect(database) as db:
        return [row[0] for row in db.execute("SELECT idempotency_key FROM oncepay_idempotency")]


def test_keys_are_optional_by_oncepay_optional_key(upstream: str, tmp_path: Path) -> None:
    """SPEC §7: ``--optional-key`` is ``ONCEPAY_OPTIONAL_KEY``, which was ignored (a black-box
    review); when it is set it wins over ``ONCEPAY_KEY_REQUIRED``, the older inverse."""
    store = f"sqlite:///{tmp_path / 'g.db'}"

    def answer_without_a_key(env: dict[str, str]) -> httpx.Response:
        port = free_port()
        args = oncepay_args(
            "gateway", "--upstream", upstream, "--store", store, "--port", str(port)
        )
        with running(args, port, env=env):
            return httpx.post(f"http://127.0.0.1:{port}/echo", timeout=30)

    assert answer_without_a_key({"ONCEPAY_OPTIONAL_KEY": "true"}).status_code == 200
    refused = answer_without_a_key({"ONCEPAY_OPTIONAL_KEY": "false", "ONCEPAY_KEY_REQUIRED": "no"})
    assert (refused.status_code, refused.json()["code"]) == (400, "idempotency_key_missing")
    bad = subprocess.run(
        oncepay_args("gateway", "--upstream", upstream, "--store", store),
        env={**os.environ, "ONCEPAY_OPTIONAL_KEY": "maybe"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "Invalid value for ONCEPAY_OPTIONAL_KEY: 'maybe' is not a valid boolean" in bad.stderr


@pytest.mark.parametrize(
    ("switch", "env"),
    [
        (["--stripe-compatible"], {}),
        ([], {"ONCEPAY_STRIPE_COMPATIBLE": "true"}),
        ([], {}),
    ],
    ids=["flag", "variable", "default"],
)
async def test_the_stripe_compatible_switch(
    upstream: str, tmp_path: Path, switch: list[str], env: dict[str, str]
) -> None:
    """SPEC §2: "a Stripe-compatible mode (400 ``idempotency_error`` for reuse, 409
    ``idempotency_key_in_use``) is a configuration switch", and §4's gateway puts the
    middleware in front of any service: the middleware had the switch, the gateway none (a
    black-box review). With it, the gateway's own failures are Stripe's error object too."""
    stripe = bool(switch or env)
    port = free_port()
    store = f"sqlite:///{tmp_path / 'g.db'}"
    args = ["--upstream", upstream, "--store", store, "--port", str(port), "--timeout", "2"]
    with running(oncepay_args("gateway", *args, *switch), port, env=env):
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(timeout=30) as client:

            async def pay(key: str, amount: int = 100, path: str = "/pay") -> httpx.Response:
                headers = {"idempotency-key": key}
                return await client.post(f"{url}{path}", json={"amount": amount}, headers=headers)

            first = await pay("stripe-1")
            reused = await pay("stripe-1", amount=5)
            hangs_before = await count(upstream, "hang")
            slow = asyncio.create_task(pay("stripe-2", path="/hang"))
            while await count(upstream, "hang") == hangs_before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            in_use = await pay("stripe-2", path="/hang")
            timed_out = await slow
    assert first.status_code == 201
    answers = (reused, in_use, timed_out)
    if stripe:
        assert [a.headers["content-type"] for a in answers] == ["application/json"] * 3
        errors = [a.json()["error"] for a in answers]
        found = [
            (a.status_code, e["type"], e.get("code")) for a, e in zip(answers, errors, strict=True)
        ]
        assert found == [
            (400, "idempotency_error", None),  # Stripe's reuse error has no code
            (409, "invalid_request_error", "idempotency_key_in_use"),
            (504, "api_error", "upstream_timeout"),  # the gateway's own failure
        ]
        assert all(e["message"] for e in errors)
    else:
        assert [a.headers["content-type"] for a in answers] == ["application/problem+json"] * 3
        assert [(a.status_code, a.json()["code"]) for a in answers] == [
            (422, "idempotency_key_reused"),
            (409, "idempotency_request_in_progress"),
            (504, "upstream_timeout"),
        ]
    assert int(in_use.headers["retry-after"]) >= 1
    assert timed_out.headers["idempotency-outcome"] == "unknown"


@pytest.mark.parametrize("told", [[], ["--log-format", "text"]], ids=["default", "text"])
def test_the_gateway_logs_json_lines_into_a_pipe_unless_told(
    upstream: str, told: list[str]
) -> None:
    """SPEC §11: logs are structured. The gateway's warnings were bare text (no logging set
    up: Python's last-resort handler); into a pipe they are now JSON, as ``oncepay serve``'s."""
    port = free_port()
    dead_store = f"redis://127.0.0.1:{free_port()}/0"
    args = ["--upstream", upstream, "--store", dead_store, "--port", str(port), *told]
    env = {k: v for k, v in os.environ.items() if k != "ONCEPAY_LOG_FORMAT"}
    process = subprocess.Popen(
        oncepay_args("gateway", *args),
        env={**env, "PYTHONPATH": PYTHONPATH},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]
        refused = httpx.post(f"http://127.0.0.1:{port}/pay", headers={"idempotency-key": "l1"})
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=15)
    assert refused.status_code == 503
    said = "idempotency store unavailable, answering 503"
    if told:
        assert [line for line in errors.splitlines() if f" {said}: " in line], errors
        assert not [line for line in errors.splitlines() if line.startswith("{")]
    else:
        lines = [json.loads(line) for line in errors.splitlines()]  # every line
        [warning] = [line for line in lines if line["event"].startswith(said)]
        assert (warning["level"], warning["logger"]) == ("warning", "oncepay.http")
