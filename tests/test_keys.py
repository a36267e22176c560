"""Key parsing, tenant scope and fingerprints (SPEC §2)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncepay.errors import IdempotencyKeyInvalid
from oncepay.idempotency.keys import (
    ANONYMOUS_SCOPE,
    canonical_json,
    fingerprint,
    parse_key,
    scope_from_authorization,
)

printable = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc-123", "abc-123"),
        ("  padded\t", "padded"),
        ('"abc-123"', "abc-123"),
        ('"with \\"quotes\\" and \\\\ slash"', 'with "quotes" and \\ slash'),
        ('"has spaces inside"', "has spaces inside"),
        ("k" * 255, "k" * 255),
    ],
)
def test_bare_tokens_and_sf_strings_name_the_same_key(raw: str, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        ("", "must not be empty"),
        ('""', "must not be empty"),
        ("k" * 256, "the limit is 255"),
        ("caf\u00e9", "printable ASCII"),
        ("tab\there", "printable ASCII"),
        ('"unterminated', "does not close"),
        ('"bad \\n escape"', "may only escape"),
        ('"inner " quote"', "unescaped quote"),
        ('"abc";p=1', "';p=1' after its quoted string"),  # an sf-item's parameters
        ('"a\\"b";x', "';x' after its quoted string"),
    ],
)
def test_malformed_keys_are_refused_with_a_clear_detail(raw: str, detail: str) -> None:
    with pytest.raises(IdempotencyKeyInvalid, match=detail) as info:
        parse_key(raw)
    assert info.value.status == 400
    assert info.value.code == "idempotency_key_invalid"


@given(printable.filter(lambda s: s.strip(" \t") == s and len(s) <= 255))
def test_any_valid_key_survives_sf_string_quoting(key: str) -> None:
    quoted = '"' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'
    assert parse_key(quoted) == key


def test_scope_is_a_digest_of_the_authorization_header() -> None:
    a = scope_from_authorization("Bearer sk_test_a")
    assert a == scope_from_authorization("Bearer sk_test_a")
    assert a != scope_from_authorization("Bearer sk_test_b")
    assert "sk_test_a" not in a
    assert len(a) == 64
    assert scope_from_authorization(None) == ANONYMOUS_SCOPE


def test_json_field_order_and_whitespace_do_not_change_the_fingerprint() -> None:
    a = fingerprint("POST", "/v1/payments", b'{"amount": 100, "currency": "EUR"}')
    b = fingerprint("post", "/v1/payments", b'{"currency":"EUR",\n "amount":100}')
    assert a == b


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("PATCH", "/v1/payments", b'{"amount":100}'),
        ("POST", "/v1/payments?x=1", b'{"amount":100}'),
        ("POST", "/v1/refunds", b'{"amount":100}'),
        ("POST", "/v1/payments", b'{"amount":101}'),
        ("POST", "/v1/payments", b'{"amount":"100"}'),
    ],
)
def test_method_target_and_body_each_change_the_fingerprint(
    method: str, target: str, body: bytes
) -> None:
    base = fingerprint("POST", "/v1/payments", b'{"amount":100}')
    assert fingerprint(method, target, body) != base


def test_parts_are_delimited_so_bytes_cannot_shift_between_them() -> None:
    assert fingerprint("POST", "/a", b"b/c") != fingerprint("POST", "/ab", b"/c")


def test_non_json_bodies_are_hashed_as_sent() -> None:
    assert canonical_json(b"not json{") is None
    assert canonical_json(b"\xff\xfe") is None
    a = fingerprint("POST", "/upload", b"a=1&b=2")
    assert a != fingerprint("POST", "/upload", b"b=2&a=1")


def test_raw_mode_keeps_json_whitespace_significant() -> None:
    a = fingerprint("POST", "/x", b'{"a":1}', json_body=False)
    assert a != fingerprint("POST", "/x", b'{"a": 1}', json_body=False)


def test_keyed_fingerprints_differ_per_secret() -> None:
    plain = fingerprint("POST", "/x", b"{}")
    one = fingerprint("POST", "/x", b"{}", secret=b"one")
    two = fingerprint("POST", "/x", b"{}", secret=b"two")
    assert len({plain, one, two}) == 3
    assert one == fingerprint("POST", "/x", b"{}", secret=b"one")


def _reference_canonical(body: bytes) -> bytes | None:
    """What canonical_json has always returned, spelled with json's public functions."""
    import json

    try:
        document = json.loads(body.decode())
        return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=True).encode()  # fmt: skip
    except (ValueError, RecursionError):
        return None


