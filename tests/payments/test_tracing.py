"""SPEC §11's traces, end to end (issue 17's "Done when"): a real ``oncepay serve`` exports over
OTLP/HTTP to a small receiver in this test, which decodes the protobuf. One trace holds the
payment's request span with its idempotency decision, the phases and the acquirer attempts,
and the webhook delivery its event caused; the replay's request span links to the execution's.
Without OTEL_* variables, serving imports nothing of OpenTelemetry."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.payments import tracing
from tests.payments.stack import database_url, drop_schema
from tests.processes import (
    PYTHONPATH,
    ROOT,
    free_port,
    oncepay_args,
    read_banner,
    running,
    wait_for_port,
)

pytest.importorskip("opentelemetry.sdk", reason="the otel extra")
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

PAYMENT = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
DEADLINE = 30.0  # seconds for spans and deliveries to arrive (the exporter batches each 50 ms)


class Received:
    """What the receiver got: spans (as dicts) and webhook deliveries (their headers)."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.webhooks: list[dict[str, str]] = []
        self.changed = threading.Condition()

    def wait_for(self, what: str, ready: Any) -> None:
        deadline = time.monotonic() + DEADLINE
        with self.changed:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({s["name"] for s in self.spans})
                    raise AssertionError(f"no {what} within {DEADLINE} s; spans: {names}")
                self.changed.wait(left)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


def _decode(body: bytes) -> list[dict[str, Any]]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource in request.resource_spans:
        for scope in resource.scope_spans:
            for span in scope.spans:
                spans.append(
                    {
                        "name": span.name,
                        "trace": span.trace_id.hex(),
                        "id": span.span_id.hex(),
                        "parent": span.parent_span_id.hex(),
                        "attributes": _attributes(span.attributes),
                        "events": [(e.name, _attributes(e.attributes)) for e in span.events],
                        "links": [
                            (link.trace_id.hex(), link.span_id.hex(), _attributes(link.attributes))
                            for link in span.links
                        ],
                        "service": _attributes(resource.resource.attributes).get("service.name"),
                        "error": span.status.code == span.status.STATUS_CODE_ERROR,
                    }
                )
    return spans


