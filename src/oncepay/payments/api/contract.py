"""The OpenAPI document, said as the server enforces it (issue 14, "the contract").

FastAPI writes the document from the routes and models; this module adds what it cannot infer,
in one place:

* **operation ids** are the route functions' names (``create_payment``), so a generated client
  reads like the API, not like ``create_payment_v1_payments_post``;
* **optional query parameters** are their type, not ``anyOf [type, null]``: a query string has
  no null to send; an **optional body** likewise (not ``required``, never ``null``: the server
  refuses a literal null body);
* the **Idempotency-Key** header's exact grammar (a bare token, or an RFC 8941 sf-string), and
  a 415 on every operation that takes a body;
* **examples** on every operation, request and response, each made by the very functions
  that write the server's answers (so an example cannot drift from what the server says);
* **links** between operations (create → get, capture, cancel, refund; refund → get; a
  webhook endpoint → its test delivery and its deliveries), which a stateful fuzzer follows
  to chain create → capture → refund with real ids.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from oncepay.http.problems import PROBLEM_CONTENT_TYPE
from oncepay.payments.currencies import CURRENCIES
from oncepay.payments.models import (
    delivery_public,
    endpoint_public,
    event_public,
    payment_public,
    refund_public,
)

__all__ = ["IDEMPOTENCY_KEY_PATTERN", "LINKS", "document"]

# parse_key's grammar (idempotency/keys.py) as a pattern: 1-255 printable ASCII characters,
# bare (not starting with '"'; the ends are not blanks, which HTTP would strip), or an sf-string
# whose escapes (\" and \\) each count as one character.
IDEMPOTENCY_KEY_PATTERN = r'^(?:[!#-~](?:[ -~]{0,253}[!-~])?|"(?:[ !#-\[\]-~]|\\["\\]){1,255}")$'


class _Row:
    """A stand-in row for an example: the fields given, and None for any other (a field added
    to a view later shows up in the example as null rather than breaking it)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def __getattr__(self, name: str) -> Any:
        return None


CREATED = 1796153000.0
PAYMENT_ID = "pay_3f0c5e1a9b2d4c6e8f0a1b2c"
REFUND_ID = "re_7d1e4a2b9c3f5e6a8b0c1d2e"
EVENT_ID = "evt_1a2b3c4d5e6f7a8b9c0d1e2f"
ENDPOINT_ID = "we_9f8e7d6c5b4a39281706f5e4"
DELIVERY_ID = "whd_0a1b2c3d4e5f6a7b8c9d0e1f"


def _payment(status: str, captured: int = 0, refunded: int = 0) -> dict[str, Any]:
    return payment_public(
        _Row(
            id=PAYMENT_ID,
            amount=2000,
            currency="USD",
            status=status,
            capture_method="manual",
            payment_method="pm_card_ok",
            description="Order 1001",
            metadata='{"order": "1001"}',
            amount_captured=captured,
            amount_refunded=refunded,
            outcome_unknown=False,
            acquirer="primary",
            created_at=CREATED,
            amount_settled=0,  # settlement (SPEC §10): nothing settled yet
            amount_refund_settled=0,
            settlement_fee=0,
        )
    )


def _refund() -> dict[str, Any]:
    row = _Row(
        id=REFUND_ID,
        payment_id=PAYMENT_ID,
        amount=500,
        currency="USD",
        status="succeeded",
        created_at=CREATED + 60,
    )
    return refund_public(row)


def _event() -> dict[str, Any]:
    row = _Row(
        id=EVENT_ID,
        type="payment.captured",
        created_at=CREATED + 30,
        data='{"id": "' + PAYMENT_ID + '", "object": "payment", "status": "captured"}',
    )
    return event_public(row)


def _endpoint(secret: bool = False) -> dict[str, Any]:
    row = _Row(
        id=ENDPOINT_ID,
        url="https://shop.example/webhooks",
        events='["payment.captured", "refund.succeeded"]',
        description="Order fulfilment",
        disabled=False,
        created_at=CREATED,
        secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",  # noqa: S106 - an example
    )
    return endpoint_public(row, secret=secret)


