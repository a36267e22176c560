"""The dashboard over HTTP, on SQLite and PostgreSQL: who may see it, what its searches find,
the CSV, a timeline, and a resolve that acts once."""

from __future__ import annotations

import asyncio
import csv
import io
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import insert

from oncepay.payments.dashboard.auth import COOKIE, csrf_token, new_session, valid_session
from oncepay.reconciliation.store import discrepancies
from oncepay.storage.db import write
from tests.payments.stack import Stack, running_stack

TOKEN = "dashboard-operator-token-0123"


@pytest.fixture
async def operated(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, admin_token=TOKEN) as stack:
        yield stack


def _as_operator(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=stack.client._transport,
        base_url="http://payments",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


async def test_without_a_token_configured_there_is_no_dashboard(stack: Stack) -> None:
    for path in ("/dashboard", "/dashboard/login", "/dashboard/payments.csv"):
        answer = await stack.client.get(path)
        assert answer.status_code == 404, path


async def test_a_page_sends_a_stranger_to_sign_in_and_data_is_refused(operated: Stack) -> None:
    anonymous = httpx.AsyncClient(transport=operated.client._transport, base_url="http://p")
    async with anonymous:
        page = await anonymous.get("/dashboard/payments?status=failed")
        assert page.status_code == 303
        assert page.headers["location"] == (
            "/dashboard/login?next=%2Fdashboard%2Fpayments%3Fstatus%3Dfailed"
        )
        for path in ("/dashboard/payments.csv", "/dashboard/stream"):
            assert (await anonymous.get(path)).status_code == 401
        # A merchant's API key is not the operator token.
        merchant = await anonymous.get(
            "/dashboard/payments.csv", headers={"Authorization": f"Bearer {operated.api_key}"}
        )
        assert merchant.status_code == 401


async def test_signing_in_sets_a_strict_session_and_never_redirects_away(operated: Stack) -> None:
    client = httpx.AsyncClient(transport=operated.client._transport, base_url="http://p")
    async with client:
        wrong = await client.post("/dashboard/login", data={"token": "nope", "next": "/dashboard"})
        assert wrong.status_code == 401
        assert COOKIE not in wrong.cookies
        signed = await client.post(
            "/dashboard/login", data={"token": TOKEN, "next": "https://evil.example/"}
        )
        assert signed.status_code == 303
        assert signed.headers["location"] == "/dashboard"  # not the other site
        cookie = signed.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert "Path=/dashboard" in cookie
        session = signed.cookies[COOKIE]
        assert valid_session(TOKEN, session)
        assert not valid_session("another-token-entirely", session)
        client.cookies.set(COOKIE, session)
        page = await client.get("/dashboard")
        assert page.status_code == 200
        assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self'
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_session_expires_and_cannot_be_forged() -> None:
    now = time.time()
    session = new_session(TOKEN, now=now)
    assert valid_session(TOKEN, session, now=now + 3600)
    assert not valid_session(TOKEN, session, now=now + 13 * 3600)
    expires, _, rest = session.partition(".")
    assert not valid_session(TOKEN, f"{int(expires) + 86400}.{rest}", now=now)
    nonce, _, mac = rest.partition(".")
    assert not valid_session(TOKEN, f"{expires}.{'0' * len(nonce)}.{mac}", now=now)
    assert not valid_session(TOKEN, f"{expires}.{mac}", now=now)  # the old form: sign in again
    assert not valid_session(TOKEN, "garbage", now=now)
    assert new_session(TOKEN, now=now) != session  # two sign-ins in one second: two sessions


async def test_signing_out_ends_the_session_for_every_process(
    operated: Stack, tmp_path: Path
) -> None:
    """Found by a black-box review: after signing out, the old cookie still opened the
    dashboard until it expired (12 h): a stolen cookie outlived the sign-out."""
    transport = operated.client._transport
    ours = httpx.AsyncClient(transport=transport, base_url="http://p")
    theirs = httpx.AsyncClient(transport=transport, base_url="http://p")
    async with ours, theirs:
        sessions = []
        for client in (ours, theirs):
            signed = await client.post("/dashboard/login", data={"token": TOKEN})
            sessions.append(signed.cookies[COOKIE])
            client.cookies.set(COOKIE, sessions[-1])
        mine, other = sessions
        assert mine != other
        out = await ours.post("/dashboard/logout", data={"csrf": csrf_token(TOKEN, mine)})
        assert out.status_code == 303
        again = await ours.post("/dashboard/logout", data={"csrf": csrf_token(TOKEN, mine)})
        assert again.status_code == 401  # signed out already: nothing to sign out
        stolen = httpx.AsyncClient(transport=transport, base_url="http://p")
        async with stolen:
            stolen.cookies.set(COOKIE, mine)  # the cookie's value, kept from before
            assert (await stolen.get("/dashboard")).status_code == 303  # to the sign-in page
            assert (await stolen.get("/dashboard/payments.csv")).status_code == 401
        assert (await theirs.get("/dashboard")).status_code == 200  # another session stays
    # Another API process's services (their own pools) on the same database refuse it too.
    from oncepay.payments.api.app import create_app
    from oncepay.payments.bootstrap import start
    from oncepay.payments.settings import Settings

    settings = Settings(
        database_url=operated.services.settings.database_url,
        acquirer_database_url=f"sqlite:///{tmp_path / 'other-acquirer.db'}",
        admin_token=TOKEN,
        run_worker=False,
    )
    services = await start(settings)
    try:
        app = create_app(settings, services=services)
        another = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://p")
        async with another:
            another.cookies.set(COOKIE, mine)
            assert (await another.get("/dashboard")).status_code == 303
            another.cookies.set(COOKIE, other)
            assert (await another.get("/dashboard")).status_code == 200
    finally:
        await services.aclose()


async def test_searches_find_by_every_field_and_the_csv_holds_every_match(
    operated: Stack,
) -> None:
    made = []
    for i, (amount, currency) in enumerate([(1000, "USD"), (2500, "EUR"), (7000, "EUR")]):
        answer = await operated.pay(key=f"order-{i}", amount=amount, currency=currency)
        made.append(answer.json())
    declined = (await operated.pay(key="order-d", payment_method="pm_card_declined")).json()
    async with _as_operator(operated) as client:

        async def ids(**params: str) -> list[str]:
            page = await client.get("/dashboard/payments", params=params)
            assert page.status_code == 200, page.text
            return re.findall(r'<tr data-payment="(pay_[0-9a-f]+)"', page.text)

        assert await ids() == [p["id"] for p in reversed([*made, declined])]
        assert await ids(id=made[1]["id"]) == [made[1]["id"]]
        assert await ids(key="order-2") == [made[2]["id"]]
        assert await ids(key="no-such-key") == []
        assert await ids(reference=f"{made[0]['id']}_a1") == [made[0]["id"]]
        assert await ids(status="failed") == [declined["id"]]
        assert await ids(amount_min="2000", amount_max="7000", status="captured") == [
            made[2]["id"],
            made[1]["id"],
        ]
        assert await ids(merchant=operated.merchant.id, amount_max="", key="") == [
            p["id"] for p in reversed([*made, declined])
        ]
        events = await operated.client.get("/v1/events", params={"limit": 100})
        captured = next(
            e for e in events.json()["data"] if e["data"]["object"]["id"] == made[1]["id"]
        )
        assert await ids(event=captured["id"]) == [made[1]["id"]]
        # Bad input is a 400, not a 500.
        for bad in ({"amount_min": "ten"}, {"status": "lost"}, {"created_from": "yesterday"}):
            assert (await client.get("/dashboard/payments", params=bad)).status_code == 400
        for queue in ("/dashboard/discrepancies", "/dashboard/findings"):
            assert (await client.get(queue, params={"status": "lost"})).status_code == 400
        exported = await client.get(
            "/dashboard/payments.csv", params={"currency": "", "status": "captured"}
        )
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in made)
        assert {r["amount"] for r in rows} == {"1000", "2500", "7000"}


