"""The WSGI middleware: SPEC §2 in front of any WSGI app (Flask, Django, …).

The async core runs on one private loop thread (:class:`~oncepay.http._loop.LoopThread`). A
managed response is read whole before it is sent, so its record is stored before the client
sees a success; unmanaged requests stream as usual.

Flask::

    app.wsgi_app = IdempotencyWSGIMiddleware(app.wsgi_app, store="sqlite:///keys.db")

Django (``wsgi.py``)::

    application = IdempotencyWSGIMiddleware(get_wsgi_application(), store="postgresql://…")
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Iterable
from http import HTTPStatus
from types import TracebackType
from typing import Any

from oncepay._loop import LoopThread
from oncepay.errors import OncePayError
from oncepay.http.gate import Gate, Passthrough, Request, Respond, Run
from oncepay.http.transaction import TICKET_KEY, RequestTicket
from oncepay.idempotency.engine import (
    DEFAULT_LEASE,
    DEFAULT_TTL,
    Engine,
    disabled_by_environment,
)
from oncepay.idempotency.stores import Store

__all__ = ["IdempotencyWSGIMiddleware"]

log = logging.getLogger("oncepay.http")

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


class IdempotencyWSGIMiddleware:
    """Make unsafe requests to a WSGI ``app`` idempotent; options as for the ASGI middleware.

    With ``transactional=True`` a view may complete its request's record inside its own
    database transaction: the :class:`~oncepay.http.RequestTicket` is in
    ``environ["oncepay.ticket"]`` (``request.META`` in Django; see
    :mod:`oncepay.http.transaction`)."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        store: Store | str = "memory://",
        engine: Engine | None = None,
        ttl: float = DEFAULT_TTL,
        lease: float = DEFAULT_LEASE,
        wait: float = 0.0,
        **options: Any,
    ) -> None:
        self.app = app

        def make_gate() -> Gate:
            built = engine or Engine.for_store(store, ttl=ttl, lease=lease, wait=wait)
            return Gate(built, **options)

        self._make_gate = make_gate
        # A store named by URL is rebuilt in each process: connections and worker threads do
        # not survive a fork (gunicorn --preload). A store or engine object is used as given.
        self._per_process = engine is None and isinstance(store, str)
        self._gate = self._make_gate()  # validates the options now, not at the first request
        self._pid = os.getpid()
        self.disabled = disabled_by_environment()  # a test suite's switch, read once
        self.loop = LoopThread("oncepay-wsgi")
        self.transactional = self._gate.transactional

    @property
    def gate(self) -> Gate:
        if self._per_process and self._pid != os.getpid():
            self._gate, self._pid = self._make_gate(), os.getpid()
        return self._gate

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if self.transactional:
            environ[TICKET_KEY] = None  # behind the middleware, no ticket (yet): request_ticket
        method = environ["REQUEST_METHOD"].upper()
        request = Request(
            method,
            environ.get("PATH_INFO", "") or "/",
            environ.get("QUERY_STRING", ""),
            _headers(environ),
            environ.get("REMOTE_ADDR") or None,
        )
        if self.disabled or not self.gate.manages(method, request.path):
            return self.app(environ, start_response)
        if not self.gate.wants_key(request):
            return self.app(environ, start_response)
        body = _read_body(environ, self.gate.max_body)
        if body is None:
            return _respond(start_response, self.gate.too_large())
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        outcome = self.loop.run(self.gate.decide(request, body))
        if isinstance(outcome, Passthrough):
            return self.app(environ, start_response)
        if isinstance(outcome, Respond):
            return _respond(start_response, outcome)
        return self._run(request, outcome, environ, start_response)

    def _run(
        self, request: Request, run: Run, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        captured: dict[str, Any] = {}

        def capture(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            captured.update(status=status, headers=headers)
            return lambda chunk: captured.setdefault("written", []).append(chunk)

        held = RequestTicket(self.gate, run) if self.transactional else None
        if held is not None:
            environ[TICKET_KEY] = held
        try:
            body = self._drain(self.app(environ, capture), captured)
        except BaseException:  # fenced: a record the app completed and committed stays so
            self.gate.executed(request, run, 500)
            self.loop.run(self.gate.abandon(run))
            raise
        status = int(captured["status"].split(" ", 1)[0])
        headers: list[tuple[str, str]] = captured["headers"]
        try:
            if held is None:
                self.loop.run(self.gate.finish(run, status, headers, body))
            else:
                self.loop.run(held.finish(status, headers, body))
        except OncePayError as exc:
            self.gate.unstored(run, exc)
            problem = self.gate.problem(exc)
            self.gate.executed(request, run, problem.status)
            return _respond(start_response, problem)
        self.gate.executed(request, run, status)
        if status < 400 or self.gate.keeps(status, headers, body):  # not when it was released
            headers = [*headers, ("idempotency-key-expires", run.expires)]
        start_response(captured["status"], headers)
        return [body]

    @staticmethod
    def _drain(result: Iterable[bytes], captured: dict[str, Any]) -> bytes:
        try:
            chunks = list(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        if "status" not in captured:
            raise RuntimeError("the WSGI app returned without calling start_response")
        return b"".join([*captured.get("written", []), *chunks])

    def close(self) -> None:
        """Close the store and the usage log (writing its last batch), then the loop thread."""
        self.loop.run(self.gate.engine.store.aclose())
        if self.gate.usage_log is not None:
            self.gate.usage_log.close()
        self.loop.close()


def _headers(environ: Environ) -> list[tuple[str, str]]:
    headers = [
        (name[5:].replace("_", "-").lower(), value)
        for name, value in environ.items()
        if name.startswith("HTTP_")
    ]
    for name in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(name):
            headers.append((name.replace("_", "-").lower(), environ[name]))
    return headers


def _read_body(environ: Environ, limit: int) -> bytes | None:
    """The whole body, or ``None`` when it exceeds ``limit``; reads at most ``limit + 1``."""
    declared = environ.get("CONTENT_LENGTH") or ""
    known = declared.isascii() and declared.isdigit()
    if known and int(declared) > limit:
        return None
    stream = environ["wsgi.input"]
    if known:
        body: bytes = stream.read(int(declared))
    elif environ.get("wsgi.input_terminated"):  # the server ends the stream for us
        body = stream.read(limit + 1)
    else:  # PEP 3333: no Content-Length means no body; reading would wait for the client
        body = b""
    return None if len(body) > limit else body


def _respond(start_response: StartResponse, response: Respond) -> list[bytes]:
    start_response(_status_line(response.status), response.headers)
    return [response.body]


def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"
