"""Log lines as JSON (structlog's stdlib formatter, the access log's fields as keys) or text
(``--log-format``, ``ONCEPAY_LOG_FORMAT``); by default (``auto``) JSON unless stderr is a
terminal: SPEC §11, "logs are structured (JSON) and carry trace ids", and a black-box review
found ``oncepay serve`` logging text unless told. Both forms carry the trace and span ids while
tracing is on (tests/payments/test_tracing.py checks them against the exported spans)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay import _logformat
from oncepay._logformat import TextFormatter, json_formatter, resolve, uvicorn_logging
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
    text, as_json = uvicorn_logging("text", access=True), uvicorn_logging("json", access=True)
    assert text["formatters"]["oncepay"] == {"()": "oncepay._logformat.TextFormatter"}
    assert text["formatters"]["default"]["()"] == "uvicorn.logging.DefaultFormatter"  # as shipped
    for name in ("oncepay", "default", "access"):
        assert as_json["formatters"][name] == {"()": "oncepay._logformat.json_formatter"}
    assert as_json["loggers"]["oncepay"]["handlers"] == ["oncepay"]
    assert as_json["loggers"]["oncepay.access"]["level"] == "INFO"
    assert uvicorn_logging("json")["loggers"]["oncepay.access"]["level"] == "WARNING"


class _Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def test_auto_is_text_for_a_terminal_and_json_for_anything_else() -> None:
    assert resolve("auto", _Stream(terminal=True)) == "text"
    assert resolve("auto", _Stream(terminal=False)) == "json"
    closed = io.StringIO()
    closed.close()  # isatty() raises: nobody is looking
    assert resolve("auto", closed) == "json"
    assert resolve("text", _Stream(terminal=False)) == "text"
    assert resolve("json", _Stream(terminal=True)) == "json"


def test_the_text_form_carries_the_trace_ids_while_a_span_is_in_progress() -> None:
    record = logging.LogRecord("oncepay.access", logging.INFO, __file__, 1, "GET / 200", (), None)
    assert TextFormatter().format(record).endswith(" GET / 200")  # no span: no ids
    _logformat.trace_ids_from(lambda: ("ab" * 16, "cd" * 8))
    try:
        line = TextFormatter().format(record)
    finally:
        _logformat.trace_ids_from(lambda: None)
    assert line.endswith(f" GET / 200 trace_id={'ab' * 16} span_id={'cd' * 8}")


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


@contextmanager
def trace_sink() -> Iterator[int]:
    """An OTLP/HTTP endpoint that takes spans and keeps none: tracing on, for the log's ids."""

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _traced_serve(tmp_path: Path, *extra: str) -> tuple[list[str], list[httpx.Response]]:
    """``oncepay serve`` with tracing on, its output a pipe (as under a container or a process
    manager); a payment and its replay. Its lines after the start banner, and the answers."""
    with trace_sink() as sink:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "ONCEPAY_"))}
        env |= {
            "PYTHONPATH": PYTHONPATH,
            "COLUMNS": "300",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        process = subprocess.Popen(
            oncepay_args("serve", "--port", str(port), *extra),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for_port(port, process)  # type: ignore[arg-type]
            _, key = read_banner(process)
            headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "traced-1"}
            url = f"http://127.0.0.1:{port}/v1/payments"
            answers = [httpx.post(url, json=PAYMENT, headers=headers) for _ in range(2)]
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=15)
    return output.splitlines(), answers


@pytest.mark.slow
def test_serve_into_a_pipe_logs_json_lines_with_trace_ids_by_default(tmp_path: Path) -> None:
    lines, answers = _traced_serve(tmp_path)
    assert [a.status_code for a in answers] == [201, 201]
    logged = [json.loads(line) for line in lines]  # every line after the banner is JSON
    access = [line for line in logged if line["logger"] == "oncepay.access"]
    assert [a["decision"] for a in access] == ["executed", "replayed"]
    assert [a["request_id"] for a in access] == [r.headers["request-id"] for r in answers]
    for line in access:
        assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]), line
        assert re.fullmatch(r"[0-9a-f]{16}", line["span_id"]), line
    assert access[0]["trace_id"] != access[1]["trace_id"]  # a replay is a request of its own


@pytest.mark.slow
def test_serve_logs_text_with_the_trace_ids_when_told(tmp_path: Path) -> None:
    lines, answers = _traced_serve(tmp_path, "--log-format", "text")
    access = [line for line in lines if " POST /v1/payments 201 " in line]
    assert len(access) == 2, lines
    assert not [line for line in lines if line.startswith("{")]
    for line, answer in zip(access, answers, strict=True):
        assert re.search(
            rf"decision=\w+ request_id={answer.headers['request-id']} "
            r"trace_id=[0-9a-f]{32} span_id=[0-9a-f]{16}$",
            line,
        ), line
