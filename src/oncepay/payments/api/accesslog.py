"""One line per request on the terminal (issue 14's first five minutes) and a ``Request-Id`` on
every answer: method, path, status, duration, the idempotency decision (SPEC §9's names) and
the request id, logged by ``oncepay.access`` when the request ends.

The request id is always the service's own (``req_`` + 24 hex digits), as Stripe's are: an id
a client sent could name another's request in our logs. The decision is what the idempotent
route left in the request's ASGI state under :data:`DECISION`; other routes show ``-``."""

from __future__ import annotations

import logging
import time
from typing import Any

from oncepay.http.asgi import ASGIApp, Message, Receive, Scope, Send
from oncepay.payments import tracing
from oncepay.storage.ids import new_id

__all__ = ["CLIENT_GONE", "DECISION", "REQUEST_ID", "AccessLog"]

log = logging.getLogger("oncepay.access")

DECISION = "oncepay.idempotency_decision"  # a key of scope["state"]
REQUEST_ID = "oncepay.request_id"  # likewise
# The status logged and counted for a request its client left before any answer (it went away
# while sending its body): nginx's "client closed request", not a 500 of ours.
CLIENT_GONE = 499


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        request_id = new_id("req")
        state[REQUEST_ID] = request_id
        status = [0]  # the answer's, once it starts; 500 if the app raised before

        async def answer(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if tracing.ENABLED:  # routed by now; the server span ends with the body
                    tracing.named(scope)  # named by its route template
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"request-id"]
                headers.append((b"request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, answer)
        except BaseException:
            status[0] = status[0] or 500  # Starlette answers it, outside this layer
            raise
        finally:
            status[0] = status[0] or CLIENT_GONE  # no answer and no error: the client left
            if log.isEnabledFor(logging.INFO):
                path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
                duration = (time.perf_counter() - started) * 1000
                log.info(
                    "%s %s %d %.1fms decision=%s request_id=%s",
                    scope["method"],
                    path,
                    status[0],
                    duration,
                    state.get(DECISION, "-"),
                    request_id,
                    extra={  # the JSON log's fields (payments/logformat.py)
                        "method": scope["method"],
                        "path": path,
                        "duration_ms": round(duration, 1),
                        "status": status[0],
                        "decision": state.get(DECISION),
                        "request_id": request_id,
                    },
                )
