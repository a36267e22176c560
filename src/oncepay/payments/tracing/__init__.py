"""OpenTelemetry tracing of the payments service (SPEC §11; docs/observability.md).

**Off unless asked for, and then free.** Tracing starts only when the standard variables ask
for an exporter: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), or
``OTEL_TRACES_EXPORTER`` set to something other than ``none``; ``OTEL_SDK_DISABLED=true`` wins
over both. Until :func:`setup` has run, nothing of OpenTelemetry is imported, and every hook
below is one global test that returns a shared no-op.

**Configured by the standard variables only.** The SDK reads them itself: the sampler
(``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``; parent-based always-on by default), the
exporter's endpoint, headers, timeout and compression, the protocol
(``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` or ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``,
the default, or ``grpc``), the resource (``OTEL_SERVICE_NAME``, default ``oncepay``;
``OTEL_RESOURCE_ATTRIBUTES``) and the propagators (``OTEL_PROPAGATORS``). The server span is
:class:`ServerSpans`, a thin ASGI middleware of ours; contrib instrumentations trace httpx,
SQLAlchemy and redis-py; ``OTEL_PYTHON_DISABLED_INSTRUMENTATIONS`` leaves any of
``asgi, httpx, sqlalchemy, redis`` out. OncePay's own spans are made by :mod:`.spans` (the
sampler's decision and the span processors as the SDK's tracer would, without its per-span
machinery); OTLP/HTTP spans are encoded by :mod:`.otlp`.

**An unsampled request costs its sampling decision and no more**: every hook below returns at
once inside it (:data:`_quiet`), so it starts no span, builds no attribute, hashes no key and
stores or sends no traceparent.

**OncePay's own spans and attributes** (the names are a contract: docs/observability.md):

* the request span gets ``oncepay.idempotency.decision`` (SPEC §9's names), the key as a keyed
  hash (``oncepay.idempotency.key_hash``, never the raw key) and the fencing token;
* ``oncepay.phase <name>`` spans for the atomic phases; ``acquirer <operation>`` per logical
  acquirer call and ``acquirer <operation> attempt`` per HTTP attempt (the breaker's state and
  moves as span events; a failover links to the failed acquirer's call);
* ledger postings and outbox events as span events;
* a stored response keeps its execution's ``traceparent`` in the header :data:`TRACE_HEADER`,
  stripped before any answer is sent: a replay's request span links to the execution's;
* every event row keeps the ``traceparent`` of the transaction that wrote it, so each webhook
  delivery attempt (``webhook delivery``) continues the payment's trace.
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from oncepay import _logformat
from oncepay.errors import ConfigurationError
from oncepay.storage import raw

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer

    from oncepay.idempotency.records import StoredResponse
    from oncepay.payments.reply import Reply
    from oncepay.storage.db import Database

__all__ = [
    "ENABLED",
    "TRACE_HEADER",
    "decided",
    "delivered",
    "delivery",
    "inject",
    "ledger_posting",
    "named",
    "outbox_event",
    "phase",
    "replayed",
    "setup",
    "shutdown",
    "stored",
    "traced_attempt",
    "traced_call",
    "traceparent",
    "wanted",
]

# True once setup() has run in this process. Read it as ``tracing.ENABLED`` (a module global).
ENABLED = False
# A stored response's header holding the traceparent of the request span that executed it;
# never sent to a client (``replayed`` strips it, ``stored`` adds it only to what is stored).
TRACE_HEADER = "oncepay-trace-origin"
SERVICE_NAME = "oncepay"
INSTRUMENTATIONS = ("asgi", "httpx", "sqlalchemy", "redis")

_tracer: Tracer | None = None
_provider: TracerProvider | None = None
# opentelemetry.trace and opentelemetry.context once set up: looked up per hook, not imported.
_trace: Any = None
_context: Any = None
_recorder: Any = None  # starts OncePay's own spans: spans.Recorder (or the SDK's tracer)
_key_hasher: Any = None  # hashlib.blake2b, keyed
_NOOP: AbstractContextManager[None] = nullcontext()
# True inside a request whose trace was not sampled: every hook returns at once (its spans
# would record nothing; parent-based sampling, the default, decides children by their parent).
_quiet: ContextVar[bool] = ContextVar("oncepay_trace_quiet", default=False)
# The executing request span's traceparent, for the response stored under its key.
_origin: ContextVar[str | None] = ContextVar("oncepay_trace_origin", default=None)
# The last acquirer call of this task: (acquirer, reference, its span context, attempts made).
_last_call: ContextVar[_Call | None] = ContextVar("oncepay_acquirer_call", default=None)

P = ParamSpec("P")
T = TypeVar("T")


# -- turning it on --------------------------------------------------------------------------------


def wanted(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the ``OTEL_*`` variables ask for traces (see the module's docstring)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def disabled_instrumentations() -> set[str]:
    names = os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "")
    return {name.strip().lower() for name in names.split(",") if name.strip()}


def setup(*, key_secret: bytes | None = None) -> bool:
    """Start tracing in this process if the environment asks for it (once); whether it is on.
    ``key_secret`` keys the hash of idempotency keys; by default ``ONCEPAY_USAGE_LOG_SECRET``
    (the key-usage log's, so that both agree), else a random secret of this process."""
    global ENABLED, _tracer, _provider, _key_hasher, _trace, _context, _recorder  # noqa: PLW0603
    if ENABLED:
        return True
    if not wanted():
        return False
    from opentelemetry import context, trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from oncepay import __version__

    attributes: dict[str, str] = {}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = SERVICE_NAME
    attributes["service.version"] = __version__
    provider = TracerProvider(resource=Resource.create(attributes))  # the sampler: OTEL_*
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _instrument_clients(provider)
    _provider = provider
    _tracer = provider.get_tracer("oncepay.payments", __version__)
    _trace, _context = trace, context
    _recorder = _own_spans(provider, _tracer, __version__)
    secret = key_secret or os.environ.get("ONCEPAY_USAGE_LOG_SECRET", "").encode()
    secret = hashlib.blake2b(secret).digest() if len(secret) > 64 else secret  # BLAKE2b's limit
    _key_hasher = hashlib.blake2b(key=secret or secrets.token_bytes(32), digest_size=16)
    _logformat.trace_ids_from(ids)  # log lines carry the ids of the span in progress
    ENABLED = True
    return True


def _own_spans(provider: TracerProvider, tracer: Tracer, version: str) -> Any:
    """What starts OncePay's spans: the lean recorder (spans.py), or the SDK's tracer should
    the provider not be what the recorder knows."""
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    from oncepay.payments.tracing.spans import Recorder

    if not hasattr(provider, "_active_span_processor"):
        return _Sdk(tracer)
    return Recorder(provider, InstrumentationScope("oncepay.payments", version))


class _Sdk:
    """The SDK's tracer behind :class:`spans.Recorder`'s ``start``."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def start(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        *,
        kind: Any = None,
        links: Sequence[Any] = (),
        context: Any = None,
    ) -> Span:
        kind = _trace.SpanKind.INTERNAL if kind is None else kind
        return self.tracer.start_span(
            name, context=context, kind=kind, attributes=attributes, links=links
        )


def shutdown() -> None:
    """Export what is buffered (the app's shutdown); statements are no longer traced."""
    raw.trace_statements(None)
    if _provider is not None:
        _provider.shutdown()


def _exporters() -> list[Any]:
    exporters = []
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    for name in (n.strip() for n in names.split(",")):
        if name == "otlp":
            exporters.append(_otlp_exporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name not in ("", "none"):
            raise ConfigurationError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not one of otlp, console, none"
            )
    return exporters


def _otlp_exporter() -> Any:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from oncepay.payments.tracing import otlp

        return otlp.exporter()  # the SDK's, with a leaner encoder
    raise ConfigurationError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (http/protobuf or grpc)"
    )


def _instrument_clients(provider: TracerProvider) -> None:
    off = disabled_instrumentations()
    if "httpx" not in off:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument(tracer_provider=provider)
    if "redis" not in off:
        try:
            from opentelemetry.instrumentation.redis import RedisInstrumentor
        except ImportError:  # redis-py not installed: nothing to trace
            return
        RedisInstrumentor().instrument(tracer_provider=provider)


def instrument_database(db: Database) -> None:
    """A span per statement of this database (after :func:`setup`): SQLAlchemy's
    instrumentation for the statements that go through SQLAlchemy, and the same for the hot
    path's raw statements (``oncepay.storage.raw``), which do not."""
    if _provider is None or "sqlalchemy" in disabled_instrumentations():
        return
    raw.trace_statements(_statement_span)
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    instrumentor = SQLAlchemyInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # Its declared range ends below SQLAlchemy 2.1, which it traces well (its hooks are
        # the engine's events): the check would leave the database out.
        instrumentor.instrument(
            engine=db.engine.sync_engine, tracer_provider=_provider, skip_dep_check=True
        )


def _statement_span(system: str, statement: str) -> AbstractContextManager[Any]:
    """A raw statement's span, named and described as SQLAlchemy's instrumentation does."""
    if _tracer is None or _quiet.get():
        return _NOOP
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL"
    return _tracer.start_as_current_span(
        verb,
        kind=_trace.SpanKind.CLIENT,
        attributes={"db.system": system, "db.statement": statement},
    )


def asgi_middleware() -> tuple[Any, dict[str, Any]] | None:
    """The ASGI server span's middleware and its options, for ``app.add_middleware``; None
    when tracing is off or the ASGI instrumentation is disabled."""
    if _provider is None or "asgi" in disabled_instrumentations():
        return None
    return ServerSpans, {}


class ServerSpans:
    """One SERVER span a request, in the trace of the caller's ``traceparent`` if it sent one.

    Not the contrib ``OpenTelemetryMiddleware``: that one costs about 120 µs a request (a span
    per message received and sent, attributes collected whether sampled or not, its own
    metrics). Here an unsampled request costs the sampling decision and one context switch;
    a sampled one gets the HTTP attributes (method, path, scheme, protocol, client address,
    status code) and is named by its route later (:func:`named`, :func:`decided`).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _recorder is None:
            await self.app(scope, receive, send)
            return
        trace = _trace
        parent = _remote_parent(scope["headers"])
        span = _recorder.start(
            scope.get("method") or "HTTP", context=parent, kind=trace.SpanKind.SERVER
        )
        token = _context.attach(trace.set_span_in_context(span, parent))
        quiet = None
        try:
            if not span.is_recording():
                quiet = _quiet.set(True)  # the hooks below do nothing for this request
                await self.app(scope, receive, send)
                return
            span.set_attributes(_server_attributes(scope))

            async def sent(message: Any) -> None:
                if message["type"] == "http.response.start":
                    status = message["status"]
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            try:
                await self.app(scope, receive, sent)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
                raise
        finally:
            if quiet is not None:
                _quiet.reset(quiet)
            _context.detach(token)
            span.end()


def _remote_parent(headers: Sequence[tuple[bytes, bytes]]) -> Any:
    """The caller's context, when it sent a ``traceparent`` (read by the configured
    propagators); None otherwise (the common case: no extraction at all)."""
    for name, _ in headers:
        if name == b"traceparent":
            from opentelemetry.propagate import extract

            carrier: dict[str, str] = {}
            for key, value in headers:
                carrier[key.decode("latin-1")] = value.decode("latin-1")
            return extract(carrier)
    return None


def _server_attributes(scope: Any) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": scope.get("method") or "_OTHER",
        "url.path": scope.get("path") or "/",
        "url.scheme": scope.get("scheme") or "http",
        "network.protocol.version": scope.get("http_version") or "1.1",
    }
    client = scope.get("client")
    if client:
        attributes["client.address"] = str(client[0])
    return attributes


# -- the request span -----------------------------------------------------------------------------


def named(scope: MutableMapping[str, Any]) -> None:
    """As a request ends, inside its server span: name the span by the route it matched
    (``GET /v1/payments/{id}``), the OpenTelemetry convention."""
    if _trace is None or _quiet.get():
        return
    route = getattr(scope.get("route"), "path_format", None)
    if not route:
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.update_name(f"{scope.get('method', 'HTTP')} {route}")
        span.set_attribute("http.route", route)


def key_hash(key: str) -> str:
    """The idempotency key as a keyed BLAKE2b hash (hex), as the key-usage log writes it."""
    hasher = _key_hasher.copy()
    hasher.update(key.encode())
    return str(hasher.hexdigest())


def decided(
    decision: str,
    *,
    method: str,
    route: str | None,
    key: str | None,
    fence: int | None = None,
    resumed: bool = False,
) -> None:
    """The idempotency decision, on the request span (which the route names, if known). The
    executed request's span is remembered for the response stored under its key. Nothing at
    all (no key hashed) for a request that is not sampled."""
    if _trace is None or _quiet.get():
        return
    span = _trace.get_current_span()
    if not span.is_recording():
        return
    attributes: dict[str, Any] = {"oncepay.idempotency.decision": decision}
    if route:
        span.update_name(f"{method} {route}")
        attributes["http.route"] = route
    if key:
        if len(key) >= 2 and key[0] == key[-1] == '"':  # an RFC 8941 sf-string, as parsed
            key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        attributes["oncepay.idempotency.key_hash"] = key_hash(key)
    if fence is not None:
        attributes["oncepay.idempotency.fence"] = fence
    if resumed:
        attributes["oncepay.idempotency.resumed"] = True
    span.set_attributes(attributes)
    if decision == "executed":
        _origin.set(_format(span.get_span_context()))


def replayed(headers: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """A stored response's headers as sent: without :data:`TRACE_HEADER`, whose execution span
    the request span links to (when this request is traced)."""
    kept, origin = [], None
    for name, value in headers:
        if name == TRACE_HEADER:
            origin = value
        else:
            kept.append((name, value))
    if origin is not None and _trace is not None and not _quiet.get():
        context = _parse(origin)
        span = _trace.get_current_span()
        if context is not None and span.is_recording():
            span.add_link(context, {"oncepay.link": "original_execution"})
            span.set_attribute("oncepay.idempotency.original_trace_id", origin.split("-")[1])
    return tuple(kept)


def stored(reply: Reply) -> StoredResponse:
    """What is stored under the key: the reply, with its execution's traceparent if traced."""
    response = reply.stored()
    origin = _origin.get() if _trace is not None else None
    if origin is None:
        return response
    return replace_headers(response, (*response.headers, (TRACE_HEADER, origin)))


