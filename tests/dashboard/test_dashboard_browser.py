"""The operator dashboard, used as a person would (issue 17): Debian's Chromium driven by
Playwright against a real ``oncepay serve`` process. The operator signs in, sees a payment
made seconds earlier appear live, opens its timeline, filters, exports CSV and resolves a
discrepancy; any JavaScript error or console error on any page fails the test. With
``ONCEPAY_SCREENSHOTS=DIR`` each view is saved as a PNG (the pictures in docs/dashboard.md)."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.payments.dashboard.auth import COOKIE, csrf_token
from tests.processes import PYTHONPATH, free_port, oncepay_args, read_banner, wait_for_port
from tests.servers import require_tool

TOKEN = "operator-token-for-the-browser-test"
PAYMENT = {"amount": 4321, "currency": "EUR", "payment_method": "pm_card_ok"}
CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.slow


class Service:
    def __init__(self, url: str, api_key: str, folder: Path) -> None:
        self.url, self.api_key, self.folder = url, api_key, folder

    def pay(self, key: str, **fields: Any) -> dict[str, Any]:
        answer = httpx.post(
            f"{self.url}/v1/payments",
            json={**PAYMENT, **fields},
            headers={"Authorization": f"Bearer {self.api_key}", "Idempotency-Key": key},
        )
        assert answer.status_code == 201, answer.text
        found: dict[str, Any] = answer.json()
        return found


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": PYTHONPATH, "ONCEPAY_ADMIN_TOKEN": TOKEN, "COLUMNS": "300"}
    process = subprocess.Popen(
        oncepay_args("serve", "--port", str(port), "--quiet"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]
        _, key = read_banner(process)
        yield Service(f"http://127.0.0.1:{port}", key, tmp_path)
    finally:
        process.terminate()
        process.communicate(timeout=15)


def _open_discrepancy(folder: Path, payment_id: str) -> int:
    """A discrepancy as a reconciliation run would leave it (the run itself is tested in
    tests/reconciliation/)."""
    from sqlalchemy import insert

    from oncepay.reconciliation.store import discrepancies
    from oncepay.storage.db import Database, write

    async def add() -> int:
        db = Database.from_url(f"sqlite:///{folder / 'oncepay.db'}")
        try:
            async with write(db) as conn:
                result = await conn.execute(
                    insert(discrepancies).values(
                        acquirer="primary",
                        kind="amount_mismatch",
                        reference=f"{payment_id}_a1",
                        payment_id=payment_id,
                        day="2026-12-05",
                        detail="settled 4320 EUR where OncePay captured 4321 EUR",
                        remediation="review",
                        status="open",
                        run_id="run_browser_test",
                        opened_at=time.time(),
                    )
                )
                key = result.inserted_primary_key
                assert key is not None
                return int(key[0])
        finally:
            await db.aclose()

    return asyncio.run(add())


def _open_finding(folder: Path, merchant_id: str) -> None:
    """A finding as the worker's live analysis would store it (tested in tests/insight/)."""
    from sqlalchemy import insert

    from oncepay.insight.store import findings
    from oncepay.storage.db import Database, write

    async def add() -> None:
        db = Database.from_url(f"sqlite:///{folder / 'oncepay.db'}")
        now = time.time()
        try:
            async with write(db) as conn:
                await conn.execute(
                    insert(findings).values(
                        id="fnd_browser",
                        merchant_id=merchant_id,
                        kind="key_per_retry",
                        status="open",
                        first_at=now - 600,
                        last_at=now - 60,
                        events=42,
                        detail="42 requests were retried under a fresh Idempotency-Key",
                        evidence='{"example_keys": ["9f2c41d0"], "sources": 3}',
                        created_at=now,
                        updated_at=now,
                    )
                )
        finally:
            await db.aclose()

    asyncio.run(add())


