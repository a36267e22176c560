"""The API's request and response bodies (separate create and public schemas, as in
full-stack-fastapi-template). Requests forbid unknown fields and never coerce types: ``"100"``
is not an amount, ``1.5`` is not an amount, ``true`` is not an amount."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from oncepay.payments.currencies import CURRENCIES, ISO_4217, MAX_AMOUNT
from oncepay.payments.records import DeliveryRow, EndpointRow, EventRow, PaymentRow, RefundRow

__all__ = [
    "TEST_PAYMENT_METHODS",
    "CaptureRequest",
    "Event",
    "EventList",
    "Payment",
    "PaymentCreate",
    "PaymentList",
    "Problem",
    "Refund",
    "RefundCreate",
    "RefundList",
    "list_public",
]

R = TypeVar("R")

# Unix seconds up to the year 5138: a larger number is a mistake (milliseconds), not a time.
MAX_TIME = 10**11
# The ceiling of an amount is per currency (currencies.py): MAX_AMOUNT is the largest of them,
# and a payment's amount is checked against its own currency's.
# Stripe's metadata limits: enough for order ids and the like, too small to smuggle documents.
MAX_METADATA_KEYS = 50
MAX_METADATA_KEY = 40
MAX_METADATA_VALUE = 500
MAX_DESCRIPTION = 1000

TEST_PAYMENT_METHODS = ("pm_card_ok", "pm_card_declined", "pm_card_insufficient_funds")


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold U+0000, and no payment needs it: refuse it as bad input.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character")
    # JSON may carry a lone surrogate ("\ud800"), which no database can store as UTF-8.
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_no_nul)]


_AMOUNT_TEXT = (
    "Minor units (¥1000 is 1000, $10.00 is 1000, 1.000 KWD is 1000); at most the currency's "
    "max_amount (GET /v1/currencies)."
)


def _at_most_any_ceiling(value: int) -> int:
    if value > MAX_AMOUNT:
        raise PydanticCustomError(
            "amount_too_large",
            "{amount} is more than any currency allows: at most {limit} minor units "
            "(see GET /v1/currencies)",
            {"amount": value, "limit": MAX_AMOUNT},
        )
    return value


# A capture's or refund's amount: at most any currency's ceiling here (the payment's own
# amount bounds it further). The schema still says the maximum; the message is ours, not
# pydantic's "less than or equal to".
Amount = Annotated[
    int,
    Field(strict=True, gt=0, description=_AMOUNT_TEXT, json_schema_extra={"maximum": MAX_AMOUNT}),
    AfterValidator(_at_most_any_ceiling),
]
# A payment's amount: its currency's ceiling, checked with the currency (PaymentCreate), so
# that the message names the currency's own limit whatever the amount.
PaymentAmount = Annotated[
    int,
    Field(strict=True, gt=0, description=_AMOUNT_TEXT, json_schema_extra={"maximum": MAX_AMOUNT}),
]

# The shape of the ids the API hands out (storage/ids.py): documented on every id, so a
# generated request names an object that can exist. A malformed id is still a 404 (no such
# object), like an unknown one.
ID_PATTERNS = {
    "payment": "^pay_[0-9a-f]{24}$",
    "refund": "^re_[0-9a-f]{24}$",
    "event": "^evt_[0-9a-f]{24}$",
    "webhook_endpoint": "^we_[0-9a-f]{24}$",
    "webhook_delivery": "^whd_[0-9a-f]{24}$",
}


def object_id(kind: str) -> Any:
    """A path parameter or field holding the id of a ``kind`` (its pattern, documented only)."""
    return WithJsonSchema({"type": "string", "pattern": ID_PATTERNS[kind]})


PaymentId = Annotated[str, object_id("payment")]
RefundId = Annotated[str, object_id("refund")]
EventId = Annotated[str, object_id("event")]
EndpointId = Annotated[str, object_id("webhook_endpoint")]
DeliveryId = Annotated[str, object_id("webhook_delivery")]
CURRENCY_CODES = sorted(ISO_4217)
# The length is checked on the str itself (pydantic then says "characters", not "items").
MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY), AfterValidator(_no_nul)
]
MetadataValue = Annotated[
    str, StringConstraints(max_length=MAX_METADATA_VALUE), AfterValidator(_no_nul)
]
Description = Annotated[str, StringConstraints(max_length=MAX_DESCRIPTION), AfterValidator(_no_nul)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PaymentCreate(_Request):
    amount: PaymentAmount
    currency: Annotated[
        str,
        Field(
            description="ISO 4217 code in upper case (lower case is accepted too; answers say "
            "it in upper case).",
            json_schema_extra={"enum": CURRENCY_CODES},
        ),
    ]
    payment_method: Annotated[
        str,
        Field(
            description=f"A test payment method: {', '.join(TEST_PAYMENT_METHODS)}.",
            json_schema_extra={"enum": list(TEST_PAYMENT_METHODS)},
        ),
    ]
    capture_method: Literal["automatic", "manual"] = "automatic"
    description: Description | None = None
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)] = (
        Field(default_factory=dict)
    )

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        code = value.upper()
        if code not in ISO_4217 or value not in (code, code.lower()):
            raise ValueError(f"{value!r} is not an ISO 4217 currency code (e.g. USD or usd)")
        return code

    @model_validator(mode="after")
    def _within_currency_limit(self) -> PaymentCreate:
        money = CURRENCIES[self.currency]
        if self.amount > money.max_amount:
            raise PydanticCustomError(
                "amount_too_large",
                "amount {amount} is more than {code} allows: at most {limit} minor units "
                "({code} has {exponent} decimal(s); see GET /v1/currencies)",
                {
                    "amount": self.amount,
                    "code": money.code,
                    "limit": money.max_amount,
                    "exponent": money.exponent,
                },
            )
        return self

    @field_validator("payment_method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in TEST_PAYMENT_METHODS:
            raise ValueError(
                f"unknown payment method; use one of {', '.join(TEST_PAYMENT_METHODS)}"
            )
        return value


def _no_null(value: object) -> object:
    if value is None:
        raise PydanticCustomError(
            "amount_null", "null is not an amount: leave amount out to take the default"
        )
    return value


# A capture's or refund's amount: left out, all of it; but not null, which a client's bug
# (an unset field serialised) would otherwise turn into "capture or refund everything".
OptionalAmount = Annotated[
    Amount | None,
    BeforeValidator(_no_null),
    WithJsonSchema(
        {
            "type": "integer",
            "exclusiveMinimum": 0,
            "maximum": MAX_AMOUNT,
            "description": _AMOUNT_TEXT,
        }
    ),
]


class CaptureRequest(_Request):
    amount: OptionalAmount = Field(
        default=None, description="Left out: the authorized amount (null is refused)."
    )


class CancelRequest(_Request):
    pass


class RefundCreate(_Request):
    amount: OptionalAmount = Field(
        default=None, description="Left out: all that is left (null is refused)."
    )


# -- public -------------------------------------------------------------------------------------


PaymentStatus = Literal[
    "processing",
    "authorized",
    "captured",
    "partially_refunded",
    "refunded",
    "canceled",
    "failed",
]


class Payment(BaseModel):
    id: str
    object: Literal["payment"] = "payment"
    amount: int
    currency: str
    status: PaymentStatus
    capture_method: Literal["automatic", "manual"]
    payment_method: str
    description: str | None
    metadata: dict[str, str]
    amount_capturable: int
    amount_captured: int
    amount_refunded: int
    failure_code: str | None
    failure_message: str | None
    outcome_unknown: bool = Field(description="True while the acquirer's answer is not known.")
    acquirer: str
    created: int
    amount_settled: int = Field(
        description="Captured money the acquirer has settled (its settlement reports), gross."
    )
    amount_refund_settled: int = Field(description="Refunded money the acquirer has settled.")
    settlement_fee: int = Field(description="Fees the acquirer kept on the settled money.")
    settled: int | None = Field(description="When the last settled line settled (Unix time).")


RefundStatus = Literal["pending", "succeeded", "failed"]


class Refund(BaseModel):
    id: str
    object: Literal["refund"] = "refund"
    payment: str
    amount: int
    currency: str
    status: RefundStatus
    failure_code: str | None
    created: int


class RefundList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Refund]
    has_more: bool
    url: str = Field(description="The list's path: where the next page is asked for.")


class PaymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Payment]
    has_more: bool
    url: str = Field(description="The list's path: where the next page is asked for.")


class Event(BaseModel):
    id: str
    object: Literal["event"] = "event"
    type: str
    created: int
    data: dict[str, Any]


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Event]
    has_more: bool
    url: str = Field(description="The list's path: where the next page is asked for.")


class Problem(BaseModel):
    """RFC 9457 problem details, with OncePay's stable machine ``code``."""

    type: str
    title: str
    status: int
    detail: str
    code: str


