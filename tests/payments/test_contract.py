"""The OpenAPI document says what the server enforces (issue 14, "the contract"): enums,
patterns, integer amounts with their bounds, examples that conform to their own schemas, and
links that name real operations and parameters. (The server's side of it: schemathesis,
stateless and stateful, in test_schemathesis.py.)"""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema_rs import Draft202012Validator  # schemathesis's own validator

from oncepay.errors import IdempotencyKeyInvalid
from oncepay.idempotency.keys import parse_key
from oncepay.payments.api.app import create_app
from oncepay.payments.api.contract import IDEMPOTENCY_KEY_PATTERN
from oncepay.payments.currencies import ISO_4217, MAX_AMOUNT
from oncepay.payments.models import EVENT_TYPES, ID_PATTERNS, TEST_PAYMENT_METHODS
from oncepay.storage.ids import new_id

DOCUMENT: dict[str, Any] = create_app().openapi()
SCHEMAS = DOCUMENT["components"]["schemas"]
# The operations this contract covers (the operator API is not in the document at all).
COVERED = re.compile(r"^/(health$|v1/(payments|refunds|events|currencies|webhook_))")


def operations() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if COVERED.match(path)
    ]


def test_payment_create_is_as_strict_as_the_server() -> None:
    fields = SCHEMAS["PaymentCreate"]["properties"]
    assert set(fields["currency"]["enum"]) == ISO_4217
    assert fields["payment_method"]["enum"] == list(TEST_PAYMENT_METHODS)
    assert fields["capture_method"]["enum"] == ["automatic", "manual"]
    assert fields["amount"] == {
        "type": "integer",
        "exclusiveMinimum": 0,
        "maximum": MAX_AMOUNT,
        "description": fields["amount"]["description"],
        "title": "Amount",
    }
    assert SCHEMAS["PaymentCreate"]["additionalProperties"] is False


def test_event_types_are_an_enum() -> None:
    [events] = [
        p for p in DOCUMENT["paths"]["/v1/events"]["get"]["parameters"] if p["name"] == "type"
    ]
    assert events["schema"]["enum"] == list(EVENT_TYPES)


@pytest.mark.parametrize(
    ("parameter", "kind"),
    [("id", "payment"), ("refund_id", "refund"), ("event_id", "event"),
     ("endpoint_id", "webhook_endpoint"), ("delivery_id", "webhook_delivery")],
)  # fmt: skip
def test_every_id_in_a_path_has_its_pattern(parameter: str, kind: str) -> None:
    found = [
        p["schema"]
        for _, _, operation in operations()
        for p in operation.get("parameters", ())
        if p["name"] == parameter
    ]
    assert found
    assert all(schema["pattern"] == ID_PATTERNS[kind] for schema in found)
    prefix = {"webhook_endpoint": "we", "webhook_delivery": "whd", "refund": "re"}
    made = new_id(prefix.get(kind, kind[:3] if kind != "event" else "evt"))
    assert re.fullmatch(ID_PATTERNS[kind], made)


def test_every_post_requires_an_idempotency_key_with_its_grammar() -> None:
    for method, path, operation in operations():
        if method != "post":
            continue
        [key] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
        assert key["required"] is True, path
        assert key["schema"]["pattern"] == IDEMPOTENCY_KEY_PATTERN


@given(st.text(st.characters(min_codepoint=0, max_codepoint=0x80), max_size=260))
def test_the_idempotency_key_pattern_is_the_servers_grammar(value: str) -> None:
    if value != value.strip(" \t"):
        return  # HTTP strips blanks around a header value: the server never sees them
    try:
        parse_key(value)
        accepted = True
    except IdempotencyKeyInvalid:
        accepted = False
    assert (re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value) is not None) == accepted


@pytest.mark.parametrize(
    "value", ["a", "x" * 255, '"quoted key"', '"a\\"b"', '"' + "y" * 255 + '"', "a b"]
)
def test_the_idempotency_key_pattern_takes_both_forms(value: str) -> None:
    assert re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value)
    parse_key(value)


def _validator(ref: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator({**ref, "components": DOCUMENT["components"]})


def test_every_operation_has_examples_that_conform() -> None:
    for method, path, operation in operations():
        body = operation.get("requestBody", {}).get("content", {}).get("application/json")
        if body is not None:
            assert "example" in body, f"{method} {path}: no request example"
            _validator(body["schema"]).validate(body["example"])
        success = next(s for s in operation["responses"] if s.startswith("2"))
        content = operation["responses"][success]["content"]["application/json"]
        assert "example" in content, f"{method} {path}: no response example"
        _validator(content["schema"]).validate(content["example"])


def test_links_name_real_operations_and_parameters() -> None:
    by_id = {
        operation["operationId"]: operation
        for item in DOCUMENT["paths"].values()
        for operation in item.values()
    }
    linked = 0
    for _, _, operation in operations():
        for response in operation["responses"].values():
            for link in response.get("links", {}).values():
                target = by_id[link["operationId"]]
                names = {p["name"] for p in target.get("parameters", ())}
                assert set(link["parameters"]) <= names
                linked += 1
    create = DOCUMENT["paths"]["/v1/payments"]["post"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in create.values()} >= {
        "capture_payment",
        "cancel_payment",
        "create_refund",
        "get_payment",
    }
    assert linked >= 20


def test_operation_ids_read_like_the_api() -> None:
    ids = [operation["operationId"] for _, _, operation in operations()]
    assert len(ids) == len(set(ids))
    assert "create_payment" in ids
    assert all(not name.endswith(("_get", "_post", "_delete")) for name in ids)


def test_optional_query_parameters_are_never_null() -> None:
    for _, path, operation in operations():
        for parameter in operation.get("parameters", ()):
            if parameter["in"] == "query":
                assert "anyOf" not in parameter["schema"], (path, parameter["name"])


def test_lists_document_their_filters() -> None:
    names = {p["name"] for p in DOCUMENT["paths"]["/v1/payments"]["get"]["parameters"]}
    assert names >= {
        "limit",
        "starting_after",
        "ending_before",
        "status",
        "currency",
        "created[gte]",
        "created[lte]",
        "amount[gte]",
        "amount[lte]",
        "metadata",
    }
    for path in ("/v1/refunds", "/v1/events", "/v1/webhook_endpoints/{endpoint_id}/deliveries"):
        names = {p["name"] for p in DOCUMENT["paths"][path]["get"]["parameters"]}
        assert names >= {"limit", "starting_after", "ending_before", "created[gte]"}, path
