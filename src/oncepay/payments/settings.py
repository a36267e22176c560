"""Every setting of the payments service, each also an environment variable ``ONCEPAY_<NAME>``
(SPEC §7); command-line options override them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ONCEPAY_", extra="ignore")

    database_url: str = "sqlite:///oncepay.db"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    workers: int = Field(default=1, ge=1, description="API processes (PostgreSQL for > 1).")
    # No acquirer URL: the simulated acquirer runs inside the API process, on its own database.
    acquirer_url: str | None = None
    secondary_acquirer_url: str | None = None
    acquirer_database_url: str = "sqlite:///oncepay-acquirer.db"
    # One acquirer call: a card authorization takes well under a second; five leaves room for
    # a slow network without holding a client's request past its own usual 10-30 s timeout.
    acquirer_timeout: float = Field(default=5.0, gt=0)
    # Attempts per acquirer call (same reference, so harmless): three ride out a blip.
    acquirer_attempts: int = Field(default=3, ge=1)
    # Retry control (docs/acquirer.md, "Retry control"): "adaptive" retries within a budget,
    # throttles itself from the acquirer's success rate and stretches backoff with its latency;
    # "fixed" makes every attempt, for comparisons. Envoy's budget: retries at most 20 % of
    # the calls in progress, never fewer than 3 at once.
    acquirer_retry_control: Literal["adaptive", "fixed"] = "adaptive"
    acquirer_retry_budget_percent: float = Field(default=0.2, ge=0, le=1)
    acquirer_retry_budget_minimum: int = Field(default=3, ge=0)
    # The SRE book's adaptive throttling: K = 2 lets an acquirer fail half of what it is sent
    # before anything is held back; two minutes of memory; 20 attempts before it judges.
    acquirer_throttle_k: float = Field(default=2.0, ge=1)
    acquirer_throttle_window: float = Field(default=120.0, gt=0)
    acquirer_throttle_minimum: int = Field(default=20, ge=0)
    # Backoff between attempts: full jitter over base * 2^n (the base stretched to the recent
    # p50 latency when that is longer), capped: the caller's own request is waiting.
    acquirer_backoff_base: float = Field(default=0.05, gt=0)
    acquirer_backoff_cap: float = Field(default=1.0, gt=0)
    redis_url: str | None = None
    # Rate limits (docs/payments-api.md, "Rate limits"), e.g. "100/second" (Stripe's live-mode
    # rate per account), counted in Redis when redis_url is set, else per process. Off by
    # default: the right rate is the deployment's to choose, and a default one would throttle
    # the benchmarks and load tests that drive one key as fast as it goes.
    rate_limit_per_key: str | None = None
    rate_limit_per_merchant: str | None = None
    # Append every idempotency decision to this key-usage log (SPEC §9; docs/insight.md).
    usage_log: str | None = None
    # Stripe keeps keys a day (docs/payments-api.md): long enough for any client retry.
    key_ttl: float = Field(default=24 * 3600.0, gt=0)
    # Learned TTLs (SPEC §9; docs/insight.md "Applying learned TTLs"): off, every key is kept
    # key_ttl. On, each merchant's keys on each route are kept as long as its clients retry
    # (from adaptive_ttl_file, `oncepay insight analyze --json`, and/or the worker's live
    # analysis), held to [adaptive_ttl_min, adaptive_ttl_max]; key_ttl where nothing is learned.
    adaptive_ttl: bool = False
    adaptive_ttl_file: str | None = None
    # Five minutes: far above the lease (a record must outlive its request), far below a day.
    adaptive_ttl_min: float = Field(default=300.0, gt=0)
    # A week: terminals retrying after a weekend stay covered; no longer than unfinished work.
    adaptive_ttl_max: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Outlasts the slowest honest request (two acquirers x attempts x timeout, plus look-ups),
    # so a live request is never taken over; a crashed one is resumed a minute later.
    lease: float = Field(default=60.0, gt=0)
    # Seconds between the tries of recovery to learn an unknown outcome; past the last, the
    # payment is escalated (an event and a metric) and asked again at that interval.
    recovery_backoff: list[float] = Field(
        default_factory=lambda: [2.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0], min_length=1
    )
    # A request still unfinished (its acquirer outcome unknown, or its process gone) keeps its
    # key at least this long, past key_ttl: a retry must resume it, never start it anew. A
    # week outlasts any acquirer incident and any worker outage worth surviving.
    unfinished_retention: float = Field(default=7 * 24 * 3600.0, gt=0)
    # `oncepay serve` runs the recovery worker inside each API process too, so that a single
    # command gives a complete service; `oncepay worker` runs it alone.
    run_worker: bool = True
    # Seconds before each retry of a failed webhook delivery: quick retries for a blip, then
    # hours, adding up to about three days (71.6 h over 11 attempts) as Stripe does; after the
    # last the delivery is dead (dead-lettered).
    webhook_schedule: list[float] = Field(
        default_factory=lambda: [
            5.0,
            300.0,
            1800.0,
            7200.0,
            18000.0,
            36000.0,
            36000.0,
            50400.0,
            72000.0,
            36000.0,
        ],
        min_length=1,
    )
    # At most this many deliveries to one endpoint in flight at once, whichever workers send
    # them (a worker sends 10 at a time): a slow or hanging endpoint holds no more than that
    # of a worker's slots, and a busy healthy one still gets them in parallel.
    webhook_endpoint_concurrency: int = Field(default=5, ge=1)
    # Webhooks go to public addresses only: a merchant's URL is fetched from inside our
    # network, and one naming 127.0.0.1, 10.x or 169.254.169.254 (cloud metadata) would make
    # the worker a proxy onto internal services (SSRF). True for development and tests only.
    webhook_allow_private: bool = False
    # The operator token (SPEC §11): a bearer token for the operator API (/v1/admin/...) and
    # the dashboard. Unset, both are off (404): there is no default operator.
    admin_token: str | None = Field(default=None, min_length=16)
    # The dashboard links a payment's trace id to this address + the id (e.g. Jaeger's
    # "http://jaeger:16686/trace/"); unset, the id is shown without a link.
    dashboard_trace_url: str | None = None
    # A line per request on the terminal (`oncepay serve --quiet` turns it off).
    access_log: bool = True
    # Log lines as text (for a person) or JSON objects with trace ids (for a collector), or
    # auto: JSON unless stderr is a terminal (oncepay/_logformat.py).
    log_format: Literal["text", "json", "auto"] = "auto"
    # With tracing on (OTEL_* variables), a span per SQL statement too: SQLAlchemy's
    # instrumentation costs ~16 % of a payment's CPU even at 1 % sampling (bench/tracing).
    trace_sql: bool = False
    # /metrics only with the operator token (ONCEPAY_ADMIN_TOKEN) as a bearer token.
    metrics_require_token: bool = False
    # How often the worker looks for abandoned requests and expired keys.
    worker_interval: float = Field(default=1.0, gt=0)
    # How often the worker reconciles every acquirer's previous day and the current day so far
    # (SPEC §10; docs/reconciliation.md). Five minutes: reports are daily, so this only bounds
    # how late an orphan is voided or a discrepancy raised; a run of a quiet day costs a few
    # queries. 0 turns it off.
    reconcile_interval: float = Field(default=300.0, ge=0)
    # Days an unsettled capture or refund waits before it is missing at the acquirer.
    reconcile_grace_days: int = Field(default=3, ge=0)
    # Remediation actions (voids, cancels) one run may take; a run that would take more takes
    # none and raises one alert: that many at once is an incident, not routine.
    reconcile_action_cap: int = Field(default=50, ge=0)

    @field_validator("rate_limit_per_key", "rate_limit_per_merchant")
    @classmethod
    def _a_rate(cls, value: str | None) -> str | None:
        """A rate the limits library reads ("100/second"), or the service would not start."""
        if value is not None:
            from limits import parse  # the service extra's; only when a rate is set

            try:
                parse(value)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a rate such as '100/second': {exc}") from None
        return value

    @field_validator("acquirer_url", "secondary_acquirer_url")
    @classmethod
    def _an_acquirer_url(cls, value: str | None) -> str | None:
        """An http(s) URL with a host: anything else would start a service whose every call
        to its acquirer fails (SPEC §8: a bad URL is a clear error)."""
        if value is not None:
            from urllib.parse import urlsplit

            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.netloc:
                raise ValueError(f"{value!r} is not an http(s) URL")
        return value

    @field_validator("usage_log")
    @classmethod
    def _a_usage_log(cls, value: str | None) -> str | None:
        """A file in a directory that exists (its secret and the log are made at start-up)."""
        if value:
            import os.path

            folder = os.path.dirname(os.path.abspath(value))
            if not os.path.isdir(folder):
                raise ValueError(f"{value!r}: its directory {folder!r} does not exist")
        return value

    @model_validator(mode="after")
    def _adaptive_ttl_bounds(self) -> Settings:
        if self.adaptive_ttl_file and not self.adaptive_ttl:
            raise ValueError("adaptive_ttl_file is set but adaptive_ttl is off: turn it on")
        if not self.lease < self.adaptive_ttl_min <= self.adaptive_ttl_max:
            raise ValueError(
                f"need lease < adaptive_ttl_min <= adaptive_ttl_max (got {self.lease}s, "
                f"{self.adaptive_ttl_min}s, {self.adaptive_ttl_max}s): a key must outlive "
                "its request"
            )
        return self

    @property
    def embedded_acquirer(self) -> bool:
        return self.acquirer_url is None
