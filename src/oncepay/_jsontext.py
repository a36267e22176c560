"""JSON encoders built once. ``json.JSONEncoder.encode`` makes its C encoder anew on every call
(and a dict for its check of circular references); a payment encodes about eight documents,
so these keep one each. They make the same text as ``json.dumps`` with the same options, but
without that check: everything encoded here is built fresh from rows, or parsed from JSON, so
it cannot hold a cycle (one would end in ``RecursionError`` instead of ``ValueError``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["encoder"]


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def encoder(
    *,
    separators: tuple[str, str] = (",", ":"),
    sort_keys: bool = False,
    ensure_ascii: bool = True,
    allow_nan: bool = True,
    default: Callable[[Any], Any] | None = None,
) -> Callable[[Any], str]:
    """``functools.partial(json.dumps, separators=…, sort_keys=…, …)``, only faster."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator (another interpreter): the stdlib's own way
        return json.JSONEncoder(
            separators=separators,
            sort_keys=sort_keys,
            ensure_ascii=ensure_ascii,
            allow_nan=allow_nan,
            default=default,
        ).encode
    strings = (
        json.encoder.encode_basestring_ascii if ensure_ascii else json.encoder.encode_basestring
    )
    item, key = separators
    encode = make(None, default or _refuse, strings, None, key, item, sort_keys, False, allow_nan)

    def encoded(value: Any) -> str:
        return "".join(encode(value, 0))

    return encoded
