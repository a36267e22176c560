"""Every error the API answers is an RFC 9457 problem with a stable ``code``, mapped here in one
place from OncePay's exception tree, FastAPI's validation errors and Starlette's HTTP errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from oncepay.errors import OncePayError
from oncepay.http.problems import PROBLEM_CONTENT_TYPE, Problem
from oncepay.payments.api.accesslog import REQUEST_ID
from oncepay.payments.api.deps import key_first, problem_response
from oncepay.payments.errors import InvalidRequest, MethodNotAllowed, ResourceMissing

__all__ = ["add_handlers"]

log = logging.getLogger("oncepay.payments")

# What a 500 says: the log has the rest, under the answer's Request-Id. A payment's phases are
# transactions, so a retry under the same Idempotency-Key resumes or repeats safely (SPEC §5).
_UNEXPECTED = (
    "an unexpected error on the server, logged under this answer's Request-Id; a request sent "
    "with an Idempotency-Key can be retried under the same key"
)


def add_handlers(app: FastAPI) -> None:
    @app.exception_handler(OncePayError)
    async def oncepay_error(request: Request, exc: OncePayError) -> Response:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        if request.method == "POST" and (keyed := await key_first(request)) is not None:
            return keyed
        return _answer(request, InvalidRequest(_describe(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error: OncePayError
        if exc.status_code == 404:
            error = ResourceMissing(f"no route {request.url.path}")
        elif exc.status_code == 405:
            allowed = ", ".join(_allowed_methods(request))
            error = MethodNotAllowed(f"{request.method} is not allowed here; use {allowed}")
        else:
            error = InvalidRequest(str(exc.detail))
            error.status = exc.status_code
            error.code = _HTTP_CODES.get(exc.status_code, "invalid_request")
        response = _answer(request, error)
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        if exc.status_code == 405:
            # Starlette names only the methods of the first route matching the path, and the
            # path may have several (GET and POST /v1/payments are two routes).
            response.headers["allow"] = ", ".join(_allowed_methods(request))
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette answers this one from outside every middleware (ServerErrorMiddleware), so
        # the access log's Request-Id is added here, as on every other answer.
        request_id = request.scope.get("state", {}).get(REQUEST_ID)
        log.exception(
            "unhandled error on %s %s (request %s)", request.method, request.url.path, request_id
        )
        problem = Problem(500, "internal_error", "Internal Server Error", _UNEXPECTED, [])
        response = Response(problem.body, 500, media_type=PROBLEM_CONTENT_TYPE)
        if request_id:
            response.headers["request-id"] = request_id
        return response


def _answer(request: Request, error: OncePayError) -> Response:
    """The problem document, or the page a front end put in its place for a browser (the
    dashboard's ``problem_page``, set on ``app.state`` when it is mounted)."""
    page: Callable[[Request, OncePayError], Response | None] | None = getattr(
        request.app.state, "problem_page", None
    )
    return (page(request, error) if page is not None else None) or problem_response(error)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at the request's path (HEAD wherever GET is)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


_HTTP_CODES = {405: "method_not_allowed", 406: "not_acceptable", 415: "unsupported_media_type"}


def _describe(errors: Any) -> str:
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":  # jsonbody.loads wrote the sentence
            parts.append(f"body: {error.get('ctx', {}).get('error', 'malformed JSON')}")
            continue
        location = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{location}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "the request is malformed"