def replace_headers(
    response: StoredResponse, headers: tuple[tuple[str, str], ...]
) -> StoredResponse:
    from dataclasses import replace

    return replace(response, headers=headers)


class _Active:
    """A span made current for a block, then ended: what ``start_as_current_span`` does,
    without its two generator-based context managers."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.token: object = None

    def __enter__(self) -> Span:
        self.token = _context.attach(_trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: object, error: BaseException | None, tb: object) -> None:
        _context.detach(self.token)
        span = self.span
        if error is not None and span.is_recording():
            span.record_exception(error)
            span.set_status(_error(type(error).__name__))
        span.end()


def _error(description: str) -> Any:
    from opentelemetry.trace import Status, StatusCode

    return Status(StatusCode.ERROR, description)


# -- phases, ledger, outbox -----------------------------------------------------------------------


def phase(name: str, operation: str, object_id: str | None = None) -> AbstractContextManager[Any]:
    """A span over one atomic phase (``start``, ``acquirer``, ``record``, ``finish``…)."""
    if _recorder is None or _quiet.get():
        return _NOOP
    attributes = {"oncepay.phase": name, "oncepay.operation": operation}
    if object_id is not None:
        attributes["oncepay.object_id"] = object_id
    return _Active(_recorder.start(f"oncepay.phase {name}", attributes))


def ledger_posting(
    transaction_id: str, *, kind: str, payment_id: str, currency: str, entries: int
) -> None:
    if _trace is None or _quiet.get():
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "oncepay.ledger.posting",
            {
                "oncepay.ledger.transaction_id": transaction_id,
                "oncepay.ledger.kind": kind,
                "oncepay.payment_id": payment_id,
                "oncepay.ledger.currency": currency,
                "oncepay.ledger.entries": entries,
            },
        )


def outbox_event(event_id: str, *, type: str, object_id: str, deliveries: int) -> None:
    if _trace is None or _quiet.get():
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "oncepay.outbox.event",
            {
                "oncepay.event.id": event_id,
                "oncepay.event.type": type,
                "oncepay.object_id": object_id,
                "oncepay.webhook.deliveries": deliveries,
            },
        )


def traceparent() -> str | None:
    """The current span's W3C traceparent (stored with an outbox event); None when off, or
    when this request is not sampled (its deliveries then decide for themselves)."""
    if _trace is None or _quiet.get():
        return None
    context = _trace.get_current_span().get_span_context()
    return _format(context) if context.is_valid else None


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and the other configured propagators' headers) to ``headers``;
    nothing for a request that is not sampled."""
    if _trace is None or _quiet.get():
        return
    from opentelemetry.propagate import inject as propagate

    propagate(headers)