def payment_public(row: PaymentRow) -> dict[str, Any]:
    status = row.status
    return {
        "id": row.id,
        "object": "payment",
        "amount": row.amount,
        "currency": row.currency,
        "status": status,
        "capture_method": row.capture_method,
        "payment_method": row.payment_method,
        "description": row.description,
        "metadata": {} if row.metadata == "{}" else json.loads(row.metadata),  # usually none
        "amount_capturable": row.amount if status == "authorized" else 0,
        "amount_captured": row.amount_captured,
        "amount_refunded": row.amount_refunded,
        "failure_code": row.failure_code,
        "failure_message": row.failure_message,
        "outcome_unknown": bool(row.outcome_unknown),
        "acquirer": row.acquirer,
        "created": int(row.created_at),
        "amount_settled": row.amount_settled,
        "amount_refund_settled": row.amount_refund_settled,
        "settlement_fee": row.settlement_fee,
        "settled": None if row.settled_at is None else int(row.settled_at),
    }


def refund_public(row: RefundRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "refund",
        "payment": row.payment_id,
        "amount": row.amount,
        "currency": row.currency,
        "status": row.status,
        "failure_code": row.failure_code,
        "created": int(row.created_at),
    }


# -- webhooks -----------------------------------------------------------------------------------

EVENT_TYPES = (
    "payment.created",
    "payment.authorized",
    "payment.captured",
    "payment.failed",
    "payment.canceled",
    "payment.refunded",
    "payment.recovery_escalated",
    "payment.settled",
    "refund.created",
    "refund.succeeded",
    "refund.failed",
    "reconciliation.discrepancy_opened",
    "insight.finding_opened",
    "webhook_endpoint.test",  # POST /v1/webhook_endpoints/{id}/test: to that endpoint only
)
# A week: the longest a rotation should take; past it, the old secret is a liability.
MAX_OVERLAP = 7 * 24 * 3600