@contextmanager
def receiver() -> Iterator[tuple[int, Received]]:
    """An OTLP/HTTP trace receiver (``POST /v1/traces``) and a webhook endpoint (``/hook``)."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with received.changed:
                if self.path == "/v1/traces":
                    received.spans.extend(_decode(body))
                    answer = ExportTraceServiceResponse().SerializeToString()
                    kind = "application/x-protobuf"
                else:
                    received.webhooks.append({k.lower(): v for k, v in self.headers.items()})
                    answer, kind = b"{}", "application/json"
                received.changed.notify_all()
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        from tests.servers import require_postgres

        require_postgres()
    url = database_url(request.param, tmp_path)
    yield url
    if request.param == "postgres":
        import asyncio

        asyncio.run(drop_schema(url))


@pytest.mark.slow
def test_one_trace_holds_the_payment_its_phases_attempts_replay_and_webhook(
    tmp_path: Path, database: str
) -> None:
    with receiver() as (port_in, received):
        port = free_port()
        env = {
            **os.environ,
            "PYTHONPATH": PYTHONPATH,
            "COLUMNS": "300",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port_in}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "ONCEPAY_WEBHOOK_ALLOW_PRIVATE": "true",
            "ONCEPAY_TRACE_SQL": "true",  # a span per SQL statement too
            "ONCEPAY_WORKER_INTERVAL": "0.1",
        }
        process = subprocess.Popen(
            oncepay_args(
                "serve", "--port", str(port), "--database-url", database, "--log-format", "json"
            ),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            wait_for_port(port, process)  # type: ignore[arg-type]
            auth = {"Authorization": f"Bearer {read_banner(process)[1]}"}
            url = f"http://127.0.0.1:{port}"
            hook = httpx.post(
                f"{url}/v1/webhook_endpoints",
                json={"url": f"http://127.0.0.1:{port_in}/hook", "events": ["payment.captured"]},
                headers={**auth, "Idempotency-Key": "hook-1"},
            )
            assert hook.status_code == 201, hook.text
            paying = {**auth, "Idempotency-Key": "pay-1"}
            paid = httpx.post(f"{url}/v1/payments", json=PAYMENT, headers=paying)
            assert paid.status_code == 201, paid.text
            replay = httpx.post(f"{url}/v1/payments", json=PAYMENT, headers=paying)
            assert replay.headers["idempotent-replayed"] == "true"
            assert replay.content == paid.content
            assert tracing.TRACE_HEADER not in replay.headers  # stored, never sent
            fetched = httpx.get(f"{url}/v1/payments/{paid.json()['id']}", headers=auth)
            assert fetched.status_code == 200
            # SPEC §11: the attribute takes §9's names, `missing` among them (it read `invalid`)
            bad = {"amount": 0}  # a bad body too: the key's problem is answered first
            unkeyed = httpx.post(f"{url}/v1/payments", json=bad, headers=auth)
            assert unkeyed.json()["code"] == "idempotency_key_missing", unkeyed.text
            malformed = {**auth, "Idempotency-Key": "x" * 256}
            garbled = httpx.post(f"{url}/v1/payments", json=bad, headers=malformed)
            assert garbled.json()["code"] == "idempotency_key_invalid", garbled.text

            def decided(decision: str) -> list[dict[str, Any]]:
                return [
                    s
                    for s in received.spans
                    if s["attributes"].get("oncepay.idempotency.decision") == decision
                    and s["attributes"].get("http.route") == "/v1/payments"
                ]

            received.wait_for("replay span", lambda: decided("replayed"))
            received.wait_for("missing key span", lambda: decided("missing"))
            received.wait_for("malformed key span", lambda: decided("invalid"))
            received.wait_for(
                "the read's span, named by its route",
                lambda: any(s["name"] == "GET /v1/payments/{id}" for s in received.spans),
            )
            received.wait_for(
                "webhook delivery span",
                lambda: any(s["name"] == "webhook delivery" for s in received.spans),
            )
        finally:
            process.terminate()
            output, _ = process.communicate(timeout=30)

    [request] = decided("executed")
    [replayed] = decided("replayed")
    assert request["name"] == "POST /v1/payments"
    assert request["service"] == "oncepay"
    attributes = request["attributes"]
    assert attributes["oncepay.idempotency.fence"] >= 1
    key_hash = attributes["oncepay.idempotency.key_hash"]
    assert re.fullmatch(r"[0-9a-f]{32}", key_hash)
    assert "pay-1" not in json.dumps(received.spans)  # the key as a hash only, never raw
    assert replayed["attributes"]["oncepay.idempotency.key_hash"] == key_hash

    trace = [s for s in received.spans if s["trace"] == request["trace"]]
    by_id = {s["id"]: s for s in trace}

    def under_request(span: dict[str, Any]) -> bool:
        while span["parent"]:
            if span["parent"] == request["id"]:
                return True
            span = by_id[span["parent"]]
        return False

    phases = [s["attributes"]["oncepay.phase"] for s in trace if s["name"].startswith("oncepay.")]
    assert phases == ["start", "acquirer", "record", "finish"] or sorted(phases) == sorted(
        ["start", "acquirer", "record", "finish"]
    )
    assert all(under_request(s) for s in trace if s["name"].startswith("oncepay.phase"))
    [call] = [s for s in trace if s["name"] == "acquirer authorize"]
    assert call["attributes"]["oncepay.acquirer"] == "primary"
    assert call["attributes"]["oncepay.acquirer.outcome"] == "approved"
    attempts = [s for s in trace if s["name"] == "acquirer authorize attempt"]
    assert [a["attributes"]["oncepay.acquirer.attempt"] for a in attempts] == [1]
    assert attempts[0]["parent"] == call["id"]
    assert ("oncepay.breaker", {"oncepay.breaker.state": "closed"}) in attempts[0]["events"]
    assert under_request(call)
    events = [e for s in trace for e in s["events"]]
    assert any(name == "oncepay.ledger.posting" for name, _ in events)
    outbox = [a for name, a in events if name == "oncepay.outbox.event"]
    assert "payment.captured" in {a["oncepay.event.type"] for a in outbox}
    # A span per statement (ONCEPAY_TRACE_SQL), the hot path's raw ones included, each
    # under the phase that ran it.
    statements = [s for s in trace if "db.statement" in s["attributes"]]
    texts = [" ".join(s["attributes"]["db.statement"].split()) for s in statements]
    assert any(text.startswith("INSERT INTO payments") for text in texts), texts
    assert any(text.startswith("INSERT INTO ledger_entries") for text in texts), texts
    assert all(under_request(s) for s in statements)
    assert {s["name"] for s in statements} <= {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH"}

    # The access log's JSON lines carry the request span's ids.
    logged = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    access = [line for line in logged if line["logger"] == "oncepay.access"]
    ids = [
        (a["decision"], a["trace_id"], a["span_id"]) for a in access if a["path"] == "/v1/payments"
    ]
    [unkeyed_span] = decided("missing")
    [garbled_span] = decided("invalid")
    assert ids == [
        ("executed", request["trace"], request["id"]),
        ("replayed", replayed["trace"], replayed["id"]),
        ("missing", unkeyed_span["trace"], unkeyed_span["id"]),
        ("invalid", garbled_span["trace"], garbled_span["id"]),
    ]

    # The replay: its own trace (a new request), linked to the execution's request span.
    assert (request["trace"], request["id"]) in [(t, i) for t, i, _ in replayed["links"]]
    # A replay is the usual answer to a retry, not an error: no span of its trace failed
    # (its phase-1 claim found the record and wrote nothing; that raised, and was recorded
    # as an exception on an ERROR span, before).
    replay_trace = [s for s in received.spans if s["trace"] == replayed["trace"]]
    assert not [s["name"] for s in replay_trace if s["error"]]
    assert not [e for s in replay_trace for e, _ in s["events"] if e == "exception"]
    assert not [s["name"] for s in trace if s["error"]]

    # The webhook delivery continues the payment's trace, and the receiver got its traceparent.
    [delivery] = [s for s in received.spans if s["name"] == "webhook delivery"]
    assert delivery["trace"] == request["trace"]
    assert delivery["attributes"]["oncepay.webhook.attempt"] == 1
    assert delivery["attributes"]["http.response.status_code"] == 200
    [webhook] = received.webhooks
    assert webhook["traceparent"].split("-")[1] == request["trace"]


@pytest.mark.slow
def test_a_failover_links_to_the_failed_call_and_retries_count_their_resends(
    tmp_path: Path,
) -> None:
    """The primary acquirer refuses connections (never sent: failing over is safe); its
    attempts are numbered, and the call on the secondary links to the primary's call."""
    db = f"sqlite:///{tmp_path / 'p.db'}"
    merchant = subprocess.run(
        oncepay_args("merchants", "create", "Shop", "--database-url", db),
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
    )
    api_key = json.loads(merchant.stdout)["api_key"]
    secondary_port, api_port, nobody = free_port(), free_port(), free_port()
    acquirer_args = oncepay_args(
        "acquirer", "--port", str(secondary_port), "--database-url", f"sqlite:///{tmp_path}/a.db"
    )
    with receiver() as (port_in, received), running(acquirer_args, secondary_port):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port_in}",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "ONCEPAY_DATABASE_URL": db,
            "ONCEPAY_ACQUIRER_URL": f"http://127.0.0.1:{nobody}",  # nothing listens there
            "ONCEPAY_SECONDARY_ACQUIRER_URL": f"http://127.0.0.1:{secondary_port}",
            "ONCEPAY_ACQUIRER_RETRY_CONTROL": "fixed",  # every attempt made
            "ONCEPAY_RUN_WORKER": "false",
        }
        with running(oncepay_args("serve", "--port", str(api_port)), api_port, env):
            paid = httpx.post(
                f"http://127.0.0.1:{api_port}/v1/payments",
                json=PAYMENT,
                headers={"Authorization": f"Bearer {api_key}", "Idempotency-Key": "fo-1"},
                timeout=60,
            )
            assert paid.status_code == 201, paid.text
            assert paid.json()["acquirer"] == "secondary"

            def calls() -> list[dict[str, Any]]:
                return [s for s in received.spans if s["name"] == "acquirer authorize"]

            received.wait_for("both authorize calls", lambda: len(calls()) == 2)
            received.wait_for(
                "the attempts", lambda: len([s for s in received.spans if "attempt" in s["name"]])
            )
    first, second = sorted(calls(), key=lambda s: s["attributes"]["oncepay.acquirer"])
    assert first["attributes"]["oncepay.acquirer"] == "primary"
    assert first["attributes"]["oncepay.acquirer.outcome"] == "unknown"
    assert first["attributes"]["oncepay.acquirer.never_sent"] is True
    assert second["attributes"]["oncepay.acquirer.outcome"] == "approved"
    assert second["attributes"]["oncepay.acquirer.failover_from"] == "primary"
    assert [(t, i, a["oncepay.link"]) for t, i, a in second["links"]] == [
        (first["trace"], first["id"], "failover")
    ]
    assert first["trace"] == second["trace"]
    attempts = sorted(
        (s for s in received.spans if s["parent"] == first["id"]),
        key=lambda s: s["attributes"]["oncepay.acquirer.attempt"],
    )
    numbers = [a["attributes"]["oncepay.acquirer.attempt"] for a in attempts]
    assert numbers == list(range(1, first["attributes"]["oncepay.acquirer.attempts"] + 1))
    assert len(numbers) == 3  # ONCEPAY_ACQUIRER_ATTEMPTS' default
    assert [a["attributes"].get("http.request.resend_count") for a in attempts] == [None, 1, 2]


