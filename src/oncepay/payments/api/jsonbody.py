"""How the payments API reads a JSON request body: one parser for every route, which refuses
an object that names a key twice.

Python's ``json`` (like most parsers) keeps the last of two equal keys, so
``{"amount": 1000, "amount": 5}`` would be a payment of 5 while a proxy, a log or an audit
that keeps the first sees 1000. RFC 8259 leaves duplicates to the parser and I-JSON (RFC 7493)
forbids them; for a money API the only safe reading is none at all: 400, at any depth.

FastAPI parses the body before it runs the route, turning a ``json.JSONDecodeError`` into its
validation error, which the API answers as a 400 problem before an idempotency key is claimed.
So both refusals here are ``JSONDecodeError``\\ s whose message is a sentence for the client."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

__all__ = ["DuplicateKey", "StrictJsonRoute", "loads"]


class DuplicateKey(json.JSONDecodeError):
    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r} in a JSON object; send each key once", "", 0)


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise DuplicateKey(key)
            seen.add(key)
    return found


def loads(body: bytes) -> Any:
    """``body`` as JSON, refusing duplicate keys; any refusal is a ``JSONDecodeError`` whose
    message says what is wrong."""
    try:
        return json.loads(body, object_pairs_hook=_unique)
    except DuplicateKey:
        raise
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(
            f"malformed JSON: {exc.msg} at character {exc.pos}", exc.doc, exc.pos
        ) from None
    except UnicodeDecodeError:
        raise json.JSONDecodeError("malformed JSON: not UTF-8 text", "", 0) from None


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose request body is parsed by :func:`loads` (FastAPI's documented way to
    change how a route reads its request)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(_StrictJsonRequest(request.scope, request.receive))

        return strict
