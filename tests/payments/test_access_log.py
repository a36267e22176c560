"""``oncepay serve`` shows what happens (issue 14's first five minutes): the database it uses
by absolute path, and a line per request (method, path, status, duration, idempotency
decision, request id) unless ``--quiet``; every answer carries its ``Request-Id``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.payments.stack import Stack
from tests.processes import PYTHONPATH, free_port, oncepay_args, read_banner, wait_for_port

PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
LINE = re.compile(
    r"(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) (?P<ms>\d+\.\d)ms "
    r"decision=(?P<decision>\S+) request_id=(?P<id>req_[0-9a-f]{24})$"
)


def _serve(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[list[str], list[httpx.Response], str]:
    """Run serve in ``tmp_path``, make a payment, replay it, miss a route; return its output
    lines (as text: its output is a pipe, which gets JSON by default), the answers and the
    banner."""
    port = free_port()
    process = subprocess.Popen(
        oncepay_args("serve", "--port", str(port), "--log-format", "text", *extra),
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": PYTHONPATH, "COLUMNS": "300", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]
        banner, key = read_banner(process)
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "k1"}
        url = f"http://127.0.0.1:{port}"
        answers = [
            httpx.post(f"{url}/v1/payments", json=PAYMENT, headers=headers),
            httpx.post(f"{url}/v1/payments", json=PAYMENT, headers=headers),
            httpx.get(f"{url}/v1/nowhere", headers=headers),
        ]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    return output.splitlines(), answers, banner


def test_serve_logs_a_line_per_request_and_names_its_database(tmp_path: Path) -> None:
    lines, answers, banner = _serve(tmp_path)
    assert f"database: sqlite:///{tmp_path.resolve() / 'oncepay.db'}" in banner
    logged = [m for line in lines if (m := LINE.search(line))]
    assert [(m["method"], m["path"], m["status"], m["decision"]) for m in logged] == [
        ("POST", "/v1/payments", "201", "executed"),
        ("POST", "/v1/payments", "201", "replayed"),
        ("GET", "/v1/nowhere", "404", "-"),
    ]
    assert [m["id"] for m in logged] == [a.headers["request-id"] for a in answers]
    assert len({a.headers["request-id"] for a in answers}) == 3  # one id per request


def test_serve_quiet_logs_no_request(tmp_path: Path) -> None:
    lines, answers, _ = _serve(tmp_path, "--quiet")
    assert [a.status_code for a in answers] == [201, 201, 404]
    assert not [line for line in lines if LINE.search(line)]


def test_serve_is_quiet_by_oncepay_quiet_first(tmp_path: Path) -> None:
    """SPEC §7: ``--quiet`` is ``ONCEPAY_QUIET``, which was ignored (a black-box review); set,
    it wins over ``ONCEPAY_ACCESS_LOG``, the setting it inverts (docs/operations.md)."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    lines, answers, _ = _serve(tmp_path / "a", env={"ONCEPAY_QUIET": "true"})
    assert [a.status_code for a in answers] == [201, 201, 404]
    assert not [line for line in lines if LINE.search(line)]
    both = {"ONCEPAY_QUIET": "false", "ONCEPAY_ACCESS_LOG": "false"}
    lines, _, _ = _serve(tmp_path / "b", env=both)
    assert len([line for line in lines if LINE.search(line)]) == 3


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_every_answer_has_its_own_request_id(stack: Stack, method: str) -> None:
    # Problems too (no key, no route), and a client's own id is not taken as ours.
    sent = {"Request-Id": "req_000000000000000000000000", "Authorization": "Bearer nope"}
    answers = [
        await stack.client.request(method, "/v1/payments", headers=sent),
        await stack.client.request(method, "/v1/payments"),
        await stack.client.request(method, "/v1/nowhere"),
    ]
    ids = [a.headers["request-id"] for a in answers]
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", i) for i in ids), ids
    assert len(set(ids)) == 3
    assert sent["Request-Id"] not in ids


async def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by a black-box review: a client that went away while sending its body was logged
    and counted as a 500 (with no traceback under its id), so 5xx alerts fired on timeouts."""
    app = stack.client._transport.app  # type: ignore[attr-defined]
    arriving: list[dict[str, object]] = [
        {"type": "http.request", "body": b'{"amount": 10', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, object]:
        return arriving.pop(0) if arriving else {"type": "http.disconnect"}

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    headers = {
        "host": "payments",
        "content-type": "application/json",
        "content-length": "100",
        "authorization": f"Bearer {stack.api_key}",
        "idempotency-key": "left-early",
    }
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/payments",
        "raw_path": b"/v1/payments",
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("payments", 80),
    }
    before = await _post_counts(stack)
    with caplog.at_level(logging.INFO, logger="oncepay.access"):
        await app(scope, receive, send)
    assert sent == []  # nobody to answer
    [logged] = [r for r in caplog.records if r.name == "oncepay.access"]
    assert logged.status == 499  # type: ignore[attr-defined]
    assert " 499 " in logged.getMessage()
    after = await _post_counts(stack)  # the registry is the process's: compare, not count
    assert after.get("499", 0) == before.get("499", 0) + 1
    assert after.get("500", 0) == before.get("500", 0)


async def _post_counts(stack: Stack) -> dict[str, float]:
    """oncepay_http_requests_total of POSTs, summed by status."""
    counts: dict[str, float] = {}
    for line in (await stack.client.get("/metrics")).text.splitlines():
        found = re.match(r"oncepay_http_requests_total\{(.*)\} (\S+)$", line)
        if found and 'method="POST"' in found[1]:
            status = re.search(r'status="(\d+)"', found[1])
            assert status is not None
            counts[status[1]] = counts.get(status[1], 0) + float(found[2])
    return counts
