"""How ``@idempotent`` stores a function's result, and gives it back on a replay.

The default, :class:`TypedJSON`, writes JSON and restores the function's *whole* return
annotation with a pydantic ``TypeAdapter``: dataclasses, pydantic models, ``Optional``, lists,
tuples and dicts of them at any depth, ``Decimal``, ``datetime``, ``UUID``, enums. So the first
call and a replay return equal values of equal types. Without pydantic installed, only JSON
types (``dict``, ``list``, ``str``, ``int``, ``float``, ``bool``, ``None``) can be restored.

Anything with ``dumps(value) -> bytes | str`` and ``loads(bytes) -> value`` replaces it
(``serializer=``): the ``json`` module, ``orjson``, or :class:`CustomSerializer` around a pair of
your own functions (Powertools' ``CustomDictSerializer``).
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from oncepay.errors import ConfigurationError

__all__ = ["CustomSerializer", "PlainJSON", "Serializer", "TypedJSON", "for_return_type"]


class Serializer(Protocol):
    """Turns a result into the bytes a record keeps, and those bytes back into the result."""

    def dumps(self, value: Any, /) -> bytes | str: ...

    def loads(self, data: bytes, /) -> Any: ...


@dataclass(frozen=True)
class CustomSerializer:
    """A serializer from two functions of your own."""

    dumps: Callable[[Any], bytes | str]
    loads: Callable[[bytes], Any]


class TypedJSON:
    """JSON in pydantic's JSON mode, restored to ``kind`` (``Any``: restored as JSON reads)."""

    def __init__(self, kind: Any = Any) -> None:
        from pydantic import PydanticSchemaGenerationError, PydanticUserError, TypeAdapter

        try:
            self._adapter: TypeAdapter[Any] = TypeAdapter(kind)
        except (PydanticSchemaGenerationError, PydanticUserError) as exc:
            raise ConfigurationError(
                f"results of type {_name(kind)} cannot be stored as JSON: return JSON types, "
                f"dataclasses or pydantic models, or pass serializer= ({exc})"
            ) from exc

    def dumps(self, value: Any, /) -> bytes:
        # warnings="error": a value that is not what the annotation says would replay as
        # something else than the first call returned, so it is refused, not coerced.
        return self._adapter.dump_json(value, round_trip=True, warnings="error")

    def loads(self, data: bytes, /) -> Any:
        return self._adapter.validate_json(data)


class PlainJSON:
    """JSON types only, for installs without pydantic."""

    def dumps(self, value: Any, /) -> bytes:
        import json

        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()

    def loads(self, data: bytes, /) -> Any:
        import json

        return json.loads(data)


def for_return_type(kind: Any) -> Serializer:
    """The default serializer for a function whose return annotation is ``kind``."""
    try:
        return TypedJSON(kind)
    except ImportError:
        if _plain_json(kind):
            return PlainJSON()
        raise ConfigurationError(
            f"restoring {_name(kind)} results on a replay needs pydantic: pip install pydantic "
            "(or oncepay[service]), or pass serializer="
        ) from None


_JSON_TYPES = (Any, None, type(None), str, int, float, bool, dict, list)


def _plain_json(kind: Any) -> bool:
    """Whether a JSON round trip gives back ``kind`` unaided: JSON types, nested."""
    if kind in _JSON_TYPES:
        return True
    origin = typing.get_origin(kind)
    if origin not in (dict, list, typing.Union, types.UnionType):
        return False
    args = typing.get_args(kind)
    return (origin is not dict or args[0] is str) and all(_plain_json(a) for a in args)


def _name(kind: Any) -> str:
    return getattr(kind, "__qualname__", None) or repr(kind)