# -- acquirers ------------------------------------------------------------------------------------


class _Call:
    """One logical acquirer call in progress: its span, and its attempts so far."""

    __slots__ = ("acquirer", "attempts", "context", "reference")

    def __init__(self, acquirer: str, reference: str, context: SpanContext) -> None:
        self.acquirer, self.reference, self.context = acquirer, reference, context
        self.attempts = 0


def traced_call(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``HttpAcquirer._call(self, operation, path, payload, reference)`` in an ``acquirer
    <operation>`` span carrying the answer; a call to another acquirer for the same payment
    after a failed one links to it (failover). Untraced (tracing off, or a request not
    sampled), the wrapper is a plain function handing back the call's own coroutine: no
    coroutine of its own to create, await and finish on every acquirer call."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        if _recorder is None or _quiet.get():
            return fn(*args, **kwargs)  # the call's own coroutine: no frame of ours around it
        return traced(*args, **kwargs)

    async def traced(*args: P.args, **kwargs: P.kwargs) -> T:
        acquirer, operation, reference = args[0], str(args[1]), str(args[4])
        name = str(getattr(acquirer, "name", "?"))
        links, previous = [], _last_call.get()
        attributes = {
            "oncepay.acquirer": name,
            "oncepay.acquirer.operation": operation,
            "oncepay.acquirer.reference": reference,
        }
        if (
            previous is not None
            and previous.acquirer != name
            and _same_payment(previous, reference)
        ):
            from opentelemetry.trace import Link

            links.append(Link(previous.context, {"oncepay.link": "failover"}))
            attributes["oncepay.acquirer.failover_from"] = previous.acquirer
        with _Active(_recorder.start(f"acquirer {operation}", attributes, links=links)) as span:
            current = _Call(name, reference, span.get_span_context())
            token = _last_call.set(current)
            try:
                answer = await fn(*args, **kwargs)
            finally:
                _last_call.reset(token)
                _last_call.set(current)  # seen by the next call of this task (failover)
            if span.is_recording():
                span.set_attributes(_answer(answer, current.attempts))
            return answer

    return call


def _answer(answer: object, attempts: int) -> dict[str, Any]:
    attributes: dict[str, Any] = {"oncepay.acquirer.attempts": attempts}
    for field in ("outcome", "decline_code", "never_sent", "detail"):
        value = getattr(answer, field, None)
        if value is not None:
            attributes[f"oncepay.acquirer.{field}"] = getattr(value, "value", value)
    return attributes


def _same_payment(previous: _Call, reference: str) -> bool:
    return previous.reference.rpartition("_a")[0] == reference.rpartition("_a")[0] != ""


def traced_attempt(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """``HttpAcquirer._attempt(self, operation, ...)`` in an ``acquirer <operation> attempt``
    span: the attempt's number, ``http.request.resend_count`` on a retry, and the breaker's
    state as an event."""

    @functools.wraps(fn)
    def attempt(*args: P.args, **kwargs: P.kwargs) -> Awaitable[T]:
        if _recorder is None or _quiet.get():
            return fn(*args, **kwargs)  # the attempt's own coroutine: no frame of ours around it
        return traced(*args, **kwargs)

    async def traced(*args: P.args, **kwargs: P.kwargs) -> T:
        acquirer, operation = args[0], str(args[1])
        call = _last_call.get()
        number = 1
        if call is not None:
            call.attempts += 1
            number = call.attempts
        attributes: dict[str, Any] = {
            "oncepay.acquirer": str(getattr(acquirer, "name", "?")),
            "oncepay.acquirer.operation": operation,
            "oncepay.acquirer.attempt": number,
        }
        if number > 1:
            attributes["http.request.resend_count"] = number - 1
        breaker = getattr(acquirer, "breaker", None)
        span = _recorder.start(
            f"acquirer {operation} attempt", attributes, kind=_trace.SpanKind.CLIENT
        )
        with _Active(span):
            if breaker is not None and span.is_recording():
                span.add_event("oncepay.breaker", {"oncepay.breaker.state": str(breaker.state)})
            return await fn(*args, **kwargs)

    return attempt


def breaker_moved(acquirer: str, state: str) -> None:
    """A circuit breaker changed state: an event on the span in progress (an attempt's)."""
    if _trace is None or _quiet.get():
        return
    span = _trace.get_current_span()
    if span.is_recording():
        span.add_event(
            "oncepay.breaker.transition",
            {"oncepay.acquirer": acquirer, "oncepay.breaker.state": state},
        )


# -- webhook deliveries ---------------------------------------------------------------------------


@contextmanager
def delivery(
    origin: str | None, *, delivery_id: str, event_id: str, endpoint_id: str, attempt: int
) -> Iterator[Span | None]:
    """A span over one webhook delivery attempt, in the trace of the event's transaction
    (``origin``, its stored traceparent) when there is one."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    parent = extract({"traceparent": origin}) if origin else None
    attributes: dict[str, str | int] = {
        "oncepay.webhook.delivery_id": delivery_id,
        "oncepay.event.id": event_id,
        "oncepay.webhook.endpoint_id": endpoint_id,
        "oncepay.webhook.attempt": attempt,
    }
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    with _tracer.start_as_current_span(
        "webhook delivery", context=parent, kind=SpanKind.CLIENT, attributes=attributes
    ) as span:
        yield span


def delivered(span: Span | None, code: int | None, error: str | None) -> None:
    """A delivery attempt's result on its span: the status code, or the error."""
    if span is None:
        return
    if code is not None:
        span.set_attribute("http.response.status_code", code)
    if error is not None or code is None or not 200 <= code < 300:
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, error or f"answered {code}"))


# -- traceparent ----------------------------------------------------------------------------------


def _format(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _parse(value: str) -> SpanContext | None:
    from opentelemetry.trace import SpanContext, TraceFlags

    parts = value.split("-")
    if len(parts) != 4:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return context if context.is_valid else None


def ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the span in progress, for log lines; None when off."""
    if _trace is None:
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