async def test_pages_cut_a_long_list_on_a_cursor(operated: Stack) -> None:
    made = [(await operated.pay(key=f"k{i}")).json()["id"] for i in range(55)]
    async with _as_operator(operated) as client:
        first = await client.get("/dashboard/payments")
        shown = re.findall(r'<tr data-payment="(pay_[0-9a-f]+)"', first.text)
        assert shown == list(reversed(made))[:50]
        older = re.search(r'href="(/dashboard/payments\?before=\d+)" id="next"', first.text)
        assert older, "a link to the older payments"
        second = await client.get(older.group(1).replace("&amp;", "&"))
        rest = re.findall(r'<tr data-payment="(pay_[0-9a-f]+)"', second.text)
        assert rest == list(reversed(made))[50:]
        assert 'id="next"' not in second.text


async def test_a_timeline_tells_the_whole_story_without_raw_keys(operated: Stack) -> None:
    made = (await operated.pay(key="secret-order-key-77", capture_method="manual")).json()
    captured = await operated.post(f"/v1/payments/{made['id']}/capture", key="cap-77")
    assert captured.status_code == 200, captured.text
    refunded = await operated.post(f"/v1/payments/{made['id']}/refunds", {"amount": 400})
    assert refunded.status_code == 201, refunded.text
    async with _as_operator(operated) as client:
        page = await client.get(f"/dashboard/payments/{made['id']}")
        assert page.status_code == 200
        text = page.text
        for expected in (
            "payment.created",
            "payment.authorized",
            "payment.captured",
            "ledger: authorization",
            "ledger: capture",
            "acquirer primary, attempt 1",
            "breaker closed",  # each acquirer call, with the breaker's state when sent
            "refund",
        ):
            assert expected in text, expected
        assert text.count('class="request"') == 3  # create, capture, refund
        assert "secret-order-key-77" not in text
        assert (await client.get("/dashboard/payments/pay_0000")).status_code == 404


