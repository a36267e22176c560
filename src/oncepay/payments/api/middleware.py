"""The ASGI layers around the payments app: a body limit, HEAD on every GET route, and
request metrics."""

from __future__ import annotations

from typing import Any

from oncepay.errors import RequestTooLarge
from oncepay.http.asgi import (
    DISCONNECTED,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    read_body,
    replaying,
)
from oncepay.http.gate import DEFAULT_MAX_BODY
from oncepay.payments.api.accesslog import CLIENT_GONE
from oncepay.payments.api.deps import problem_response
from oncepay.payments.metrics import REQUESTS, labelled

__all__ = ["BodyLimit", "HeadAsGet", "RequestMetrics"]


class BodyLimit:
    """413 for a body larger than ``limit``, declared or streamed, before the app sees any of
    it. The body is read here in full (payment requests are small) and handed on in one
    message, so a refusal never happens half-way through the app's own reading."""

    def __init__(self, app: ASGIApp, limit: int = DEFAULT_MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        length = declared.decode("latin-1") if declared is not None else None
        body = await read_body(length, receive, self.limit)
        if body is DISCONNECTED:
            return  # the client went away before its body arrived: nothing to do
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = RequestTooLarge(f"request body exceeds the limit of {self.limit} bytes")
        await problem_response(error)(scope, receive, send)


class HeadAsGet:
    """HEAD on any GET route, as HTTP requires: the request is routed (and authenticated) as a
    GET and answered with the GET's status and headers, ``Content-Length`` included, and no
    body. Done once here instead of a second route per GET, which would double the OpenAPI
    document."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # a streamed body: nothing is sent until its last message
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        # A copy: the server reads the method from its own scope to know that no body follows.
        # The matched route is handed back to the layers outside (metrics label by it).
        as_get = {**scope, "method": "GET"}
        try:
            await self.app(as_get, receive, headers_only)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]


class RequestMetrics:
    """Counts answers by route template (not raw path: ids would explode the label space)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]  # the answer's, once it starts

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except BaseException:
            status[0] = status[0] or 500  # Starlette answers it, outside this layer
            raise
        finally:
            status[0] = status[0] or CLIENT_GONE  # no answer, no error: the client left
            route = getattr(scope.get("route"), "path", "unmatched")
            labelled(REQUESTS, route, scope["method"], str(status[0])).inc()