json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(json_documents, st.sampled_from(["", " ", "\n\t"]), st.booleans(), st.booleans())
def test_canonical_form_is_json_dumps_sorted_byte_for_byte(
    document: object, space: str, ascii_only: bool, indented: bool
) -> None:
    import json

    text = space + json.dumps(document, ensure_ascii=ascii_only, indent=1 if indented else None)
    body = (text + space).encode("utf-8", "surrogatepass")  # lone surrogates stay possible
    assert canonical_json(body) == _reference_canonical(body)


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"[", b'{"a":1}{"b":2}', b"1 2", b'"\\ud800"', b"NaN", b"1.5e300", b"[" * 100_000],
)
def test_canonical_form_of_odd_bodies_matches_the_reference(body: bytes) -> None:
    assert canonical_json(body) == _reference_canonical(body)


def test_fingerprints_stay_what_stored_records_hold() -> None:
    # Pinned digests: a change here would make every key in flight during an upgrade a 422.
    assert fingerprint("POST", "/charges", b'{"b":1,"a":2}') == (
        "f94fbc591d33ec611244d9085c706359977548ac24d5d1124026ea86841830c1"
    )
    assert fingerprint("post", "/x", b"abc") == (
        "285ff530df75168a963d3df06c600b22042ccba68c9720befe7654733aaf3947"
    )


@pytest.mark.parametrize(
    ("body", "digest"),
    [
        (b'{"amount":1000,"currency":"EUR"}',
         "36c247d500152a12f893739e004079aaf1221e4e9f444c4d0c382ad49470a65e"),
        (b'{"v":12.5,"w":0.1,"x":-3.75,"y":1e-7,"z":100.0}',
         "85efd6d6d93154e5c559ee9ef616f474581e671c8908b984854907e4821a2af7"),
        (b'{"n":[1,-2,3000000000000000000000],"s":"caf\\u00e9 \\"q\\""}',
         "130090f372e14372006b68c4bb1733d211e23b67b46a08701f4f6502f0984413"),
        (b'{"order":{"items":[{"sku":"a","qty":2,"price":9.99}],"meta":{"b":true,"a":null}}}',
         "ed84382a57bf0c3534712d4287e12a533954bc2306e9dce43d9bf812a62b29f7"),
        (b"[1.5e300, 2E-5, 0.0, -0.0]",
         "c4c35f373b1fa40ec8bbc70284976fa328a908120c7f16846aa61488ee2f1dc0"),
    ],
)  # fmt: skip
def test_exact_numbers_keep_the_fingerprints_of_the_usual_bodies(body: bytes, digest: str) -> None:
    # Pinned before numbers were made exact: ints, decimals a float carries exactly, strings
    # and nested objects keep the fingerprints their stored records hold.
    assert fingerprint("POST", "/v1/payments", body) == digest


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (b'{"v": 1234567890123456.78}', b'{"v": 1234567890123456.79}'),  # past a double's digits
        (b'{"v": 0.10000000000000000001}', b'{"v": 0.1}'),
        (b'{"v": 1e400}', b'{"v": 2e400}'),  # overflow: both were Infinity
        (b'{"v": 1e400}', b'{"v": Infinity}'),
        (b'{"v": 1e-400}', b'{"v": 0.0}'),  # underflow: both were 0.0
        (b'{"v": 1e400}', b'{"v": "1e+400"}'),  # an exact number never reads as a string
        (b'{"v": 12345678901234567890123.5}', b'{"v": 12345678901234567890123}'),
        (b'{"v": 1.00000000000000000000000000000001}', b'{"v": 1.0}'),  # past Decimal's 28
        (b'{"v": 1e9999999999999999999}', b'{"v": 1e9999999999999999998}'),
    ],
)
def test_numbers_a_float_cannot_carry_keep_their_exact_value(one: bytes, other: bytes) -> None:
    assert fingerprint("POST", "/x", one) != fingerprint("POST", "/x", other)


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (b'{"v": 1234567890123456.780}', b'{"v": 1234567890123456.78}'),
        (b'{"v": 1e400}', b'{"v": 10E+399}'),
        (b'{"v": 1.5}', b'{"v": 15e-1}'),
        (b'{"b": [1e-400], "a": 2}', b'{"a": 2, "b": [0.1e-399]}'),  # sorted as ever
        (b'{"v": -0.000}', b'{"v": -0.0}'),
        (b'{"v": 0e-400}', b'{"v": 0.0}'),
    ],
)
def test_one_number_written_two_ways_is_one_fingerprint(one: bytes, other: bytes) -> None:
    assert fingerprint("POST", "/x", one) == fingerprint("POST", "/x", other)
