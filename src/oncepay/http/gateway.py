"""The idempotency gateway: OncePay's middleware in front of any HTTP service.

``oncepay gateway --upstream http://127.0.0.1:8080 --store redis://…`` runs a reverse proxy
(uvicorn) whose managed requests go through :class:`~oncepay.http.IdempotencyMiddleware`.
Several gateway processes sharing one store behave as one.

* requests and responses stream both ways (managed request bodies are read first: the
  fingerprint needs them, and go upstream whole, with their ``Content-Length``);
* the client's headers go upstream as sent, and no others: no cookie kept from an earlier
  answer, no ``Accept-Encoding`` of the gateway's own; hop-by-hop headers are dropped in both
  directions; ``Forwarded`` and ``X-Forwarded-*`` are added;
* ``Date`` and ``Server`` are the ASGI server's, one of each: the upstream's are dropped;
* an upstream that never got the request (refused, connect timeout) is a 502 / 504 and the
  key is released; one that failed after it (read timeout, dropped connection) may have acted,
  so its 502 / 504 says ``Idempotency-Outcome: unknown`` and the key stays locked;
* ``GET /health`` is answered by the gateway itself (and checks the store);
* with ``--adaptive-ttl-file FILE`` (``oncepay insight analyze --json``'s output) new records are
  kept for the TTLs learned per tenant and route, and the file is read again when it changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from oncepay.errors import ConfigurationError, OncePayError
from oncepay.http._cookies import NoCookies
from oncepay.http.asgi import UNCLAIMED, IdempotencyMiddleware, Message, Receive, Scope, Send
from oncepay.http.gate import (
    NOT_STORED,
    OUTCOME_UNKNOWN_HEADER,
    Gate,
    OutcomeUnknown,
    Request,
    ScopeFunction,
)
from oncepay.http.problems import Problem
from oncepay.http.scopes import scope_from_cookie, scope_from_header
from oncepay.idempotency.stores import store_from_url
from oncepay.insight.ttl_policy import DEFAULT_MAXIMUM, DEFAULT_MINIMUM, TtlPolicy
from oncepay.insight.usage_log import UsageLog

__all__ = ["GatewaySettings", "Proxy", "create_app"]

log = logging.getLogger("oncepay.http")

# Hop-by-hop request headers (RFC 9110 §7.6.1) plus Host, which httpx sets for the upstream,
# and Content-Length, which goes with the body the gateway sends (see _request_content).
_NOT_FORWARDED = (NOT_STORED - {"date", "set-cookie"}) | {"host", "content-length"}
# Hop-by-hop response headers, and the upstream's Date and Server: the ASGI server in front
# (uvicorn) adds its own to every answer, replays and problems included, so one of each
# survives, as behind nginx. Set-Cookie goes to the client (the middleware never stores it).
_NOT_RETURNED = (NOT_STORED - {"set-cookie"}) | {"server"}
# 30 s: long enough for a slow payment acquirer, short enough to answer a client that would
# otherwise time out itself. The idempotency lease (60 s) outlasts it.
DEFAULT_UPSTREAM_TIMEOUT = 30.0
# Connecting must be quick on a local network; a slow connect means the upstream is down.
CONNECT_TIMEOUT = 5.0
# How often the learned TTLs' file is checked for a change: a new analysis is applied within
# half a minute, and a stat() every 30 s costs nothing.
DEFAULT_TTL_RELOAD = 30.0
# Failures before the request left: releasing the key is safe. Any later failure (a read
# timeout, a dropped connection) may follow a committed side effect: the key stays locked.
_NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_MAY_HAVE_RUN = "the upstream failed after receiving the request and may have acted on it"
_KEY_LOCKED = (
    "; its idempotency key stays locked until its lease lapses (a retry gets 409 until then)"
)

Keyed = Callable[[Scope], bool]


class _BrokeOff(OutcomeUnknown):
    """The upstream's response broke off after its head: the request reached it and ran."""


def _unkeyed(scope: Scope) -> bool:
    return False


