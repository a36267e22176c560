"""``oncepay._jsontext.encoder``: json.dumps's text, byte for byte, with an encoder built once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncepay._jsontext import encoder

documents = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(documents)
def test_the_text_is_json_dumps_with_the_same_options(document: Any) -> None:
    assert encoder()(document) == json.dumps(document, separators=(",", ":"))
    assert encoder(sort_keys=True, ensure_ascii=False)(document) == json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    assert encoder(separators=(", ", ": "))(document) == json.dumps(document)


def test_what_json_cannot_hold_is_refused_as_json_dumps_refuses_it() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        encoder()({"when": object()})
    with pytest.raises(ValueError, match="JSON compliant"):
        encoder(allow_nan=False)([float("nan")])
    assert encoder()([float("inf")]) == json.dumps([float("inf")])


def test_a_default_turns_the_rest_into_json() -> None:
    assert encoder(default=str)({"n": 3j}) == '{"n":"3j"}'


def test_one_encoder_serves_many_documents_and_tasks() -> None:
    compact = encoder()
    assert [compact({"n": n}) for n in range(3)] == ['{"n":0}', '{"n":1}', '{"n":2}']
