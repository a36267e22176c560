"""Every setting of the payments service, each also an environment variable ``ONCEPAY_<NAME>``
(SPEC §7); command-line options override them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
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
    # Retry control (docs/operations.md, "Retry control"): "adaptive" retries within a budget,
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
    # Append every idempotency decision to this key-usage log (SPEC §9; docs/insight.md).
    usage_log: str | None = None
    # Stripe keeps keys a day (docs/payments-api.md): long enough for any client retry.
    key_ttl: float = Field(default=24 * 3600.0, gt=0)
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
    # Webhooks go to public addresses only: a merchant's URL is fetched from inside our
    # network, and one naming 127.0.0.1, 10.x or 169.254.169.254 (cloud metadata) would make
    # the worker a proxy onto internal services (SSRF). True for development and tests only.
    webhook_allow_private: bool = False
    # The operator token (SPEC §11): a bearer token for the operator API (/v1/admin/...) and
    # the dashboard. Unset, both are off (404): there is no default operator.
    admin_token: str | None = Field(default=None, min_length=16)
    # A line per request on the terminal (`oncepay serve --quiet` turns it off).
    access_log: bool = True
    # How often the worker looks for abandoned requests and expired keys.
    worker_interval: float = Field(default=1.0, gt=0)

    @property
    def embedded_acquirer(self) -> bool:
        return self.acquirer_url is None