@dataclass(frozen=True)
class GatewaySettings:
    upstream: str
    store: str = "sqlite:///oncepay-gateway.db"
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    required: bool = True
    wait: float = 0.0
    # Through a store outage, pass requests upstream unprotected (a warning logged for each)
    # instead of answering 503 (SPEC §2: fail closed; fail open is an explicit option).
    fail_open: bool = False
    # Scope keys by this header / cookie (the cookie first, the header as its fallback)
    # instead of by Authorization; see oncepay.http.scopes.
    scope_header: str | None = None
    scope_cookie: str | None = None
    # Fingerprints become HMAC-SHA-256 under this key (what a store holds then reveals
    # nothing about request bodies to whoever reads it).
    fingerprint_secret: str | None = None
    # Append every idempotency decision to this key-usage log (SPEC §9), keys hashed.
    usage_log: str | None = None
    # SPEC §2's switch: Stripe's status codes and error object for every problem, the
    # gateway's own (an upstream's failure) included (docs/middleware.md).
    stripe_compatible: bool = False
    # Learned TTLs (`oncepay insight analyze --json`'s output) within these bounds, the file
    # checked for changes every ttl_reload seconds (docs/gateway.md).
    adaptive_ttl: str | None = None
    adaptive_ttl_min: float = DEFAULT_MINIMUM
    adaptive_ttl_max: float = DEFAULT_MAXIMUM
    ttl_reload: float = DEFAULT_TTL_RELOAD

    @classmethod
    def from_env(cls) -> GatewaySettings:
        """Read ``ONCEPAY_UPSTREAM``, ``ONCEPAY_STORE_URL``, ``ONCEPAY_UPSTREAM_TIMEOUT``,
        ``ONCEPAY_KEY_REQUIRED``, ``ONCEPAY_WAIT``, ``ONCEPAY_FAIL_OPEN``, ``ONCEPAY_SCOPE_HEADER``,
        ``ONCEPAY_SCOPE_COOKIE``, ``ONCEPAY_FINGERPRINT_SECRET``, ``ONCEPAY_USAGE_LOG``,
        ``ONCEPAY_STRIPE_COMPATIBLE`` and ``ONCEPAY_ADAPTIVE_TTL_FILE`` (with ``_MIN``, ``_MAX``
        and ``_RELOAD``: how uvicorn workers get their config)."""
        env = os.environ
        return cls(
            upstream=env["ONCEPAY_UPSTREAM"],
            store=env.get("ONCEPAY_STORE_URL", cls.store),
            timeout=float(env.get("ONCEPAY_UPSTREAM_TIMEOUT", DEFAULT_UPSTREAM_TIMEOUT)),
            required=_true(env.get("ONCEPAY_KEY_REQUIRED", "true")),
            wait=float(env.get("ONCEPAY_WAIT", "0")),
            fail_open=_true(env.get("ONCEPAY_FAIL_OPEN", "false")),
            scope_header=env.get("ONCEPAY_SCOPE_HEADER") or None,
            scope_cookie=env.get("ONCEPAY_SCOPE_COOKIE") or None,
            fingerprint_secret=env.get("ONCEPAY_FINGERPRINT_SECRET") or None,
            usage_log=env.get("ONCEPAY_USAGE_LOG") or None,
            stripe_compatible=_true(env.get("ONCEPAY_STRIPE_COMPATIBLE", "false")),
            adaptive_ttl=env.get("ONCEPAY_ADAPTIVE_TTL_FILE") or None,
            adaptive_ttl_min=float(env.get("ONCEPAY_ADAPTIVE_TTL_MIN") or DEFAULT_MINIMUM),
            adaptive_ttl_max=float(env.get("ONCEPAY_ADAPTIVE_TTL_MAX") or DEFAULT_MAXIMUM),
            ttl_reload=float(env.get("ONCEPAY_ADAPTIVE_TTL_RELOAD") or DEFAULT_TTL_RELOAD),
        )

    def ttl_policy(self) -> TtlPolicy | None:
        """The learned TTLs the settings name, loaded; None without a file. A file that cannot
        be used raises :class:`~oncepay.errors.ConfigurationError`."""
        if not self.adaptive_ttl:
            return None
        policy = TtlPolicy(minimum=self.adaptive_ttl_min, maximum=self.adaptive_ttl_max)
        policy.load(self.adaptive_ttl)
        return policy

    def scope(self) -> ScopeFunction | None:
        """The scope function the settings name, or None for the default (Authorization)."""
        header = scope_from_header(self.scope_header) if self.scope_header else None
        if self.scope_cookie:
            return scope_from_cookie(self.scope_cookie, fallback=header)
        return header


def _true(value: str) -> bool:
    return value.lower() in {"1", "true", "yes"}