def test_serving_without_otel_variables_imports_no_tracing_sdk(tmp_path: Path) -> None:
    """The app is built and answers a payment and its replay (the hooks on its path all run)
    with no OTEL_* variable set: nothing of the SDK, exporters or instrumentations is
    imported."""
    script = """
import asyncio, sys
import httpx
from oncepay.payments.api.app import create_app
from oncepay.payments.settings import Settings
from oncepay.payments.merchants import issue_test_key
from oncepay.payments.storage.migrations import migrated

async def main():
    url = "sqlite:///" + sys.argv[1] + "/p.db"
    async with migrated(url) as db:
        _, key = await issue_test_key(db)
    settings = Settings(database_url=url, acquirer_database_url=url + ".acq", run_worker=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": "Bearer " + key, "Idempotency-Key": "k"}
            body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
            for _ in range(2):
                answer = await client.post("/v1/payments", json=body, headers=headers)
                assert answer.status_code == 201, answer.text
    # FastAPI itself imports the API (opentelemetry-api, its dependency since 0.16x); the SDK,
    # exporters, instrumentations and protobuf are what tracing would cost.
    heavy = ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.instrumentation",
             "opentelemetry.proto", "google.protobuf", "grpc", "structlog")
    print(sorted(m for m in sys.modules if m.startswith(heavy)))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=False,
        cwd=ROOT,
        env={**env, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask(
    environ: dict[str, str], expected: bool
) -> None:
    assert tracing.wanted(environ) is expected


@pytest.mark.parametrize(
    ("protocol", "expected"),
    [
        ("http/protobuf", "oncepay.payments.tracing.otlp"),  # the SDK's, our encoder in front
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
        ("http/json", "ConfigurationError"),
    ],
)
def test_the_otlp_protocol_variable_picks_the_exporter(protocol: str, expected: str) -> None:
    script = """
