"""The service's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Amounts are integers in minor units; times are POSIX seconds (double precision), the clock the
idempotency records use too. Every table that a request writes carries ``merchant_id``, and
every read filters on it: another merchant's object is simply not found.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "api_key_audit",
    "api_keys",
    "events",
    "ledger_entries",
    "ledger_transactions",
    "merchants",
    "metadata",
    "payments",
    "refunds",
    "webhook_attempts",
    "webhook_deliveries",
    "webhook_endpoints",
]

metadata = MetaData()

# Integer surrogate keys give cursor pagination a total order; SQLite needs INTEGER (not
# BIGINT) for an autoincrementing primary key.
Seq = BigInteger().with_variant(Integer(), "sqlite")


def _object() -> tuple[Column[Any], Column[Any]]:
    """The columns an object the API pages over starts with: its sequence number (the order of
    a page) and its public id."""
    return (
        Column("seq", Seq, primary_key=True, autoincrement=True),
        Column("id", String(40), nullable=False, unique=True),
    )


def _owner() -> Column[Any]:
    return Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False)


def _stamps() -> tuple[Column[Any], Column[Any]]:
    return Column("created_at", Float, nullable=False), Column("updated_at", Float, nullable=False)


merchants = Table(
    "merchants",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    _owner(),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
    # Migration 6 (docs/payments-api.md, "API keys"): a label, the scopes of a restricted key
    # (space-separated; NULL: every scope), the end of a rolled key's overlap, and when the
    # key was last seen (written at most once a minute).
    Column("name", Text),
    Column("scopes", Text),
    Column("expires_at", Float),
    Column("last_used_at", Float),
)

# Every change to a key, by whom (the CLI or the operator API), in the change's transaction.
api_key_audit = Table(
    "api_key_audit",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("merchant_id", String(40), nullable=False),
    Column("key_id", String(40), nullable=False),
    Column("action", String(16), nullable=False),
    Column("actor", String(16), nullable=False),
    Column("detail", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("api_key_audit_by_merchant", "merchant_id", "seq"),
)

payments = Table(
    "payments",
    metadata,
    *_object(),
    _owner(),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("payment_method", String(64), nullable=False),
    Column("capture_method", String(16), nullable=False),
    Column("description", Text),
    Column("metadata", Text, nullable=False),  # JSON object of strings
    Column("status", String(24), nullable=False),
    Column("amount_captured", BigInteger, nullable=False, default=0),
    Column("amount_refunded", BigInteger, nullable=False, default=0),
    Column("failure_code", String(64)),
    Column("failure_message", Text),
    # Which acquirer holds (or is being asked for) the authorization, and which attempt: the
    # authorization's reference there is f"{id}_a{attempt}".
    Column("acquirer", String(32), nullable=False),
    Column("attempt", Integer, nullable=False, default=1),
    Column("authorization_id", String(64)),
    # Set while the acquirer's answer is unknown. Recovery asks again each time the request's
    # idempotency lease lapses (the lease is the back-off schedule) and counts its tries here;
    # past the schedule the payment is escalated, never guessed.
    Column("outcome_unknown", Boolean, nullable=False, default=False),
    Column("recovery_attempts", Integer, nullable=False, default=0),
    Column("escalated", Boolean, nullable=False, default=False),
    # A capture or cancel between its phases ("capture:500", "cancel"): one at a time.
    Column("pending_operation", String(32)),
    *_stamps(),
    # Settlement (SPEC §10, migration 4): what the acquirer's reports say it settled of this
    # payment's captures and refunds, the fees it kept, and when the last line settled.
    Column("amount_settled", BigInteger, nullable=False, default=0, server_default="0"),
    Column("amount_refund_settled", BigInteger, nullable=False, default=0, server_default="0"),
    Column("settlement_fee", BigInteger, nullable=False, default=0, server_default="0"),
    Column("settled_at", Float),
    Index("payments_merchant_seq", "merchant_id", "seq"),
)

refunds = Table(
    "refunds",
    metadata,
    *_object(),
    Column("payment_id", String(40), ForeignKey("payments.id"), nullable=False),
    _owner(),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),  # pending, succeeded, failed
    Column("failure_code", String(64)),
    *_stamps(),
    Index("refunds_payment", "payment_id"),
)

ledger_transactions = Table(
    "ledger_transactions",
    metadata,
    *_object(),
    _owner(),
    Column("payment_id", String(40), ForeignKey("payments.id"), nullable=False),
    Column("refund_id", String(40)),
    Column("kind", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("transaction_id", String(40), ForeignKey("ledger_transactions.id"), nullable=False),
    Column("merchant_id", String(40), nullable=False),
    Column("payment_id", String(40), nullable=False),
    Column("account", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("amount", BigInteger, nullable=False),  # debit > 0, credit < 0
    Index("ledger_entries_payment", "payment_id", "account"),
    Index("ledger_entries_transaction", "transaction_id"),
)

events = Table(
    "events",
    metadata,
    *_object(),
    _owner(),
    Column("type", String(64), nullable=False),
    Column("object_id", String(40), nullable=False),
    Column("data", Text, nullable=False),  # JSON snapshot of the object after the change
    Column("created_at", Float, nullable=False),
    # Migration 8: the W3C traceparent of the transaction that wrote it (tracing on), so its
    # webhook deliveries continue the trace of the payment (docs/observability.md).
    Column("traceparent", String(64)),
    Index("events_merchant_seq", "merchant_id", "seq"),
)

# The dashboard's signed-out sessions (migration 10): a session is an HMAC in its cookie, checked
# without the database, until its operator signs it out; then its HMAC is here, for every API
# process, until the session would have expired anyway.
dashboard_signouts = Table(
    "dashboard_signouts",
    metadata,
    Column("session", String(64), primary_key=True),
    Column("expires_at", Float, nullable=False),
)

# -- webhooks (migration 3) ----------------------------------------------------------------------

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    *_object(),
    _owner(),
    Column("url", Text, nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event types, or ["*"]
    Column("description", Text),
    Column("disabled", Boolean, nullable=False, default=False),
    Column("disabled_reason", Text),
    Column("secret", Text, nullable=False),
    # During a rotation the previous secret signs too, until it expires.
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", Float),
    Column("deleted", Boolean, nullable=False, default=False),
    *_stamps(),
    Index("webhook_endpoints_merchant", "merchant_id", "seq"),
)

# One row per (event, endpoint) delivery — and per redelivery. Its `webhook-id` is the event's
# id, the same on every attempt, so receivers de-duplicate by it.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    *_object(),
    Column("merchant_id", String(40), nullable=False),
    Column("event_id", String(40), ForeignKey("events.id"), nullable=False),
    Column("endpoint_id", String(40), ForeignKey("webhook_endpoints.id"), nullable=False),
    # pending -> delivering -> succeeded | pending (retry) | dead (schedule spent) | canceled
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    # A worker's claim: until when, and with which token (a late worker cannot record over
    # a newer claim).
    Column("locked_until", Float),
    Column("lock_token", String(40)),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    *_stamps(),
    Index("webhook_deliveries_due", "status", "next_attempt_at"),
    Index("webhook_deliveries_event", "event_id"),
)

webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("delivery_id", String(40), ForeignKey("webhook_deliveries.id"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("status_code", Integer),
    Column("latency_ms", Float, nullable=False),
    Column("error", Text),
    Column("created_at", Float, nullable=False),
    Index("webhook_attempts_delivery", "delivery_id"),
)
