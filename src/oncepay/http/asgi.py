"""The ASGI middleware: SPEC §2 in front of any ASGI app (Starlette, FastAPI, …).

Pure ASGI, in the manner of Starlette's own middleware: ``__init__`` validates and
precomputes, ``__call__`` passes through what it does not manage, and all per-request state
lives in a small :class:`_Responder`, never on ``self``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from oncepay.errors import OncePayError
from oncepay.http.gate import (
    EXPIRES_HEADER,
    Gate,
    Request,
    Respond,
    Run,
)
from oncepay.http.transaction import TICKET_KEY, RequestTicket
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Engine,
    disabled_by_environment,
)
from oncepay.idempotency.stores import Store

__all__ = ["DISCONNECTED", "IdempotencyMiddleware", "read_body", "replaying"]

log = logging.getLogger("oncepay.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class IdempotencyMiddleware:
    """Make unsafe requests to ``app`` idempotent by their ``Idempotency-Key``.

    ``store`` is a store or a store URL; ``ttl``, ``lease`` and ``wait`` go to the
    :class:`~oncepay.idempotency.Engine` (or pass ``engine=``); every other option is the HTTP
    policy documented in docs/middleware.md. The store is closed at lifespan shutdown.

    With ``ONCEPAY_IDEMPOTENCY_DISABLED`` set to 1, true or yes when it is built (a test
    suite's switch), the middleware passes every request through untouched.

    With ``transactional=True`` the app may complete a request's record inside its own
    database transaction: the request's :class:`~oncepay.http.RequestTicket` is in
    ``scope["oncepay.ticket"]`` (see :mod:`oncepay.http.transaction`).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | str = "memory://",
        engine: Engine | None = None,
        ttl: float = DEFAULT_TTL,
        lease: float = DEFAULT_LEASE,
        wait: float = 0.0,
        **options: Any,
    ) -> None:
        self.app = app
        engine = engine or Engine.for_store(store, ttl=ttl, lease=lease, wait=wait)
        self.gate = Gate(engine, **options)
        self.transactional = self.gate.transactional
        self.disabled = disabled_by_environment()
        self._closed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.transactional and scope["type"] == "http":
            scope[TICKET_KEY] = None  # behind the middleware, no ticket (yet): request_ticket
        if scope["type"] != "http" or self.disabled:
            lifespan = scope["type"] == "lifespan"
            await self.app(scope, receive, self._closing_at_shutdown(send) if lifespan else send)
            return
        gate = self.gate
        if not gate.manages(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        request = Request(
            scope["method"],
            scope["path"],
            scope.get("query_string", b"").decode("latin-1"),
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            client[0] if client else None,
        )
        if not gate.required and not gate.wants_key(request):
            await self.app(scope, receive, send)
            return
        body = await read_body(request.header("content-length"), receive, gate.max_body)
        if body is DISCONNECTED:
            return  # the client left mid-upload: nothing claimed, nothing run
        if body is None:
            await _respond(send, gate.too_large())
            return
        outcome = await gate.decide(request, body)
        if isinstance(outcome, Run):  # the usual outcomes first: run, then replay
            responder = _Responder(gate, outcome, send)
            if self.transactional:
                responder.held = scope[TICKET_KEY] = RequestTicket(gate, outcome)
            extensions = scope.get("extensions")
            app_scope = _bodies_only(scope) if extensions else scope
            if gate.usage_log is not None:
                responder.noting = (request, app_scope, scope.get("root_path", ""))
            await responder.run(self.app, app_scope, replaying(body, receive))
        elif isinstance(outcome, Respond):  # _respond spelled out: a coroutine less per replay
            headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]
            await send(
                {"type": "http.response.start", "status": outcome.status, "headers": headers}
            )
            await send({"type": "http.response.body", "body": outcome.body})
        else:  # Passthrough: no key where none is required, or failing open
            await self.app(scope, replaying(body, receive), send)

    def _closing_at_shutdown(self, send: Send) -> Send:
        """The app's lifespan ``send``, which closes the store once the app has shut down
        (and before the server hears so): its connections must not outlive the app."""

        async def closing(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        return closing

    async def aclose(self) -> None:
        """Close the store and the usage log (once); lifespan shutdown calls this."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.gate.engine.store.aclose()
        except Exception:  # shutdown goes on: a store that fails to close is only logged
            log.exception("the idempotency store could not be closed")
        if self.gate.usage_log is not None:  # its last batch written off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.gate.usage_log.close)


# What read_body returns when the client disconnects before the body is complete: a truncated
# body must never be fingerprinted, claimed and run as if it were the whole request.
DISCONNECTED = b"\x00oncepay:disconnected"


async def read_body(declared: str | None, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, ``None`` once it is known to exceed ``limit`` (``declared`` is
    the request's ``Content-Length``, if it sent one), or :data:`DISCONNECTED` (the very
    object) if the client went away first. The payments API's body limit reads with it too."""
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        return None
    message = await receive()
    if message["type"] != "http.request":
        return DISCONNECTED
    first = message.get("body", b"")
    if not message.get("more_body", False):  # the usual case: the whole body in one message
        return first if len(first) <= limit else None
    chunks = [first]
    size = len(first)
    while size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks) if size <= limit else None