from oncepay.errors import ConfigurationError
from oncepay.payments import tracing
try:
    tracing.setup()
except ConfigurationError as exc:
    print("ConfigurationError", exc)
else:
    processors = tracing._provider._active_span_processor._span_processors
    print(*(type(p.span_exporter).__module__ for p in processors))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "PYTHONPATH": PYTHONPATH,
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split()[0] == expected


def test_an_unsampled_request_starts_one_span_and_hashes_no_key(tmp_path: Path) -> None:
    """At a sampling ratio that keeps nothing, a payment and its replay each cost the server
    span's sampling decision and nothing else: no phase, acquirer or attempt span is started,
    no key is hashed, no traceparent is stored with the response or sent on."""
    script = """
import asyncio, sys
import httpx
from oncepay.payments import tracing
from oncepay.payments.api.app import create_app
from oncepay.payments.settings import Settings
from oncepay.payments.merchants import issue_test_key
from oncepay.payments.storage.migrations import migrated

def refuse(key):
    raise AssertionError("an unsampled request hashed its key")

async def main():
    url = "sqlite:///" + sys.argv[1] + "/p.db"
    async with migrated(url) as db:
        merchant, key = await issue_test_key(db)
    settings = Settings(database_url=url, acquirer_database_url=url + ".acq", run_worker=False)
    app = create_app(settings)
    assert tracing.ENABLED
    started = []
    start = tracing._recorder.start
    tracing._recorder.start = lambda name, *a, **k: started.append(name) or start(name, *a, **k)
    tracing.key_hash = refuse
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            headers = {"Authorization": "Bearer " + key, "Idempotency-Key": "k"}
            body = {"amount": 1000, "currency": "USD", "payment_method": "pm_card_ok"}
            for _ in range(2):
                answer = await client.post("/v1/payments", json=body, headers=headers)
                assert answer.status_code == 201, answer.text
            record = await app.state.services.engine.store.get(merchant.id, "k")
            assert record.response is not None
            assert tracing.TRACE_HEADER not in dict(record.response.headers)
    print(started)

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env |= {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # never reached: nothing sampled
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
        "PYTHONPATH": PYTHONPATH,
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['POST', 'POST']"


def test_the_lean_encoder_writes_the_bytes_the_sdk_encoder_writes() -> None:
    """tracing/otlp.py's encoder against the SDK's, byte for byte, over what spans carry:
    every attribute type, events, links (local and remote), statuses, kinds, trace state,
    two resources and two instrumentation scopes."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import (
        Link,
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        TraceState,
        set_span_in_context,
    )

    from oncepay.payments.tracing.otlp import encode

    finished = InMemorySpanExporter()
    tracers = []
    for name in ("oncepay", "other"):
        provider = TracerProvider(resource=Resource.create({"service.name": name, "n": 3}))
        provider.add_span_processor(SimpleSpanProcessor(finished))
        tracers += [provider.get_tracer("oncepay.payments", "1.0"), provider.get_tracer("x")]
    remote = SpanContext(
        0xABC,
        0xDEF,
        is_remote=True,
        trace_flags=TraceFlags(1),
        trace_state=TraceState([("vendor", "v1")]),
    )
    values: dict[str, Any] = {"s": "x", "ü": "ünï", "i": 3, "neg": -7, "zero": 0, "f": 1.5}
    values |= {"big": 2**62, "t": True, "no": False, "strings": ["a", "b"], "ints": [1, -2]}
    values |= {"empty": ""}
    for n, tracer in enumerate(tracers):
        kind = list(SpanKind)[n % len(SpanKind)]
        with tracer.start_as_current_span("request", kind=kind, attributes=values) as span:
            span.add_event("event", {"k": "v", "n": 1})
            span.add_event("bare")
            span.add_link(remote, {"oncepay.link": "original_execution"})
            with tracer.start_as_current_span("failed", links=[Link(remote)]) as child:
                child.set_status(Status(StatusCode.ERROR, "boom"))
            with tracer.start_as_current_span("ok") as child:
                child.set_status(Status(StatusCode.OK))
        parent = set_span_in_context(NonRecordingSpan(remote))
        with tracer.start_as_current_span("continued", context=parent, kind=SpanKind.CLIENT):
            pass
    spans = finished.get_finished_spans()
    assert len(spans) == 16
    assert encode(spans) == encode_spans(spans).SerializeToString()
    assert encode(spans[:1]) == encode_spans(spans[:1]).SerializeToString()
    assert encode([]) == encode_spans([]).SerializeToString()


