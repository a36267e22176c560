"""How the payments API reads a JSON request body: one parser for every route, which refuses
an object that names a key twice.

Python's ``json`` (like most parsers) keeps the last of two equal keys, so
``{"amount": 1000, "amount": 5}`` would be a payment of 5 while a proxy, a log or an audit
that keeps the first sees 1000. RFC 8259 leaves duplicates to the parser and I-JSON (RFC 7493)
forbids them; for a money API the only safe reading is none at all: 400, at any depth.

A route that takes a JSON body reads and checks it here, before FastAPI runs the route and
before an idempotency key is claimed: a body declared as another media type (``text/plain``, a
form) is a 415 naming the expected one, malformed JSON a 400 saying where. Both are answered
after :meth:`StrictJsonRoute.before_refusing` (which the API uses to authenticate first, so a
caller without a valid key learns that, not what was wrong with its body)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from oncepay.payments.errors import InvalidRequest, UnsupportedMediaType

__all__ = ["DuplicateKey", "StrictJsonRoute", "body_problem", "loads"]


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
        # Decoded as UTF-8 here (RFC 8259 §8.1): json.loads would take UTF-16 and UTF-32 too.
        return json.loads(body.decode(), object_pairs_hook=_unique)
    except DuplicateKey:
        raise
    except json.JSONDecodeError as exc:
        raise json.JSONDecodeError(
            f"malformed JSON: {exc.msg} at character {exc.pos}", exc.doc, exc.pos
        ) from None
    except UnicodeDecodeError:
        raise json.JSONDecodeError("malformed JSON: not UTF-8 text", "", 0) from None
    except ValueError as exc:  # Python's limit on an integer's digits (int_max_str_digits)
        raise json.JSONDecodeError(
            f"a number has more than {sys.get_int_max_str_digits()} digits", "", 0
        ) from exc
    except RecursionError:
        raise json.JSONDecodeError("arrays and objects nested too deeply", "", 0) from None


class _StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


def _media_type(request: Request) -> str | None:
    declared = request.headers.get("content-type")
    return declared.split(";", 1)[0].strip().lower() if declared is not None else None


def _is_json(media_type: str | None) -> bool:
    # A body with no Content-Type is refused too: FastAPI would not read it as JSON.
    return media_type is not None and (
        media_type == "application/json" or media_type.endswith("+json")
    )


async def body_problem(request: Request) -> Exception | None:
    """What is wrong with a JSON request body, or None (the parsed body is kept)."""
    body = await request.body()
    if not body:
        return None  # FastAPI says which fields are required
    media_type = _media_type(request)
    if not _is_json(media_type):
        sent = f"as {media_type!r}" if media_type else "without a Content-Type"
        return UnsupportedMediaType(
            f"the body was sent {sent}; send JSON with 'Content-Type: application/json'"
        )
    try:
        request._json = loads(body)
    except json.JSONDecodeError as exc:
        return InvalidRequest(f"body: {exc.msg}")
    if request._json is None:
        # FastAPI reads a literal null as "no body", which on a capture or a refund means
        # "the whole amount": a body that is sent must be an object.
        return InvalidRequest("body: null is not a JSON object; send an object, or no body")
    return None


class StrictJsonRoute(APIRoute):
    """A route whose request body is parsed by :func:`loads` (FastAPI's documented way to
    change how a route reads its request)."""

    async def before_refusing(self, request: Request) -> Response | None:
        """Runs before a body problem is answered; raise, or return an answer, to answer
        something else first."""
        return None

    async def answer_directly(self, request: Request) -> Response | None:
        """The answer without FastAPI's request handler (its dependency solving and body
        validation), for a request whose body is well-formed JSON; None: FastAPI answers it."""
        return None

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            checked = _StrictJsonRequest(request.scope, request.receive)
            if takes_body and (problem := await body_problem(checked)) is not None:
                if (first := await self.before_refusing(checked)) is not None:
                    return first
                raise problem
            if (answer := await self.answer_directly(checked)) is not None:
                return answer
            return await handler(checked)

        return strict