def _delivery() -> dict[str, Any]:
    row = _Row(
        id=DELIVERY_ID,
        event_id=EVENT_ID,
        endpoint_id=ENDPOINT_ID,
        status="pending",
        attempts=0,
        next_attempt_at=CREATED + 31,
        created_at=CREATED + 30,
    )
    return delivery_public(row)


def _list(url: str, *items: dict[str, Any]) -> dict[str, Any]:
    return {"object": "list", "data": list(items), "has_more": False, "url": url}


# operation id -> (request body example or None, response example)
EXAMPLES: dict[str, tuple[dict[str, Any] | None, Callable[[], Any]]] = {
    "create_payment": (
        {
            "amount": 2000,
            "currency": "USD",
            "payment_method": "pm_card_ok",
            "capture_method": "manual",
            "description": "Order 1001",
            "metadata": {"order": "1001"},
        },
        lambda: _payment("authorized"),
    ),
    "capture_payment": ({"amount": 2000}, lambda: _payment("captured", captured=2000)),
    "cancel_payment": ({}, lambda: _payment("canceled")),
    "create_refund": ({"amount": 500}, _refund),
    "get_payment": (None, lambda: _payment("authorized")),
    "list_payments": (None, lambda: _list("/v1/payments", _payment("authorized"))),
    "list_refunds": (None, lambda: _list(f"/v1/payments/{PAYMENT_ID}/refunds", _refund())),
    "list_all_refunds": (None, lambda: _list("/v1/refunds", _refund())),
    "get_refund": (None, _refund),
    "list_events": (None, lambda: _list("/v1/events", _event())),
    "get_event": (None, _event),
    "list_currencies": (
        None,
        lambda: _list("/v1/currencies", *(CURRENCIES[c].public() for c in ("JPY", "KWD", "USD"))),
    ),
    "health": (None, lambda: {"status": "ok"}),
    "create_endpoint": (
        {
            "url": "https://shop.example/webhooks",
            "events": ["payment.captured", "refund.succeeded"],
            "description": "Order fulfilment",
        },
        lambda: _endpoint(secret=True),
    ),
    "list_endpoints": (None, lambda: _list("/v1/webhook_endpoints", _endpoint())),
    "get_endpoint": (None, _endpoint),
    "update_endpoint": ({"disabled": False}, _endpoint),
    "delete_endpoint": (
        None,
        lambda: {"id": ENDPOINT_ID, "object": "webhook_endpoint", "deleted": True},
    ),
    "rotate_secret": ({"overlap_seconds": 86400}, lambda: _endpoint(secret=True)),
    "endpoint_deliveries": (
        None,
        lambda: _list(f"/v1/webhook_endpoints/{ENDPOINT_ID}/deliveries", _delivery()),
    ),
    "send_test_delivery": ({}, _delivery),
    "redeliver_range": (
        {"created": {"gte": 1796150000, "lt": 1796160000}},
        lambda: {"object": "webhook_redelivery", "endpoint": ENDPOINT_ID, "deliveries": 12},
    ),
    "event_deliveries": (
        None,
        lambda: _list(f"/v1/events/{EVENT_ID}/deliveries", _delivery()),
    ),
    "get_delivery": (None, lambda: {**_delivery(), "attempt_log": []}),
    "redeliver_event": (
        {"endpoint": ENDPOINT_ID},
        lambda: _list(f"/v1/events/{EVENT_ID}/deliveries", _delivery()),
    ),
}


def _link(operation: str, **parameters: str) -> dict[str, Any]:
    return {"operationId": operation, "parameters": parameters}