class Proxy:
    """A streaming reverse proxy to one upstream, as a plain ASGI app.

    ``keyed`` tells whether the idempotency layer in front holds a key for a request (its
    failure text then says what becomes of the key); a bare proxy holds none.
    ``stripe_compatible`` answers its own failures with Stripe's error object, as the
    middleware in front answers its problems with that switch.
    """

    def __init__(
        self,
        upstream: str,
        *,
        timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
        keyed: Keyed = _unkeyed,
        stripe_compatible: bool = False,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.keyed = keyed
        self.stripe_compatible = stripe_compatible
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            cookies=NoCookies(),
        )
        # httpx adds Accept, Accept-Encoding (gzip), Connection and User-Agent of its own to
        # every request; a proxy sends its client's only. The client would get (and the
        # middleware store) a gzip body it never asked for.
        for name in list(self.client.headers):
            del self.client.headers[name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, on_shutdown=self.client.aclose)
            return
        if scope["type"] != "http":
            return
        headers = _forward_headers(scope)
        content = await _request_content(scope, receive, headers)
        if content is None:
            return  # the client left before its body began: send nothing upstream
        request = self.client.build_request(
            scope["method"], self._url(scope), headers=headers, content=content
        )
        try:
            response = await self.client.send(request, stream=True)
        except _NEVER_SENT as exc:  # the upstream never saw it: a retry may run it
            timed_out = isinstance(exc, httpx.TimeoutException)
            status, code = (504, "upstream_timeout") if timed_out else (502, "upstream_unavailable")
            await self._problem(send, status, code, f"the upstream could not be reached: {exc!r}")
            return
        except httpx.TimeoutException:
            detail = self._may_have_run(scope)
            await self._problem(send, 504, "upstream_timeout", detail, unknown=True)
            return
        except httpx.TransportError as exc:
            detail = f"{self._may_have_run(scope)} ({exc!r})"
            await self._problem(send, 502, "upstream_failed", detail, unknown=True)
            return
        try:
            await _stream_back(response, send)
        except (httpx.TransportError, httpx.StreamError) as exc:
            # The upstream answered, then broke off mid-body: it ran. The client's response is
            # cut short (the connection drops) and the key stays locked (OutcomeUnknown).
            raise _BrokeOff(f"{self._may_have_run(scope)} ({exc!r})") from exc
        finally:
            await response.aclose()

    async def _problem(
        self, send: Send, status: int, code: str, detail: str, *, unknown: bool = False
    ) -> None:
        """The gateway's own failure: a problem document, or Stripe's error object."""
        extra = [(OUTCOME_UNKNOWN_HEADER, "unknown")] if unknown else []
        if self.stripe_compatible:  # a 5xx of the server's side: Stripe's api_error
            problem = Problem.stripe(status, "api_error", code, detail, extra)
        else:
            title = "Bad gateway" if status == 502 else "Gateway timeout"
            problem = Problem(status, code, title, detail, extra)
        start: Message = {
            "type": "http.response.start",
            "status": problem.status,
            "headers": [(k.encode(), v.encode()) for k, v in problem.headers],
        }
        await send(start)
        await send({"type": "http.response.body", "body": problem.body})

    def _may_have_run(self, scope: Scope) -> str:
        return _MAY_HAVE_RUN + (_KEY_LOCKED if self.keyed(scope) else "")

    def _url(self, scope: Scope) -> str:
        query = scope.get("query_string", b"").decode("latin-1")
        raw = scope.get("raw_path") or scope["path"].encode()
        path = raw.decode("latin-1") if isinstance(raw, bytes) else raw
        return f"{self.upstream}{path}" + (f"?{query}" if query else "")


def _forward_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    # Hop-by-hop too: whatever the client's Connection header names (RFC 9110 §7.6.1).
    dropped = _NOT_FORWARDED | _connection_options(scope["headers"])
    headers = [(k, v) for k, v in scope["headers"] if k.decode("latin-1") not in dropped]
    client = scope.get("client")
    client_host = client[0] if client else "unknown"
    host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1")
    proto = scope.get("scheme", "http")
    headers += [
        (b"forwarded", f"for={_quoted(client_host)};host={_quoted(host)};proto={proto}".encode()),
        (b"x-forwarded-for", client_host.encode()),
        (b"x-forwarded-host", host.encode()),
        (b"x-forwarded-proto", proto.encode()),
    ]
    return headers


def _connection_options(headers: list[tuple[bytes, bytes]]) -> set[str]:
    """The header names a ``Connection`` header lists (lower case): hop-by-hop by its say."""
    return {
        name.strip().lower()
        for key, value in headers
        if key == b"connection"
        for name in value.decode("latin-1").split(",")
        if name.strip()
    }