def known_event_type(value: str) -> str:
    """The one rule for naming an event type, wherever one is named: a subscription's
    ``events`` and the ``type`` filter of ``GET /v1/events`` (where an unknown type would
    otherwise match nothing, and a typo look like a quiet day)."""
    if value not in EVENT_TYPES:
        raise ValueError(f"unknown event type {value!r}; known: {', '.join(EVENT_TYPES)}")
    return value


KnownEventType = Annotated[
    str,
    AfterValidator(known_event_type),
    WithJsonSchema({"type": "string", "enum": list(EVENT_TYPES)}),
]
EventType = Annotated[str, Field(description="An event type, or * for all.")]


def _event_types(value: list[str]) -> list[str]:
    for name in sorted(set(value) - {"*"}):
        known_event_type(name)
    return sorted(set(value))


EventTypes = Annotated[
    list[EventType],
    Field(min_length=1, max_length=len(EVENT_TYPES) + 1),
    AfterValidator(_event_types),
]
Url = Annotated[str, StringConstraints(min_length=1, max_length=2048), AfterValidator(_no_nul)]


class WebhookEndpointCreate(_Request):
    url: Url
    events: EventTypes = Field(default_factory=lambda: ["*"])
    description: Description | None = None


class WebhookEndpointUpdate(_Request):
    """A field left out keeps its value; ``null`` is refused rather than read as "left out"
    (``{"url": null}`` answered 200 and changed nothing): send ``""`` to clear a description."""

    url: Url | None = None
    events: EventTypes | None = None
    description: Description | None = None
    disabled: bool | None = None

    @model_validator(mode="after")
    def _no_nulls(self) -> WebhookEndpointUpdate:
        for name in sorted(self.model_fields_set):
            if getattr(self, name) is None:
                hint = ' (send "" to clear it)' if name == "description" else ""
                raise ValueError(f"{name} may not be null; leave it out to keep it{hint}")
        return self