def _browser() -> Any:
    require_tool("chromium")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_an_operator_signs_in_watches_searches_exports_and_resolves(
    service: Service, tmp_path: Path
) -> None:
    shots = os.environ.get("ONCEPAY_SCREENSHOTS")
    earlier = service.pay("browser-earlier")
    discrepancy = _open_discrepancy(service.folder, earlier["id"])
    _open_finding(service.folder, "mer_browser_test")
    problems: list[str] = []
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(
            accept_downloads=True, viewport={"width": 1280, "height": 900}
        )
        page = context.new_page()
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )

        def snap(name: str) -> None:
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(shots) / f"dashboard-{name}.png"), full_page=True)

        # Not signed in: the sign-in page, then the page asked for.
        page.goto(f"{service.url}/dashboard/payments")
        assert "/dashboard/login" in page.url
        snap("sign-in")
        page.fill("input[name=token]", "not the token")
        page.click("button[type=submit]")
        assert page.get_by_role("alert").is_visible()
        # The refusal is a 401, which the browser notes in its console; nothing else may be.
        assert problems == [
            "console error: Failed to load resource: the server responded with a status of "
            "401 (Unauthorized)"
        ]
        problems.clear()
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#results")
        assert page.url == f"{service.url}/dashboard/payments"

        # Live: a payment made now appears on the overview without a reload.
        page.goto(f"{service.url}/dashboard")
        page.wait_for_selector("#live.on")  # the event stream is connected
        made = service.pay("browser-live")
        page.wait_for_selector(f'#recent tr[data-payment="{made["id"]}"]', timeout=15_000)
        page.wait_for_selector("#decisions-chart canvas")  # two snapshots drew the chart
        assert page.locator('[data-status="captured"]').inner_text() != "0"
        snap("overview")

        # Its timeline.
        page.click(f'#recent a[href="/dashboard/payments/{made["id"]}"]')
        page.wait_for_selector("#timeline")
        items = page.locator("#timeline li").all_inner_texts()
        assert any("payment.captured" in item for item in items), items
        assert any("Idempotency-Key" in item and "browser-live" not in item for item in items)
        assert any("ledger: capture" in item for item in items), items
        snap("timeline")

        # Search: by status and amount, by idempotency key (never shown raw), then CSV.
        other = service.pay("browser-other", amount=99, currency="USD")
        page.goto(f"{service.url}/dashboard/payments")
        page.wait_for_selector(f'#results tr[data-payment="{other["id"]}"]')
        page.fill("input[name=amount_min]", "4000")
        page.select_option("select[name=status]", "captured")
        page.click("#search button[type=submit]")  # htmx swaps the results in place
        page.wait_for_selector(f'#results tr[data-payment="{other["id"]}"]', state="detached")
        assert "amount_min=4000" in page.url  # and the address says what is shown
        shown = page.locator("#results tr[data-payment]").evaluate_all(
            "rows => rows.map(r => r.dataset.payment)"
        )
        assert sorted(shown) == sorted([earlier["id"], made["id"]])
        snap("search")
        with page.expect_download() as download:
            page.click("#csv")
        exported = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
        assert sorted(row["id"] for row in exported) == sorted(shown)
        assert {row["amount"] for row in exported} == {"4321"}
        page.goto(f"{service.url}/dashboard/payments?key=browser-live")
        found = page.locator("#results tr[data-payment]").evaluate_all(
            "rows => rows.map(r => r.dataset.payment)"
        )
        assert found == [made["id"]]

        # A discrepancy resolved with a note, through the operator API.
        page.goto(f"{service.url}/dashboard/discrepancies")
        row = page.locator(f'tr[data-discrepancy="{discrepancy}"]')
        snap("discrepancies")
        row.locator("input[name=note]").fill("fee booked by hand, ticket FIN-42")
        row.get_by_role("button", name="Resolve").click()
        page.wait_for_selector(".flash")
        assert page.locator(f'tr[data-discrepancy="{discrepancy}"]').count() == 0
        page.goto(f"{service.url}/dashboard/discrepancies?status=resolved")
        assert "FIN-42" in page.locator(f'tr[data-discrepancy="{discrepancy}"]').inner_text()
        page.goto(f"{service.url}/dashboard/findings")
        finding = page.locator("#findings tbody tr").first.inner_text()
        assert "key_per_retry" in finding
        assert "fresh Idempotency-Key" in finding
        assert "9f2c41d0" in finding  # its evidence
        snap("findings")
        browser.close()
    assert problems == []


def test_docs_and_redoc_load_without_the_network(service: Service) -> None:
    """/docs and /redoc render from the package's own assets: every request the page makes
    goes to the service itself."""
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        elsewhere: list[str] = []
        page.on(
            "request",
            lambda request: (
                None
                if request.url.startswith((service.url, "data:", "blob:"))
                else elsewhere.append(request.url)
            ),
        )
        problems: list[str] = []  # a script or a style the page's CSP refused is one
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console {message.type}: {message.text}")
                if message.type == "error"
                else None
            ),
        )
        for path in ("/docs", "/redoc"):
            answer = page.goto(f"{service.url}{path}")
            assert answer is not None
            policy = answer.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in policy
            assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";")[0]
            if path == "/docs":
                page.wait_for_selector(".swagger-ui .opblock", timeout=20_000)
                page.click(".opblock-summary")  # a route opens: its schema is drawn
                page.wait_for_selector(".opblock-body", timeout=10_000)
            else:
                page.wait_for_selector("redoc [role=menuitem], .menu-content", timeout=30_000)
                page.wait_for_selector("[data-section-id]", timeout=30_000)
        browser.close()
    assert elsewhere == []
    assert problems == []


def test_an_open_overview_leaves_when_its_session_is_signed_out_elsewhere(
    service: Service,
) -> None:
    """The live overview's stream ends with a ``signed_out`` event when its session is signed
    out in another tab or by a copy of the cookie, and the page goes to the sign-in page."""
    with _browser() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(f"{service.url}/dashboard")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#live.on")  # the event stream is connected
        cookie = next(c for c in page.context.cookies() if c["name"] == COOKIE)
        out = httpx.post(
            f"{service.url}/dashboard/logout",
            data={"csrf": csrf_token(TOKEN, cookie["value"])},
            cookies={COOKIE: cookie["value"]},
        )
        assert out.status_code == 303
        page.wait_for_selector("input[name=token]", timeout=15_000)  # back at the sign-in
        assert page.locator("#live").count() == 0
        browser.close()
