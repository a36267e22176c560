"""OncePay's own spans, made without the SDK's per-span machinery.

The SDK's ``Tracer.start_span`` builds a ``_Span`` for every sampled span: its attributes in a
locked, validating ``BoundedAttributes``, events and links in bounded lists, a lock of its own,
tracer metrics; that is most of what tracing costs a payment at 100 % sampling. The few spans
OncePay makes a request carry its own attributes (short strings, integers, booleans), so
:class:`Recorder` does only what matters: the configured sampler's decision (called as the SDK
calls it, so ratios, parent-based rules and custom samplers hold), ids from the provider's
generator, and the provider's span processors told of the start and, at the end, handed a real
``ReadableSpan``: the batch processor and every exporter see what they always see. Spans of
the contrib instrumentations (httpx, SQLAlchemy, redis) still come from the SDK's tracer; the
two kinds nest through the one OpenTelemetry context.

Imported by :func:`oncepay.payments.tracing.setup` only (it imports the SDK).
"""

from __future__ import annotations

import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util import types

__all__ = ["Recorder"]

_SCALARS = (str, bool, int, float)
_UNSET = Status(StatusCode.UNSET)


class Recorder:
    """Starts OncePay's spans for one tracer provider (see the module's docstring)."""

    def __init__(self, provider: TracerProvider, scope: InstrumentationScope) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.processor = provider._active_span_processor  # what its own tracers hand spans to
        self.scope = scope
        self.random_ids = bool(getattr(self.ids, "is_trace_id_random", lambda: False)())

    def start(
        self,
        name: str,
        attributes: dict[str, Any] | None = None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        links: Sequence[Link] = (),
        context: Any = None,
    ) -> trace.Span:
        """A span, a child of the span current in ``context`` (the current context by
        default); recording if the sampler says so, else a non-recording span that only
        carries the ids."""
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is not None and parent.is_valid:
            trace_id, random = parent.trace_id, parent.trace_flags.random_trace_id
        else:
            parent, trace_id, random = None, self.ids.generate_trace_id(), self.random_ids
        result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
        decision = result.decision
        flags = TraceFlags.SAMPLED if decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random:
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id,
            self.ids.generate_span_id(),
            is_remote=False,
            trace_flags=TraceFlags(flags),
            trace_state=result.trace_state,
        )
        if decision is Decision.DROP:
            return NonRecordingSpan(span_context)
        recorded = dict(result.attributes) if result.attributes else {}
        span = LeanSpan(self, name, span_context, parent, kind, recorded, list(links))
        self.processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span


class LeanSpan(trace.Span):
    """A recording span: plain fields while it runs, a ``ReadableSpan`` for the processors
    when it ends. Attribute values other than strings, booleans, numbers and sequences of
    them are dropped, as the SDK drops them (without its warning)."""

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
        links: list[Link],
    ) -> None:
        self.recorder = recorder
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.attributes = attributes
        self.links = links
        self.events: list[Event] = []
        self.status = _UNSET
        self.start_time = time_ns()
        self.end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self.end_time is not None:
            return
        if isinstance(value, _SCALARS):
            self.attributes[key] = value
        elif isinstance(value, Sequence) and all(isinstance(v, _SCALARS) for v in value):
            self.attributes[key] = tuple(value)

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(
        self, name: str, attributes: types.Attributes = None, timestamp: int | None = None
    ) -> None:
        if self.end_time is None:
            self.events.append(Event(name, attributes, timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self.end_time is None and context.is_valid:
            self.links.append(Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: OK is final, UNSET changes nothing."""
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if not isinstance(status, Status):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        """The ``exception`` event of the semantic conventions, as the SDK records it."""
        recorded: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event("exception", recorded, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time or time_ns()
        recorder = self.recorder
        recorder.processor.on_end(
            ReadableSpan(
                name=self.name,
                context=self.context,
                parent=self.parent,
                resource=recorder.resource,
                attributes=self.attributes,
                events=self.events,
                links=self.links,
                kind=self.kind,
                status=self.status,
                start_time=self.start_time,
                end_time=self.end_time,
                instrumentation_scope=recorder.scope,
            )
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()
