"""The ASGI middleware: SPEC §2 in front of any ASGI app (Starlette, FastAPI, …).

Pure ASGI, in the manner of Starlette's own middleware: ``__init__`` validates and
precomputes, ``__call__`` passes through what it does not manage, and all per-request state
lives in a small :class:`_Responder`, never on ``self``.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any, Protocol, runtime_checkable

from oncepay.errors import LeaseLost, OncePayError
from oncepay.http.gate import (
    EXPIRES_HEADER,
    NOT_STORED,
    REPLAYED_HEADER,
    Gate,
    OutcomeUnknown,
    Passthrough,
    Request,
    Respond,
    Run,
    default_cacheable,
    default_scope,
    http_date,
)
from oncepay.http.transaction import TICKET_KEY, RequestTicket
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Engine,
    Ticket,
    disabled_by_environment,
)
from oncepay.idempotency.keys import ANONYMOUS_SCOPE, MAX_KEY_LENGTH, fingerprint
from oncepay.idempotency.records import StoredResponse
from oncepay.idempotency.stores import Store
from oncepay.idempotency.stores.base import ScriptedStore

__all__ = ["DISCONNECTED", "IdempotencyMiddleware", "read_body", "replaying"]

log = logging.getLogger("oncepay.http")
# Set in the scope's state when a managed request goes to the app with no key claimed for it
# (failing open through a store outage, or no key where none is required): the gateway's
# proxy then does not say a key of its stays locked.
UNCLAIMED = "oncepay.unclaimed"

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
        store = self.gate.engine.store
        if isinstance(store, ScriptedStore) and _usual(self.gate) and not self.disabled:
            # The class is chosen once, here: the usual configuration on a Redis store takes
            # the short way per request (see _ScriptedMiddleware), any other pays nothing for it.
            self.__class__ = _ScriptedMiddleware
            self._store: ScriptedStore = store
            self._header = self.gate.headers[0].encode("latin-1")
            plain = self.gate.cacheable is default_cacheable and self.gate.redact is None
            self._completes: ScriptedStore | None = store if plain else None
            completing = store if plain and isinstance(store, _Completing) else None
            self._completing: _Completing | None = completing
            self._times = _wire_times(self.gate.engine.lease, self.gate.engine.ttl)

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
            scope.setdefault("state", {})[UNCLAIMED] = True
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
    case) nothing has been sent yet, so a store failure becomes a clean 503 instead. "The last
    chunk" is the one that completes a declared ``Content-Length`` when the app sends more
    after it (an empty closing message, as a proxy streaming its upstream's body does): a
    client reading by length has its whole answer with that chunk, so it waits too.

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
        "expires_raw",
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
        "store",
        "streamed",
        "withheld",
    )

    def __init__(self, gate: Gate, run: Run, send: Send) -> None:
        self.gate = gate
        self.run_: Run | None = run
        self.send = send
        self.expires_raw = run.expires.encode()  # the expiry header's value
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
        self.streamed = 0  # body bytes of messages with more_body sent (or withheld) so far
        # Messages with more_body kept back with the last one: those from the one completing
        # the declared Content-Length on (None: none so far).
        self.withheld: list[Message] | None = None
        # For the key-usage log: the request, the scope the app routes in, its first root_path.
        self.noting: tuple[Request, Scope, str] | None = None
        # A ScriptedStore to complete on directly, when the gate stores as it always does
        # (default cacheable, no redact): set by _ScriptedMiddleware.
        self.store: ScriptedStore | None = None

    async def run(self, app: ASGIApp, scope: Scope, receive: Receive) -> None:
        try:
            await app(scope, receive, self.capture)
        except BaseException as exc:
            if not self.finished or self._completed_by_app():
                self._note(500)
                if isinstance(exc, OutcomeUnknown):  # it may have acted: no second run yet
                    log.warning(
                        "outcome unknown for key %r (%s): kept locked until its lease lapses",
                        self._run().ticket.key,
                        exc,
                    )
                else:
                    await self.gate.abandon(self._run())  # fenced: never undoes a committed one
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
            await self.gate.abandon(self._run())

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
            self.streamed += len(chunk)
            if self.withheld is not None or self._completes_length():
                self.withheld = [*(self.withheld or ()), message]
                return
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

    def _completes_length(self) -> bool:
        """Whether the body streamed so far reaches the start's declared Content-Length."""
        start = self.start
        assert start is not None, "http.response.body before http.response.start"
        for name, value in start.get("headers", ()):
            if name.lower() == b"content-length":
                return value.isdigit() and self.streamed >= int(value)
        return False

    def _run(self) -> Run:
        """The request's ``Run`` (its ticket and expiry text)."""
        assert self.run_ is not None
        return self.run_

    def _note(self, status: int) -> None:
        if self.noting is not None:
            request, scope, root_path = self.noting
            self.gate.executed(request, self._run(), status, _route_template(scope, root_path))

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
            step: Awaitable[None] | None
            if self.held is None:
                raw = start.get("headers", ())
                store = self.store
                if store is not None and status < 400 and not oversized:
                    # Gate.finishing_raw's usual case, its header encoding remembered per set
                    ticket = self._run().ticket
                    headers_json = _stored_headers(raw)
                    step = store.complete_encoded(
                        ticket.scope, ticket.key, ticket.fence, status, headers_json, body
                    )
                else:
                    step = self.gate.finishing_raw(
                        self._run(), status, raw, body, oversized=oversized
                    )
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
            self.gate.unstored(self._run(), exc)
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
            headers = list(start.get("headers", ()))
            if status < 400 or self._keeps(start, body):
                headers.append((_EXPIRES, self.expires_raw))
            await self.send({**start, "headers": headers})
        await self._send_last(last)

    def _keeps(self, start: Message, body: bytes | None) -> bool:
        """:meth:`Gate.keeps` for the app's start message: whether to say when the key expires
        (not on an answer that releases it, a 5xx say)."""
        raw = start.get("headers", ())
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]
        return self.gate.keeps(start["status"], headers, body)

    async def _send_last(self, last: Message) -> None:
        """The last message, after whatever was withheld with it (see ``_completes_length``)."""
        if self.withheld is not None:
            withheld, self.withheld = self.withheld, None
            for message in withheld:
                await self.send(message)
        await self.send(last)

    async def _send_start(self) -> None:
        if not self.started:
            start = self.start
            assert start is not None, "http.response.body before http.response.start"
            self.started = True
            headers = list(start.get("headers", ()))
            if start["status"] < 400 or self._keeps(start, None):
                headers.append((_EXPIRES, self.expires_raw))
            await self.send({**start, "headers": headers})


