"""Prometheus metrics of the payments service, in one registry served at ``/metrics``.

One registry per process, not the global default, so tests can build several apps in one
process without duplicate-metric errors.

With several API processes behind one port (``oncepay serve --workers N``) a scrape reaches
whichever process accepts it, so each process's own figures would be a random sample. ``serve``
then gives the processes one ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode: each process writes its values to files there), and :func:`exposition` sums every
process's, those of processes that died included, so counters never go backwards."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "ACQUIRER_CALLS",
    "ACQUIRER_LATENCY",
    "BREAKER_TRANSITIONS",
    "IDEMPOTENCY_DECISIONS",
    "RECOVERY_ESCALATIONS",
    "RECOVERY_RUNS",
    "REGISTRY",
    "REQUESTS",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_LATENCY",
    "exposition",
]

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "oncepay_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
    registry=REGISTRY,
)
IDEMPOTENCY_DECISIONS = Counter(
    "oncepay_idempotency_decisions",
    "Idempotency decisions: execute, resume, replay, in_progress, reused, invalid, unavailable.",
    ["decision"],
    registry=REGISTRY,
)
ACQUIRER_CALLS = Counter(
    "oncepay_acquirer_calls",
    "Calls to acquirers, by acquirer, operation and outcome (approved, declined, unknown, "
    "not_found, error, breaker_open).",
    ["acquirer", "operation", "outcome"],
    registry=REGISTRY,
)
ACQUIRER_LATENCY = Histogram(
    "oncepay_acquirer_call_seconds",
    "Latency of single HTTP calls to acquirers.",
    ["acquirer", "operation"],
    registry=REGISTRY,
)
BREAKER_TRANSITIONS = Counter(
    "oncepay_acquirer_breaker_transitions",
    "Circuit breaker state changes, by acquirer and new state.",
    ["acquirer", "state"],
    registry=REGISTRY,
)
RECOVERY_RUNS = Counter(
    "oncepay_recovery_runs",
    "Recovery attempts on abandoned or unknown-outcome requests, by result.",
    ["result"],
    registry=REGISTRY,
)
RECOVERY_ESCALATIONS = Counter(
    "oncepay_recovery_escalations",
    "Payments whose unknown outcome could not be resolved within the back-off schedule.",
    registry=REGISTRY,
)
WEBHOOK_ATTEMPTS = Counter(
    "oncepay_webhook_attempts",
    "Webhook delivery attempts, by result: succeeded, retry, gone (410), dead.",
    ["result"],
    registry=REGISTRY,
)
WEBHOOK_LATENCY = Histogram(
    "oncepay_webhook_attempt_seconds",
    "Latency of webhook delivery attempts.",
    registry=REGISTRY,
)


def exposition() -> bytes:
    """The text of ``/metrics``: this process's metrics, or in multiprocess mode (see the
    module's docstring) every process's, summed."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)
