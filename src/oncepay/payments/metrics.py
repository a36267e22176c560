"""Prometheus metrics of the payments service, in one registry served at ``/metrics``.

One registry per process, not the global default, so tests can build several apps in one
process without duplicate-metric errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

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