_PAYMENT = "$response.body#/id"
_AFTER_PAYMENT = {
    "GetPayment": _link("get_payment", id=_PAYMENT),
    "CapturePayment": _link("capture_payment", id=_PAYMENT),
    "CancelPayment": _link("cancel_payment", id=_PAYMENT),
    "CreateRefund": _link("create_refund", id=_PAYMENT),
    "ListRefunds": _link("list_refunds", id=_PAYMENT),
}
_ENDPOINT = "$response.body#/id"
_AFTER_ENDPOINT = {
    name: _link(operation, endpoint_id=_ENDPOINT)
    for name, operation in {
        "GetEndpoint": "get_endpoint",
        "UpdateEndpoint": "update_endpoint",
        "RotateSecret": "rotate_secret",
        "SendTestDelivery": "send_test_delivery",
        "ListDeliveries": "endpoint_deliveries",
        "Redeliver": "redeliver_range",
        "DeleteEndpoint": "delete_endpoint",
    }.items()
}
# operation id -> its success status -> links
LINKS: dict[str, dict[str, dict[str, Any]]] = {
    "create_payment": {"201": _AFTER_PAYMENT},
    "capture_payment": {"200": _AFTER_PAYMENT},
    "cancel_payment": {"200": {"GetPayment": _AFTER_PAYMENT["GetPayment"]}},
    "get_payment": {"200": _AFTER_PAYMENT},
    "create_refund": {
        "201": {
            "GetRefund": _link("get_refund", refund_id="$response.body#/id"),
            "GetPayment": _link("get_payment", id="$response.body#/payment"),
            "CreateRefund": _link("create_refund", id="$response.body#/payment"),
        }
    },
    "create_endpoint": {"201": _AFTER_ENDPOINT},
    "send_test_delivery": {
        "200": {
            "GetDelivery": _link("get_delivery", delivery_id="$response.body#/id"),
            "GetEvent": _link("get_event", event_id="$response.body#/event"),
            "EventDeliveries": _link("event_deliveries", event_id="$response.body#/event"),
        }
    },
}


def document(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (built once, then kept, as FastAPI's own ``openapi()``)."""
    if app.openapi_schema is None:
        found = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        refine(found, app)
        app.openapi_schema = found
    return app.openapi_schema


def refine(found: dict[str, Any], app: FastAPI) -> None:
    names = _operation_names(app)
    for path, item in found["paths"].items():
        for method, operation in item.items():
            operation["operationId"] = names[(path, method)]
            _refine_operation(operation)


def _operation_names(app: FastAPI) -> dict[tuple[str, str], str]:
    names: dict[tuple[str, str], str] = {}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                names[(route.path_format, method.lower())] = route.name
    if len(set(names.values())) != len(names):
        raise RuntimeError("two operations of the payments API share a function name")
    return names


def _refine_operation(operation: dict[str, Any]) -> None:
    name = operation["operationId"]
    for parameter in operation.get("parameters", ()):
        if parameter["in"] == "query" and not parameter.get("required"):
            parameter["schema"] = _not_null(parameter["schema"])
        if parameter["in"] == "header" and parameter["name"] == "Idempotency-Key":
            parameter["schema"] = {"type": "string", "pattern": IDEMPOTENCY_KEY_PATTERN}
    responses = operation["responses"]
    if "requestBody" in operation:
        # An optional body is optional (``required`` false), never ``null``: a body that is
        # sent must be an object (api/jsonbody.py refuses a literal null).
        for content in operation["requestBody"]["content"].values():
            content["schema"] = _not_null(content["schema"])
        responses["415"] = {
            "description": "The body is not JSON (Content-Type: application/json)",
            "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
    if name in EXAMPLES:  # every operation of this module's list (a test checks each has one)
        request, response = EXAMPLES[name]
        if request is not None and "requestBody" in operation:
            operation["requestBody"]["content"]["application/json"]["example"] = request
        success = next(status for status in responses if status.startswith("2"))
        responses[success].setdefault("content", {}).setdefault("application/json", {})
        responses[success]["content"]["application/json"]["example"] = response()
    for status, links in LINKS.get(name, {}).items():
        responses[status]["links"] = links


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf [X, {type: null}]`` as X (keeping the description and the default)."""
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [option for option in options if option != {"type": "null"}]
    if len(kept) != 1:
        return schema
    outer = {k: v for k, v in schema.items() if k not in {"anyOf", "default"} or v is not None}
    outer.pop("anyOf")
    return {**kept[0], **outer}