class RotateSecret(_Request):
    overlap_seconds: Annotated[int, Field(strict=True, ge=0, le=MAX_OVERLAP)] = 24 * 3600


class Redeliver(_Request):
    endpoint: str | None = Field(default=None, description="Only to this endpoint.")


class CreatedRange(_Request):
    """Unix seconds, as the ``created`` field of objects shows them."""

    gt: Annotated[int, Field(strict=True, ge=0, le=MAX_TIME)] | None = None
    gte: Annotated[int, Field(strict=True, ge=0, le=MAX_TIME)] | None = None
    lt: Annotated[int, Field(strict=True, ge=0, le=MAX_TIME)] | None = None
    lte: Annotated[int, Field(strict=True, ge=0, le=MAX_TIME)] | None = None


class RedeliverRange(_Request):
    created: CreatedRange = Field(
        description="The events' creation time: at least a lower bound (gt or gte)."
    )

    @model_validator(mode="after")
    def _bounded_below(self) -> RedeliverRange:
        if self.created.gt is None and self.created.gte is None:
            raise PydanticCustomError(
                "unbounded_range", "created: give a lower bound, created.gte or created.gt"
            )
        return self


class WebhookRedelivery(BaseModel):
    object: Literal["webhook_redelivery"] = "webhook_redelivery"
    endpoint: str
    deliveries: int = Field(description="Deliveries queued: one per event of the range.")


class Currency(BaseModel):
    object: Literal["currency"] = "currency"
    code: str
    exponent: int = Field(description="Decimals: 10**exponent minor units make a major unit.")
    min_amount: int
    max_amount: int = Field(description="The largest amount in minor units.")


class CurrencyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Currency]
    has_more: bool
    url: str


class WebhookEndpoint(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[str]
    description: str | None
    disabled: bool
    disabled_reason: str | None
    created: int
    secret: str | None = Field(default=None, description="Only when created or rotated.")


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpoint]
    has_more: bool
    url: str = Field(description="The list's path: where the next page is asked for.")


class DeletedObject(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True


class WebhookAttempt(BaseModel):
    attempt: int
    status_code: int | None
    latency_ms: float
    error: str | None
    created: int


DeliveryStatus = Literal["pending", "delivering", "succeeded", "dead", "canceled"]


class WebhookDelivery(BaseModel):
    id: str
    object: Literal["webhook_delivery"] = "webhook_delivery"
    event: str
    endpoint: str
    status: DeliveryStatus
    attempts: int
    next_attempt: int | None
    last_status_code: int | None
    last_error: str | None
    created: int
    attempt_log: list[WebhookAttempt] | None = None


class WebhookDeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDelivery]
    has_more: bool
    url: str = Field(description="The list's path: where the next page is asked for.")


def endpoint_public(row: EndpointRow, *, secret: bool = False) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "webhook_endpoint",
        "url": row.url,
        "events": json.loads(row.events),
        "description": row.description,
        "disabled": bool(row.disabled),
        "disabled_reason": row.disabled_reason,
        "created": int(row.created_at),
        "secret": row.secret if secret else None,
    }


def delivery_public(row: DeliveryRow) -> dict[str, Any]:
    waiting = row.status in {"pending", "delivering"}
    return {
        "id": row.id,
        "object": "webhook_delivery",
        "event": row.event_id,
        "endpoint": row.endpoint_id,
        "status": row.status,
        "attempts": row.attempts,
        "next_attempt": int(row.next_attempt_at) if waiting else None,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created": int(row.created_at),
    }


def event_public(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "event",
        "type": row.type,
        "created": int(row.created_at),
        "data": {"object": json.loads(row.data)},
    }


def list_public(
    rows: Iterable[R], has_more: bool, public: Callable[[R], dict[str, Any]], url: str
) -> dict[str, Any]:
    """A page of objects as every list endpoint answers it (Stripe's list object)."""
    return {
        "object": "list",
        "data": [public(row) for row in rows],
        "has_more": has_more,
        "url": url,
    }