def test_oncepay_spans_follow_the_sampler_and_the_sdk_span_rules() -> None:
    """tracing/spans.py's lean spans: the configured sampler decides (a dropped span records
    nothing, its ids still propagate); OK is a final status; an exception leaving a span is
    recorded as the SDK records it; attributes of other types are dropped; the processors get
    the same ReadableSpan fields as from the SDK's tracer, parents included across both."""
    from opentelemetry import context, trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from oncepay.payments.tracing.spans import Recorder

    finished = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    recorder = Recorder(provider, InstrumentationScope("oncepay.payments", "1"))
    server = recorder.start("POST", {"a": 1}, kind=trace.SpanKind.SERVER)
    token = context.attach(trace.set_span_in_context(server))
    with provider.get_tracer("sdk").start_as_current_span("sdk child"):
        pass
    failed = server.get_span_context()
    child = recorder.start("child", {"b": "x"}, links=[trace.Link(failed, {"why": "failover"})])
    child.set_attribute("list", [1, 2])
    child.set_attribute("object", object())  # type: ignore[arg-type]
    child.set_status(trace.StatusCode.OK)
    child.set_status(trace.StatusCode.ERROR, "too late: OK is final")
    child.end()
    with pytest.raises(ValueError, match="boom"), recorder.start("failing"):
        raise ValueError("boom")
    context.detach(token)
    server.end()
    spans = {s.name: s for s in finished.get_finished_spans()}
    assert set(spans) == {"POST", "sdk child", "child", "failing"}
    root = spans["POST"].context
    assert spans["POST"].parent is None
    assert spans["POST"].kind is trace.SpanKind.SERVER
    assert all(spans[n].parent == root for n in ("sdk child", "child", "failing"))
    assert dict(spans["child"].attributes or {}) == {"b": "x", "list": (1, 2)}
    assert spans["child"].status.status_code is trace.StatusCode.OK
    [link] = spans["child"].links
    assert (link.context, dict(link.attributes or {})) == (root, {"why": "failover"})
    assert spans["child"].instrumentation_scope is not None
    assert spans["child"].instrumentation_scope.name == "oncepay.payments"
    [exception] = spans["failing"].events
    assert exception.name == "exception"
    assert (exception.attributes or {})["exception.type"] == "ValueError"
    assert spans["failing"].status.status_code is trace.StatusCode.ERROR

    dropping = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))
    dropped = Recorder(dropping, InstrumentationScope("x")).start("kept nowhere")
    assert not dropped.is_recording()
    assert dropped.get_span_context().is_valid
    assert not dropped.get_span_context().trace_flags.sampled
