"""Log lines as text (a terminal's default) or JSON (``--log-format json``,
``ONCEPAY_LOG_FORMAT``): structlog's stdlib formatter, the access log's fields as keys. The trace
ids in them are checked with tracing on in tests/payments/test_tracing.py."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import httpx
import pytest

from oncepay.cli.serve import log_config
from oncepay.payments.logformat import json_formatter
from tests.processes import PYTHONPATH, free_port, oncepay_args, read_banner, wait_for_port

pytest.importorskip("structlog", reason="the otel extra")

PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}


def test_the_json_formatter_writes_a_record_and_its_extra_fields_as_one_object() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("oncepay.test_logging")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("paid %s", "pay_1", extra={"status": 201, "decision": "executed"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "paid pay_1"
    assert (first["level"], first["logger"]) == ("warning", "oncepay.test_logging")
    assert (first["status"], first["decision"]) == (201, "executed")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z", first["timestamp"])
    assert "trace_id" not in first  # tracing is off in this process
    assert second["level"] == "error"
    assert "ValueError: boom" in second["exception"]


def test_log_config_formats_oncepay_and_uvicorn_alike() -> None:
    text, as_json = log_config(access=True), log_config(access=True, log_format="json")
    assert text["formatters"]["oncepay"] == {"format": "%(asctime)s %(message)s"}
    assert text["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"  # as shipped
    for name in ("oncepay", "default", "access"):
        assert as_json["formatters"][name] == {"()": "oncepay.payments.logformat.json_formatter"}
    assert as_json["loggers"]["oncepay"]["handlers"] == ["oncepay"]


@pytest.mark.slow
def test_serve_logs_json_lines_with_the_access_fields(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen(
        oncepay_args("serve", "--port", str(port)),
        cwd=tmp_path,
        env={**env, "PYTHONPATH": PYTHONPATH, "COLUMNS": "300", "ONCEPAY_LOG_FORMAT": "json"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the banner (stderr, as a console's) and the log lines
        text=True,
    )
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]
        _, key = read_banner(process)
        headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "j1"}
        url = f"http://127.0.0.1:{port}/v1/payments"
        answers = [httpx.post(url, json=PAYMENT, headers=headers) for _ in range(2)]
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=15)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "oncepay.access"]
    assert [(a["method"], a["path"], a["status"], a["decision"]) for a in access] == [
        ("POST", "/v1/payments", 201, "executed"),
        ("POST", "/v1/payments", 201, "replayed"),
    ]
    assert [a["request_id"] for a in access] == [r.headers["request-id"] for r in answers]
    assert all(a["level"] == "info" and a["duration_ms"] >= 0 for a in access)
    assert access[0]["event"].startswith("POST /v1/payments 201 ")


def test_serve_refuses_an_unknown_log_format(tmp_path: Path) -> None:
    done = subprocess.run(
        oncepay_args("serve", "--log-format", "xml"),
        check=False,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--log-format: Input should be" in done.stdout + done.stderr