def _bodies_only(scope: Scope) -> Scope:
    """Hide ``http.response.pathsend`` from the app: a managed response must come as body
    messages, or it could be neither captured nor stored (FileResponse falls back to them)."""
    extensions = scope.get("extensions") or {}
    if "http.response.pathsend" not in extensions:
        return scope
    kept = {k: v for k, v in extensions.items() if k != "http.response.pathsend"}
    return {**scope, "extensions": kept}


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body we already read, then the real channel."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _respond(send: Send, response: Respond) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers],
        }
    )
    await send({"type": "http.response.body", "body": response.body})


# The expiry header goes on every managed response; its name is encoded once.
_EXPIRES = EXPIRES_HEADER.encode()


def _route_template(scope: Scope, root_path: str) -> str | None:
    """The template of the route the app's router matched (Starlette and FastAPI leave it in
    ``scope["route"]``), behind whatever a ``Mount`` added to ``root_path``; None if unknown."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str):
        return None
    mounted = scope.get("root_path", "")
    return mounted[len(root_path) :] + template if mounted.startswith(root_path) else template


class _Responder:
    """Streams the app's response to the client while capturing it for storage.

    The record is completed *before* the last body chunk goes out: a client never sees a
    complete success whose record failed to store. With a single-chunk response (the common
    case) nothing has been sent yet, so a store failure becomes a clean 503 instead.

    When the app completed the record in its own transaction (``held``), the last message
    waits for the app to return, so that its commit (in a dependency's teardown, say) is done
    before the client hears of success; if the app fails instead, nothing more is sent.

    The app's last ``send`` returns at once, and the record is completed once the app returns:
    the store's round trip then suspends a handful of frames deep instead of inside the whole
    app stack (Starlette's middleware, router, endpoint, response), which every await would
    otherwise cross twice. If the app is not done by then (a background task after its
    response, say), a timer set with the last message starts completion in a task of its own
    as soon as the app suspends, so the response never waits for the app's afterwork.
    """

    __slots__ = (
        "chunks",
        "finished",
        "finishing",
        "gate",
        "held",
        "last",
        "later",
        "noting",
        "oversized",
        "run_",
        "send",
        "size",
        "start",
        "started",
    )

    def __init__(self, gate: Gate, run: Run, send: Send) -> None:
        self.gate = gate
        self.run_ = run
        self.send = send
        self.start: Message | None = None  # the app's http.response.start, as it sent it
        self.started = False  # whether it went out (with our expiry header)
        self.finished = False  # whether the app's last body message has come
        self.last: Message | None = None  # that message, until the record is stored
        self.later: asyncio.Handle | None = None  # the app-suspended timer (see above)
        self.finishing: asyncio.Task[None] | None = None
        self.held: RequestTicket | None = None  # the app's ticket, when transactional
        self.chunks: list[bytes] = []
        self.size = 0
        self.oversized = False
        # For the key-usage log: the request, the scope the app routes in, its first root_path.
        self.noting: tuple[Request, Scope, str] | None = None

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        try:
            await app(scope, receive, self.capture)
        except BaseException:
            if not self.finished or self._completed_by_app():
                self._note(500)
                await self.gate.abandon(self.run_)  # fenced: never undoes a committed record
            else:  # the app failed after its whole response: store and send it all the same
                await asyncio.shield(self._settle())
            raise
        if self.finished:
            if self.later is not None:  # the usual case, _settle's first branch spelled out
                self.later.cancel()
                self.later = None
                await self._finish_then_send()
            else:
                await self._settle()
        else:  # the app returned without a complete response
            self._note(500)
            await self.gate.abandon(self.run_)

    async def capture(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            return
        if kind != "http.response.body" or self.finished:
            await self._settle()  # whatever comes after the last body goes after it
            await self.send(message)
            return
        chunk = message.get("body", b"")
        if message.get("more_body", False):
            self._collect(chunk)
            await self._send_start()
            await self.send(message)
            return
        if self.chunks or self.oversized:
            self._collect(chunk)
        elif len(chunk) > self.gate.max_response:  # _collect's first chunk, spelled out
            self.size, self.oversized = len(chunk), True
        else:
            self.size = len(chunk)
            self.chunks.append(chunk)
        self.finished = True
        self.last = message
        if self.held is None or self.held.completed is None:
            self.later = asyncio.get_running_loop().call_soon(self._app_suspended)

    def _note(self, status: int) -> None:
        if self.noting is not None:
            request, scope, root_path = self.noting
            self.gate.executed(request, self.run_, status, _route_template(scope, root_path))

    def _completed_by_app(self) -> bool:
        return self.held is not None and self.held.completed is not None

    def _collect(self, chunk: bytes) -> None:
        if self.oversized:
            return
        self.size += len(chunk)
        if self.size > self.gate.max_response:
            self.oversized = True
            self.chunks.clear()
        else:
            self.chunks.append(chunk)

    def _app_suspended(self) -> None:
        """The app awaited something after its last message: complete without waiting for it."""
        self.later = None
        self.finishing = asyncio.get_running_loop().create_task(self._finish_then_send())

    async def _settle(self) -> None:
        """Store the response and send its last message, once (or wait for the task that does)."""
        if self.later is not None:
            self.later.cancel()
            self.later = None
        task, self.finishing = self.finishing, None
        if task is not None:
            await task
        elif self.last is not None:
            await self._finish_then_send()

    async def _finish_then_send(self) -> None:
        last, self.last = self.last, None
        start = self.start
        assert start is not None, "http.response.body before http.response.start"
        assert last is not None, "completed twice"
        try:
            # Gate.finish spelled out: a coroutine less on every request's completion
            status, body, oversized = start["status"], b"".join(self.chunks), self.oversized
            if self.held is None:
                raw = start.get("headers", ())
                step = self.gate.finishing_raw(self.run_, status, raw, body, oversized=oversized)
            else:
                headers = [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in start.get("headers", ())
                    if k != _EXPIRES
                ]
                step = self.held.finishing(status, headers, body, oversized=oversized)
            if step is not None:
                await step
        except OncePayError as exc:
            self.gate.unstored(self.run_, exc)
            if self.started:
                self._note(start["status"])
                raise  # part of the body is out: abort the response rather than finish it
            problem = self.gate.problem(exc)
            self._note(problem.status)
            await _respond(self.send, problem)
            return
        if self.noting is not None:
            self._note(start["status"])
        if not self.started:  # _send_start spelled out: a coroutine less on every request
            self.started = True
            headers = [*start.get("headers", ()), (_EXPIRES, self.run_.expires.encode())]
            await self.send({**start, "headers": headers})
        await self.send(last)

    async def _send_start(self) -> None:
        if not self.started:
            start = self.start
            assert start is not None, "http.response.body before http.response.start"
            self.started = True
            headers = [*start.get("headers", ()), (_EXPIRES, self.run_.expires.encode())]
            await self.send({**start, "headers": headers})
