"""The service's tables (SQLAlchemy Core), the same on SQLite and PostgreSQL.

Amounts are integers in minor units; times are POSIX seconds (double precision), the clock the
idempotency records use too. Every table that a request writes carries ``merchant_id``, and
every read filters on it: another merchant's object is simply not found.
"""

from __future__ import annotations

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
    "api_keys",
    "events",
    "ledger_entries",
    "ledger_transactions",
    "merchants",
    "metadata",
    "payments",
    "refunds",
]

metadata = MetaData()

# Integer surrogate keys give cursor pagination a total order; SQLite needs INTEGER (not
# BIGINT) for an autoincrementing primary key.
Seq = BigInteger().with_variant(Integer(), "sqlite")

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
    Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

payments = Table(
    "payments",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False),
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
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("payments_merchant_seq", "merchant_id", "seq"),
)

refunds = Table(
    "refunds",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("payment_id", String(40), ForeignKey("payments.id"), nullable=False),
    Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),  # pending, succeeded, failed
    Column("failure_code", String(64)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("refunds_payment", "payment_id"),
)

ledger_transactions = Table(
    "ledger_transactions",
    metadata,
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False),
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
    Column("seq", Seq, primary_key=True, autoincrement=True),
    Column("id", String(40), nullable=False, unique=True),
    Column("merchant_id", String(40), ForeignKey("merchants.id"), nullable=False),
    Column("type", String(64), nullable=False),
    Column("object_id", String(40), nullable=False),
    Column("data", Text, nullable=False),  # JSON snapshot of the object after the change
    Column("created_at", Float, nullable=False),
    Index("events_merchant_seq", "merchant_id", "seq"),
)