def _usual(gate: Gate) -> bool:
    """Whether a gate's options leave the per-request work to what _ScriptedMiddleware does
    itself: one key header, the default scope, fixed TTLs, no usage log, nothing transactional."""
    return (
        len(gate.headers) == 1
        and gate.scope is default_scope
        and not gate.route_ttl
        and gate.ttl_policy is None
        and gate.usage_log is None
        and not gate.transactional
    )


class _ScriptedMiddleware(IdempotencyMiddleware):
    """:class:`IdempotencyMiddleware` on a :class:`ScriptedStore` (Redis), in the usual
    configuration (:func:`_usual`): the class ``__init__`` picks, never built directly.

    The usual request (every header on one line, a bare key, the body in one message) is
    decided here, in one frame: the headers read from the scope's bytes into a dict, the
    claim script's reply read as it comes (a new record, or a stored response to replay with
    its headers already encoded), none of ``Request``, ``Claim``, ``Record``, ``Execute`` or
    ``Respond`` built, and the response stored with its header set's encoding remembered. The
    rules are the gate's and the engine's (their code runs for every other outcome); any other
    request goes the general way before anything is read or claimed."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        gate = self.gate
        method = scope["method"]
        if method not in gate.methods or (
            (gate.include is not None or gate.exclude) and not gate.manages(method, scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        raw_headers = scope["headers"]
        headers = dict(raw_headers)
        raw_key = headers.get(self._header)
        if raw_key is None or len(headers) != len(raw_headers):  # no key, or a header repeated
            await super().__call__(scope, receive, send)
            return
        key = raw_key.decode("latin-1")
        # parse_key's and _single's rules for a bare key that passes them unchanged
        if (
            not (0 < len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable())
            or key[0] in ' "'
            or key[-1] == " "
            or "," in key
        ):
            await super().__call__(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > gate.max_body:
            await _respond(send, gate.too_large())
            return
        message = await receive()  # read_body's usual case (the whole body in one message) first
        body = (
            message.get("body", b"")
            if message["type"] == "http.request" and not message.get("more_body", False)
            else await _rest_of_body(message, receive, gate.max_body)
        )
        if body is None or body is DISCONNECTED or len(body) > gate.max_body:
            if body is not DISCONNECTED:  # else the client left mid-upload: nothing to answer
                await _respond(send, gate.too_large())
            return
        path = scope["path"]
        query = scope.get("query_string", b"")
        target = f"{path}?{query.decode('latin-1')}" if query else path
        fp = fingerprint(method, target, body, secret=gate.secret)
        authorization = headers.get(b"authorization")  # scope_from_authorization, on bytes
        tenant = hashlib.sha256(authorization).hexdigest() if authorization else ANONYMOUS_SCOPE
        engine = gate.engine
        times = self._times
        if times[0] is not engine.lease or times[1] is not engine.ttl:  # changed since built
            times = self._times = _wire_times(engine.lease, engine.ttl)
        lease, ttl = times[0], times[1]
        now, now_text = _claim_now(engine.clock)
        try:
            reply = await self._store.claim_reply(
                tenant, key, fp, now, times[2], times[3], now_text
            )
        except Exception as exc:  # the store says what its claim would have done
            outcome = await self._decided(exc, tenant, key, fp, now, lease, ttl)
            await self._answer(outcome, scope, receive, send, body)
            return
        if reply[0] == b"created":  # a new record: run the app
            responder = _ScriptedResponder(
                gate, send, self._completing, tenant, key, fp, reply[1], now + ttl, body, receive
            )
            scope = _bodies_only(scope) if scope.get("extensions") else scope
            await responder.run(self.app, scope, responder.receive)
            return
        status = reply[10]
        if (
            reply[0] == b"existing"
            and reply[4] == b"completed"
            and reply[3] == fp.encode()
            and status is not None
        ):  # the same request, answered: replay it
            await send(_replay_start(status, reply[11], reply[8]))
            await send({"type": "http.response.body", "body": reply[12] or b""})
            return
        await self._answer(
            await self._decided(reply, tenant, key, fp, now, lease, ttl), scope, receive, send, body
        )

    async def _decided(
        self,
        reply: Any,
        tenant: str,
        key: str,
        fp: str,
        now: float,
        lease: float,
        ttl: float,
    ) -> Passthrough | Respond | Run:
        """Gate.decide's outcome for any other claim reply (a takeover, a 409, a 422), or for
        the exception the claim raised instead: the engine's and the gate's own rules."""
        gate, store = self.gate, self._store
        try:
            if isinstance(reply, Exception):
                claim = await store.claim_failed(reply, tenant, key, fp, now, lease, ttl)
            else:
                claim = store.claim_from(reply, tenant, key, fp, now, lease, ttl)
            decision = await gate.engine.decided(claim, tenant, key, fp, now, ttl)
        except OncePayError as exc:
            return gate.failed(exc)
        return gate.answer(decision)

    async def _answer(
        self,
        outcome: Passthrough | Respond | Run,
        scope: Scope,
        receive: Receive,
        send: Send,
        body: bytes,
    ) -> None:
        if isinstance(outcome, Run):
            responder = _Responder(self.gate, outcome, send)
            responder.store = self._completes
            app_scope = _bodies_only(scope) if scope.get("extensions") else scope
            await responder.run(self.app, app_scope, replaying(body, receive))
        elif isinstance(outcome, Respond):
            await _respond(send, outcome)
        else:  # failing open
            scope.setdefault("state", {})[UNCLAIMED] = True
            await self.app(scope, replaying(body, receive), send)


@runtime_checkable
class _Completing(Protocol):
    """A :class:`ScriptedStore` whose completion script the short way sends and awaits itself
    (the Redis stores): ``complete_reply`` sends it (the fence as the claim reply's text) and
    gives the raw reply, 1 or 0 for a stale token; an error from awaiting that goes to
    ``complete_failed``, which does what ``complete_encoded`` would have done."""

    def complete_reply(
        self, scope: str, key: str, fence: bytes, status: int, headers_json: str, body: bytes
    ) -> Awaitable[Any]: ...

    async def complete_failed(
        self,
        error: Exception,
        scope: str,
        key: str,
        fence: bytes,
        status: int,
        headers_json: str,
        body: bytes,
    ) -> Any: ...


class _ScriptedResponder(_Responder):
    """:class:`_Responder` for a new record of the short way: the claim's fields kept as they
    came (the fence as the reply's text, sent back as it is), ``Ticket`` and ``Run`` built
    only if a rarer path asks for them, the body handed to the app by a method instead of a
    closure, and the usual response stored with the completion script's reply awaited here
    (no coroutine of the store's)."""

    __slots__ = ("body", "completes", "expires_at", "fence", "fp", "key", "receive_", "tenant")

    def __init__(
        self,
        gate: Gate,
        send: Send,
        completes: _Completing | None,
        tenant: str,
        key: str,
        fp: str,
        fence: bytes,
        expires_at: float,
        body: bytes,
        receive: Receive,
    ) -> None:
        # _Responder.__init__'s fields, spelled out (see there)
        self.gate = gate
        self.run_ = None
        self.send = send
        self.expires_raw = _http_date_raw(expires_at)
        self.start = None
        self.started = False
        self.finished = False
        self.last = None
        self.later = None
        self.finishing = None
        self.held = None
        self.chunks = []
        self.size = 0
        self.oversized = False
        self.streamed = 0
        self.withheld = None
        self.noting = None
        self.store = None  # the general way's store: this class completes on ``completes``
        self.completes = completes
        self.tenant = tenant
        self.key = key
        self.fp = fp
        self.fence = fence
        self.expires_at = expires_at
        self.body: bytes | None = body
        self.receive_ = receive

    def _run(self) -> Run:
        run = self.run_
        if run is None:
            ticket = Ticket(
                self.tenant, self.key, self.fp, int(self.fence), self.expires_at, None, False, False
            )
            run = self.run_ = Run(ticket, self.expires_raw.decode())
        return run

    async def receive(self) -> Message:
        """:func:`replaying`'s ``receive``: the body read already, then the real channel."""
        body = self.body
        if body is not None:
            self.body = None
            return {"type": "http.request", "body": body, "more_body": False}
        return await self.receive_()

    async def _finish_then_send(self) -> None:
        start, store = self.start, self.completes
        if store is None or start is None or start["status"] >= 400 or self.oversized:
            await super()._finish_then_send()  # the general way, with Run built
            return
        last, self.last = self.last, None
        assert last is not None, "completed twice"
        status = start["status"]
        raw = start.get("headers", ())
        headers_json = _stored_headers(raw)
        chunks = self.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        tenant, key, fence = self.tenant, self.key, self.fence
        try:  # RedisStore.complete_encoded spelled out, a coroutine less
            try:
                done = await store.complete_reply(tenant, key, fence, status, headers_json, body)
            except Exception as exc:  # the store says what its completion would have done
                done = await store.complete_failed(
                    exc, tenant, key, fence, status, headers_json, body
                )
            if not done:
                raise LeaseLost(f"token {int(fence)} no longer holds key {key!r}")
        except OncePayError as exc:
            self.gate.unstored(self._run(), exc)
            if self.started:
                raise  # part of the body is out: abort the response rather than finish it
            await _respond(self.send, self.gate.problem(exc))
            return
        if not self.started:
            self.started = True
            await self.send({**start, "headers": [*raw, (_EXPIRES, self.expires_raw)]})
        await self._send_last(last)


def _http_date_raw(timestamp: float) -> bytes:
    """:func:`http_date` as the header's bytes, remembered for the last seconds asked."""
    second = int(timestamp)
    raw = _raw_dates.get(second)
    if raw is None:
        if len(_raw_dates) >= 4:
            _raw_dates.clear()
        raw = _raw_dates[second] = http_date(timestamp).encode()
    return raw


_raw_dates: dict[int, bytes] = {}


def _claim_now(clock: Callable[[], float]) -> tuple[float, bytes | None]:
    """The claim's ``now`` and, on the default clock, its text as the claim sends it.

    The default clock is read in nanoseconds: ``now`` is that over 10**9 as a double (Python's
    int/int division is correctly rounded) and its text the integer with ``e-9``, which Lua's
    ``tonumber`` (strtod, also correctly rounded) reads as the very same double, so the script
    compares and stores (%.17g) exactly what the engine holds. The float's ``repr`` (its
    shortest text, by dtoa) costs ~8k instructions a request, this ~3k. Another clock (a test's,
    say) is read as it is and its ``now`` formatted by the store."""
    if clock is time.time:
        ns = time.time_ns()
        return ns / 1_000_000_000, b"%de-9" % ns
    return clock(), None


def _wire_times(lease: float, ttl: float) -> tuple[float, float, str, str]:
    """An engine's lease and TTL, and the text of each as the claim sends it (``repr`` of the
    double, as the driver would write it): formatting a float costs about a microsecond, and
    these two are the same on every request."""
    return lease, ttl, repr(float(lease)), repr(float(ttl))


async def _rest_of_body(first: Message, receive: Receive, limit: int) -> bytes | None:
    """:func:`read_body` after its first ``receive()``, which brought ``first``."""
    if first["type"] != "http.request":
        return DISCONNECTED
    chunk = first.get("body", b"")
    chunks, size = [chunk], len(chunk)
    more = first.get("more_body", False)
    while more and size <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return DISCONNECTED
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks) if size <= limit else None


# The response headers a record never keeps, as ASGI spells them, and our expiry header.
_NOT_STORED_RAW = frozenset(name.encode() for name in NOT_STORED)


def _encoded_stored_headers(raw: Iterable[tuple[bytes, bytes]]) -> str:
    """The app's response headers as a record stores them (Gate.finishing_raw's filter,
    StoredResponse.headers_json's encoding)."""
    kept = tuple(
        [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in raw
            if k != _EXPIRES and k.lower() not in _NOT_STORED_RAW
        ]
    )
    return StoredResponse(0, kept).headers_json()


# An app answers with a few header sets (a content type, a handful of lengths): the last ones
# encoded are remembered by their exact bytes, as replays remember the ones they decode.
_remembered_stored_headers = functools.lru_cache(maxsize=256)(_encoded_stored_headers)


def _stored_headers(raw: Iterable[tuple[bytes, bytes]]) -> str:
    try:
        return _remembered_stored_headers(tuple(raw))
    except TypeError:  # a header as a list (ASGI allows any pair): not hashable
        return _encoded_stored_headers(raw)


_REPLAYED = (REPLAYED_HEADER.encode(), b"true")
_REMEMBERED_SIZE = 2048  # stored header texts up to this long are remembered (records.py's)


def _replay_headers(stored: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
    """A stored header set as a replay sends it, before its expiry header (Gate._replay)."""
    pairs = StoredResponse.parse_headers(stored)
    return (*[(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs], _REPLAYED)


_remembered_replay_headers = functools.lru_cache(maxsize=256)(_replay_headers)


def _replay_start(status: bytes, stored: bytes | None, expires_at: bytes) -> Message:
    """A replay's ``http.response.start``, from the claim reply's fields (Gate._replay)."""
    headers = (
        _remembered_replay_headers(stored)
        if stored is not None and len(stored) <= _REMEMBERED_SIZE
        else _replay_headers(stored)
    )
    expires = http_date(float(expires_at)).encode()
    return {
        "type": "http.response.start",
        "status": int(status),
        "headers": [*headers, (_EXPIRES, expires)],
    }