def _quoted(value: str) -> str:
    """``value`` as an RFC 7239 quoted-string: a quote or backslash in a client's Host cannot
    end it and add a ``for=`` of the client's choosing."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def _request_content(
    scope: Scope, receive: Receive, headers: list[tuple[bytes, bytes]]
) -> bytes | AsyncIterator[bytes] | None:
    """The body to send upstream: whole, when it came in one message (always so for a
    managed request, which the middleware read first), so that httpx sends it with its
    Content-Length; streamed otherwise, with the client's Content-Length when it sent one
    (servers such as wsgiref and http.server read a body by its length and take a chunked one
    for empty). ``None`` when the client left before its body began."""
    first = await receive()
    if first["type"] != "http.request":
        return None
    body: bytes = first.get("body", b"")
    if not first.get("more_body", False):
        return body
    length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
    if length is not None:  # httpx then sends no Transfer-Encoding: chunked
        headers.append((b"content-length", length))
    return _rest_of_body(body, receive)


async def _rest_of_body(first: bytes, receive: Receive) -> AsyncIterator[bytes]:
    yield first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _stream_back(response: httpx.Response, send: Send) -> None:
    # The raw bytes, not httpx's decoded text: a UTF-8 header value must pass through as sent.
    headers = [
        (k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in _NOT_RETURNED
    ]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    async for chunk in response.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _lifespan(receive: Receive, send: Send, *, on_shutdown: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


class _Health:
    """``GET /health`` answered by the gateway, with a store check; everything else proxied.
    With learned TTLs, their file is checked for changes while the app runs (from lifespan
    startup to shutdown)."""

    def __init__(
        self, app: IdempotencyMiddleware, reload_every: float = DEFAULT_TTL_RELOAD
    ) -> None:
        self.app = app
        self.reload_every = reload_every
        self.reloading: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.app.gate.ttl_policy is not None:
            await self.app(scope, self._watching(receive), send)
            return
        if scope["type"] == "http" and scope["path"] == "/health" and scope["method"] == "GET":
            await self._health(send)
            return
        await self.app(scope, receive, send)

    def _watching(self, receive: Receive) -> Receive:
        """The lifespan's ``receive``, which starts the reloader at startup, stops it at
        shutdown."""

        async def watched() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup" and self.reloading is None:
                self.reloading = asyncio.get_running_loop().create_task(self._reload())
            elif message["type"] == "lifespan.shutdown" and self.reloading is not None:
                self.reloading.cancel()
                self.reloading = None
            return message

        return watched

    async def _reload(self) -> None:
        """Read the learned TTLs' file again whenever it changed; a file that cannot be used
        is logged and the TTLs learned before stay."""
        policy = self.app.gate.ttl_policy
        assert policy is not None
        while True:
            await asyncio.sleep(self.reload_every)
            try:
                if await asyncio.to_thread(policy.reload):
                    log.info("learned TTLs reloaded: %d applied", len(policy.learned()))
            except ConfigurationError as exc:
                log.warning("%s; the TTLs learned before stay", exc.detail)

    async def _health(self, send: Send) -> None:
        status, store = 200, "ok"
        try:
            await self.app.gate.engine.store.get("oncepay-health", "probe")
        except OncePayError as exc:  # the detail names the store's address: logged, not shown
            log.warning("health check: the idempotency store failed: %s", exc.detail)
            status, store = 503, "unavailable"
        body = json.dumps({"status": "ok" if status == 200 else "degraded", "store": store})
        start: Message = {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
        await send(start)
        await send({"type": "http.response.body", "body": body.encode()})


def create_app(settings: GatewaySettings | None = None) -> _Health:
    """The gateway as an ASGI app (uvicorn factory: ``oncepay.http.gateway:create_app``)."""
    settings = settings or GatewaySettings.from_env()
    proxy = Proxy(
        settings.upstream, timeout=settings.timeout, stripe_compatible=settings.stripe_compatible
    )
    scope = settings.scope()
    options: dict[str, Any] = {"scope": scope} if scope is not None else {}
    if settings.fingerprint_secret:
        options["fingerprint_secret"] = settings.fingerprint_secret
    if settings.usage_log:  # closed, its last batch written, at lifespan shutdown
        options["usage_log"] = UsageLog(settings.usage_log)
    policy = settings.ttl_policy()
    if policy is not None:
        options["ttl_policy"] = policy
    middleware = IdempotencyMiddleware(
        proxy,
        store=store_from_url(settings.store),
        required=settings.required,
        wait=settings.wait,
        fail_open=settings.fail_open,
        stripe_compatible=settings.stripe_compatible,
        **options,
    )
    proxy.keyed = _keyed_by(middleware.gate)
    return _Health(middleware, settings.ttl_reload)


def _keyed_by(gate: Gate) -> Keyed:
    """Whether ``gate`` claimed a key for the request the proxy is sending: a managed request
    that carries one, unless the middleware passed it through failing open (a missing,
    invalid or busy key never reaches the proxy)."""

    def keyed(scope: Scope) -> bool:
        if not gate.manages(scope["method"], scope["path"]):
            return False
        if scope.get("state", {}).get(UNCLAIMED):  # passed through, failing open
            return False
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        request = Request(scope["method"], scope["path"], "", headers)
        return gate.raw_key(request) is not None

    return keyed
