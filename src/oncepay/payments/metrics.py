"""Prometheus metrics of the payments service, in one registry served at ``/metrics``.

One registry per process, not the global default, so tests can build several apps in one
process without duplicate-metric errors.

With several API processes behind one port (``oncepay serve --workers N``) a scrape reaches
whichever process accepts it, so each process's own figures would be a random sample. ``serve``
then gives the processes one ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess
mode: each process writes its values to files there), and :func:`exposition` sums every
process's, those of processes that died included, so counters never go backwards."""

from __future__ import annotations

import functools
import os
import weakref
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = [
    "ACQUIRER_ATTEMPTS",
    "ACQUIRER_CALLS",
    "ACQUIRER_LATENCY",
    "ACQUIRER_RETRIES",
    "ACQUIRER_THROTTLED",
    "ACQUIRER_THROTTLE_PROBABILITY",
    "ADAPTIVE_TTL_KEY_SECONDS",
    "BREAKER_TRANSITIONS",
    "IDEMPOTENCY_DECISIONS",
    "IDEMPOTENCY_LATE_RETRIES",
    "IDEMPOTENCY_ROUTE_DECISIONS",
    "INSIGHT_FINDINGS",
    "INSIGHT_RECORDS",
    "KEY_SECONDS",
    "RECONCILIATION_ACTIONS",
    "RECONCILIATION_DISCREPANCIES",
    "RECONCILIATION_LINES",
    "RECONCILIATION_OPEN",
    "RECONCILIATION_RUNS",
    "RECOVERY_ESCALATIONS",
    "RECOVERY_RUNS",
    "REGISTRY",
    "REQUESTS",
    "USAGE_LOG_FAILED_WRITES",
    "USAGE_LOG_RECORDS",
    "WEBHOOK_ATTEMPTS",
    "WEBHOOK_LATENCY",
    "exposition",
    "labelled",
    "sync_usage_logs",
    "watch_usage_log",
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
# Summed per record stored under a learned TTL: "learned" what it is kept, "fixed" what key_ttl
# would have kept it; their ratio is the storage the learned TTLs save (docs/insight.md).
ADAPTIVE_TTL_KEY_SECONDS = Counter(
    "oncepay_adaptive_ttl_key_seconds",
    "Key-seconds of the records stored under learned TTLs (ttl=learned), and what the fixed "
    "TTL would have kept them (ttl=fixed).",
    ["ttl"],
    registry=REGISTRY,
)
IDEMPOTENCY_ROUTE_DECISIONS = Counter(
    "oncepay_idempotency_route_decisions",
    "Idempotency decisions by SPEC §9 name (executed, replayed, in_progress, reused, invalid, "
    "unavailable, rejected) and route template.",
    ["decision", "route"],
    registry=REGISTRY,
)
# SPEC §9's late retries as the store sees them: a key whose record had expired but was not
# yet purged (after a purge the key is simply new; the insight analyzer's retry_after_expiry
# finding remembers keys longer). Each is also an "executed" decision above.
IDEMPOTENCY_LATE_RETRIES = Counter(
    "oncepay_idempotency_late_retries",
    "Keys that came back after their idempotency record expired, and executed afresh, by "
    "route template.",
    ["route"],
    registry=REGISTRY,
)
KEY_SECONDS = Counter(
    "oncepay_idempotency_key_seconds",
    "Key-seconds stored: each stored response's time to live under its key, summed (what a "
    "shorter TTL would save).",
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
ACQUIRER_ATTEMPTS = Counter(
    "oncepay_acquirer_attempts",
    "HTTP attempts sent to acquirers, by acquirer and kind (first, retry).",
    ["acquirer", "kind"],
    registry=REGISTRY,
)
ACQUIRER_RETRIES = Counter(
    "oncepay_acquirer_retries",
    "Retry decisions, by acquirer and decision: made, budget_denied, throttled, degraded.",
    ["acquirer", "decision"],
    registry=REGISTRY,
)
ACQUIRER_THROTTLED = Counter(
    "oncepay_acquirer_throttled",
    "Attempts rejected locally by adaptive throttling (never sent), by acquirer.",
    ["acquirer"],
    registry=REGISTRY,
)
ACQUIRER_THROTTLE_PROBABILITY = Gauge(
    "oncepay_acquirer_throttle_probability",
    "Chance that the next attempt to an acquirer is rejected locally.",
    ["acquirer"],
    registry=REGISTRY,
    multiprocess_mode="max",
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

# Reconciliation (SPEC §10; docs/reconciliation.md "Metrics"), counted around every run.
RECONCILIATION_RUNS = Counter(
    "oncepay_reconciliation_runs",
    "Reconciliation runs, by acquirer and outcome: clean, discrepancies, unchanged (a re-run "
    "that found what the day's last run found), failed.",
    ["acquirer", "outcome"],
    registry=REGISTRY,
)
RECONCILIATION_LINES = Counter(
    "oncepay_reconciliation_report_lines",
    "Settlement report lines reconciled, by acquirer.",
    ["acquirer"],
    registry=REGISTRY,
)
RECONCILIATION_DISCREPANCIES = Counter(
    "oncepay_reconciliation_discrepancies_opened",
    "Discrepancies opened (found for the first time), by acquirer and kind.",
    ["acquirer", "kind"],
    registry=REGISTRY,
)
RECONCILIATION_OPEN = Gauge(
    "oncepay_reconciliation_discrepancies_open",
    "Discrepancies open now, by acquirer and kind (as of the last run or close here).",
    ["acquirer", "kind"],
    registry=REGISTRY,
    multiprocess_mode="mostrecent",
)
RECONCILIATION_ACTIONS = Counter(
    "oncepay_reconciliation_actions",
    "Remediation actions (voids of orphaned authorizations), by acquirer and result: taken, "
    "failed, withheld (over the per-run cap: none taken, one alert).",
    ["acquirer", "result"],
    registry=REGISTRY,
)


INSIGHT_FINDINGS = Counter(
    "oncepay_insight_findings_opened",
    "Insight findings opened by the worker's live detectors (docs/insight.md), by kind.",
    ["kind"],
    registry=REGISTRY,
)
INSIGHT_RECORDS = Counter(
    "oncepay_insight_records_analyzed",
    "Key-usage log records the worker's live detectors read and analysed.",
    registry=REGISTRY,
)
# The key-usage log's own counts (its attributes), copied here by sync_usage_logs(): the log
# knows nothing of this registry. (Its dropped and write-error counters in prometheus-client's
# default registry are other metrics, under other names.)
USAGE_LOG_RECORDS = Counter(
    "oncepay_usage_log_records",
    "Key-usage log records, by outcome: written, dropped (a full buffer or a failed write).",
    ["outcome"],
    registry=REGISTRY,
)
USAGE_LOG_FAILED_WRITES = Counter(
    "oncepay_usage_log_failed_writes",
    "Key-usage log batches lost to a failed write (a full or vanished disk).",
    registry=REGISTRY,
)


class _Counts(Protocol):
    written: int
    dropped: int
    write_errors: int


_usage_logs: list[tuple[weakref.ref[_Counts], list[int]]] = []


def watch_usage_log(log: _Counts) -> None:
    """Count ``log``'s records here from now on (see :func:`sync_usage_logs`)."""
    _usage_logs.append((weakref.ref(log), [log.written, log.dropped, log.write_errors]))


def sync_usage_logs() -> None:
    """What the watched logs counted since the last call, added to the counters (at every
    scrape and every step of the worker's insight job)."""
    for ref, seen in list(_usage_logs):
        log = ref()
        if log is None:
            _usage_logs.remove((ref, seen))
            continue
        now = [log.written, log.dropped, log.write_errors]
        written, dropped, errors = (a - b for a, b in zip(now, seen, strict=True))
        if written:
            USAGE_LOG_RECORDS.labels("written").inc(written)
        if dropped:
            USAGE_LOG_RECORDS.labels("dropped").inc(dropped)
        if errors:
            USAGE_LOG_FAILED_WRITES.inc(errors)
        seen[:] = now


def exposition() -> bytes:
    """The text of ``/metrics``: this process's metrics, or in multiprocess mode (see the
    module's docstring) every process's, summed."""
    sync_usage_logs()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


@functools.lru_cache(maxsize=4096)
def _child(metric: Any, values: tuple[str, ...]) -> Any:
    return metric.labels(*values)


def labelled(metric: _Metric, *values: str) -> _Metric:
    """``metric.labels(*values)``, the child kept: prometheus-client checks the labels and
    takes a lock on every call (~2 µs; a payment makes about ten). Every label here takes its
    values from a small fixed set (routes, statuses, acquirers, outcomes), so the cache stays
    small; children live as long as their metric, which is the process's."""
    child: _Metric = _child(metric, values)
    return child