async def test_a_discrepancy_is_resolved_once_through_the_operator_api(operated: Stack) -> None:
    async with write(operated.db) as conn:
        result = await conn.execute(
            insert(discrepancies).values(
                acquirer="primary",
                kind="amount_mismatch",
                reference="pay_00_a1",
                payment_id=None,
                day="2026-12-05",
                detail="settled 99 where 100 was captured",
                remediation="review",
                status="open",
                run_id="run_test",
                opened_at=time.time(),
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        number = int(key[0])
    client = httpx.AsyncClient(transport=operated.client._transport, base_url="http://p")
    async with client:
        signed = await client.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard"})
        session = signed.cookies[COOKIE]
        client.cookies.set(COOKIE, session)
        page = await client.get("/dashboard/discrepancies")
        assert f'data-discrepancy="{number}"' in page.text
        form = {
            "note": "booked by hand",
            "idempotency_key": "dash-form-1",
            "csrf": csrf_token(TOKEN, session),
        }
        forged = await client.post(
            f"/dashboard/discrepancies/{number}/resolve", data={**form, "csrf": "x"}
        )
        assert forged.status_code == 400
        first = await client.post(f"/dashboard/discrepancies/{number}/resolve", data=form)
        again = await client.post(f"/dashboard/discrepancies/{number}/resolve", data=form)
        assert first.status_code == again.status_code == 303  # the resent form: a replay
        other = await client.post(
            f"/dashboard/discrepancies/{number}/accept",
            data={**form, "idempotency_key": "dash-form-2"},
        )
        assert other.status_code == 409  # closed already: not closed twice
        resolved = await client.get("/dashboard/discrepancies?status=resolved")
        assert "booked by hand" in resolved.text


async def test_a_hand_made_close_form_is_a_4xx_and_reaches_no_other_route(
    operated: Stack,
) -> None:
    """Found by a black-box review: a NUL in the id or a non-ASCII key was a 500, and the id went
    into the operator API's path unencoded ('..' reached .../reconciliation/resolve)."""
    reached: list[str] = []
    app = operated.client._transport.app  # type: ignore[attr-defined]

    async def recording(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
        reached.append(scope.get("path", ""))
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=recording)  # type: ignore[arg-type]
    client = httpx.AsyncClient(transport=transport, base_url="http://p")
    async with client:
        signed = await client.post("/dashboard/login", data={"token": TOKEN, "next": "/dashboard"})
        session = signed.cookies[COOKIE]
        client.cookies.set(COOKIE, session)
        form = {"note": "n", "idempotency_key": "dash-k", "csrf": csrf_token(TOKEN, session)}
        reached.clear()
        for number in ("x%00", "%2e%2e", "x%3Fa%3D", "1%2F..%2F2", "-1", "1e3", "٣"):
            answer = await client.post(f"/dashboard/discrepancies/{number}/resolve", data=form)
            assert answer.status_code == 404, (number, answer.text)
            assert answer.json()["code"] == "resource_missing"
        assert all(path.startswith("/dashboard/") for path in reached), reached
        for key in ("ключ", "a\tb", ""):
            answer = await client.post(
                "/dashboard/discrepancies/1/resolve", data={**form, "idempotency_key": key}
            )
            assert answer.status_code == 400, (key, answer.text)
            if key:  # "" is the form's own 400 (a required field)
                assert answer.json()["code"] == "idempotency_key_invalid"
        # The operator API's own problem is passed on whole: its title too.
        missing = await client.post("/dashboard/discrepancies/999999/resolve", data=form)
        assert missing.status_code == 404
        assert missing.json()["title"] != "The request is malformed"
        # The banner says only what the dashboard's own redirect says.
        page = await client.get("/dashboard/discrepancies", params={"done": "Call +1 555 0100"})
        assert "555 0100" not in page.text
        assert "resolved 7" in (await client.get("/dashboard/discrepancies?done=resolved+7")).text
        assert page.headers["x-content-type-options"] == "nosniff"


async def test_a_browser_gets_a_bad_filter_as_a_page_and_a_script_as_a_problem(
    operated: Stack,
) -> None:
    html = {"Accept": "text/html,application/xhtml+xml"}
    async with _as_operator(operated) as client:
        page = await client.get("/dashboard/payments", params={"amount_min": "²"}, headers=html)
        assert page.status_code == 400
        assert page.headers["content-type"].startswith("text/html")
        assert "is not an amount in minor units" in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"
        missing = await client.get("/dashboard/payments/pay_nope", headers=html)
        assert missing.status_code == 404
        assert "<h1>404" in missing.text
        for path, accept in (
            ("/dashboard/payments?amount_min=²", "application/json"),
            ("/dashboard/payments.csv?amount_min=²", html["Accept"]),
        ):
            problem = await client.get(path, headers={"Accept": accept})
            assert problem.status_code == 400
            assert problem.headers["content-type"] == "application/problem+json"
        # The API's own answers are never pages, whatever the client accepts.
        api = await operated.client.get("/v1/payments/pay_nope", headers=html)
        assert api.headers["content-type"] == "application/problem+json"


async def test_an_open_live_stream_ends_when_its_session_is_signed_out(
    operated: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Noticed in a review: an overview already open kept its server-sent events flowing after
    its session was signed out (until the page was left)."""
    from oncepay.payments.dashboard import routes

    monkeypatch.setattr(routes, "STREAM_INTERVAL", 0.01)
    transport = operated.client._transport
    app = transport.app  # type: ignore[attr-defined]
    browser = httpx.AsyncClient(transport=transport, base_url="http://p")
    async with browser:
        signed = await browser.post("/dashboard/login", data={"token": TOKEN})
        session = signed.cookies[COOKIE]
        chunks: list[bytes] = []
        snapshots = asyncio.Event()
        gone = asyncio.Event()  # the browser never leaves: only the server may end the stream

        requested = False

        async def receive() -> dict[str, object]:
            nonlocal requested
            if not requested:
                requested = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                assert isinstance(body, bytes)
                chunks.append(body)
                if b"event: overview" in chunks[-1]:
                    snapshots.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/dashboard/stream",
            "raw_path": b"/dashboard/stream",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"p"), (b"cookie", f"{COOKIE}={session}".encode())],
            "client": ("127.0.0.1", 1),
            "server": ("p", 80),
        }
        streaming = asyncio.ensure_future(app(scope, receive, send))
        try:
            await asyncio.wait_for(snapshots.wait(), 30)  # the stream runs
            out = await browser.post("/dashboard/logout", data={"csrf": csrf_token(TOKEN, session)})
            assert out.status_code == 303
            await asyncio.wait_for(streaming, 10)  # and ends by itself
        finally:
            gone.set()
            streaming.cancel()
    body = b"".join(chunks)
    assert body.endswith(b"event: signed_out\ndata: {}\n\n")
    assert body.count(b"event: signed_out") == 1
