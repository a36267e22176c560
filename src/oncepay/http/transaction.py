"""Transactional completion behind the middleware (SPEC §3): the app completes its request's
record inside its own database transaction, with the response it is about to send.

Without it there is a crash window: the app commits its writes, then the middleware stores
the response in a second transaction; a process killed between the two leaves the writes
without a record, and the client's retry (after the lease) runs the request again. Completed
in the app's transaction, the writes and the stored response commit together or not at all.

Built with ``transactional=True``, the middleware puts a :class:`RequestTicket` in each
managed request's ASGI scope / WSGI environ (``None`` for requests it does not manage)::

    ticket = request_ticket(request)  # Starlette/FastAPI, Flask/werkzeug or Django request
    with session.begin():
        session.add(payment)
        response = JSONResponse({...}, status_code=201)
        if ticket is not None:
            ticket.complete_in(session, response)
    return response

The middleware then sees the ticket completed and stores nothing itself. What the client gets
and what was stored must be the same answer: the ticket takes the framework's own response
object and keeps it by the middleware's rule (the same header filter, size limit and
``redact=``); once the app's answer has gone through the rest of the app, the middleware
compares it with what was completed and logs an error (and counts it in
``Gate.mismatches``) if the status, the body or a stored header differ. Headers added after
completion by the framework's own response middleware (Django's security headers, say) are
sent but not stored; a replay goes through those middleware again.

The app must commit before it returns its response: the middleware holds the response's last
chunk until the app has returned (a FastAPI dependency's teardown included), so that the
client never sees a success whose commit then failed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from oncepay.errors import ConfigurationError
from oncepay.http.gate import Gate, Run
from oncepay.idempotency._transactions import is_a, unwrapped
from oncepay.idempotency.engine import Ticket
from oncepay.idempotency.records import StoredResponse

__all__ = ["TICKET_KEY", "RequestTicket", "request_ticket", "response_parts"]

log = logging.getLogger("oncepay.http")

# Where the middleware puts the ticket: an ASGI scope key and a WSGI environ key (namespaced,
# as both specifications ask of extensions).
TICKET_KEY = "oncepay.ticket"

_NO_MIDDLEWARE = (
    "no idempotency ticket here: put IdempotencyMiddleware (or IdempotencyWSGIMiddleware) "
    "built with transactional=True in front of this app"
)

Parts = tuple[int, list[tuple[str, str]], bytes]


class RequestTicket:
    """One managed request's claim on its key, for the app to complete in its transaction."""

    __slots__ = ("completed", "gate", "run")

    def __init__(self, gate: Gate, run: Run) -> None:
        self.gate = gate
        self.run = run
        self.completed: StoredResponse | None = None  # what the app completed, once it has

    @property
    def ticket(self) -> Ticket:
        """The engine's ticket (scope, key, fence), for the engine API."""
        return self.run.ticket

    def complete_in(self, conn: Any, response: Any) -> StoredResponse:
        """Complete the record inside the transaction open on ``conn``, a sync connection to
        the store's database: ``sqlite3``, ``psycopg``, a SQLAlchemy ``Session`` or
        ``Connection`` (Flask-SQLAlchemy's ``db.session`` too), or Django's ``connection``.
        ``response`` is the framework's response (Starlette/FastAPI, Flask/werkzeug, Django)
        or a :class:`~oncepay.idempotency.StoredResponse`. Raises
        :class:`~oncepay.errors.LeaseLost` if a newer attempt took the key over: roll back."""
        stored = self._kept(response)
        self.gate.engine.complete_in(_dbapi(conn), self.run.ticket, stored)
        self.completed = stored
        return stored

    async def acomplete_in(self, conn: Any, response: Any) -> StoredResponse:
        """:meth:`complete_in` on an async connection: ``psycopg.AsyncConnection``, asyncpg
        (pooled or not), a SQLAlchemy ``AsyncSession`` or ``AsyncConnection``."""
        stored = self._kept(response)
        await self.gate.engine.acomplete_in(unwrapped(conn), self.run.ticket, stored)
        self.completed = stored
        return stored

    def _kept(self, response: Any) -> StoredResponse:
        if self.completed is not None:
            raise ConfigurationError(f"key {self.run.ticket.key!r} was already completed")
        status, headers, body = response_parts(response)
        if not self.gate.cacheable(status):
            raise ConfigurationError(
                f"a {status} is never stored (a retry must run again): do not complete with it"
            )
        return self.gate.stored(status, headers, body)

    # -- the middleware's side ------------------------------------------------------------------

    def finishing(
        self, status: int, headers: list[tuple[str, str]], body: bytes, *, oversized: bool = False
    ) -> Awaitable[None] | None:
        """What the middleware does once the app answered: store the response as usual, or,
        if the app completed the record itself, check that it sent what it stored."""
        completed = self.completed
        if completed is None:
            return self.gate.finishing(self.run, status, headers, body, oversized=oversized)
        if status >= 500:  # its commit failed, say: free the key unless the record committed
            log.error(
                "key %r completed in the app's transaction, then answered %d",
                self.run.ticket.key,
                status,
            )
            return self.gate.abandon(self.run)
        sent = self.gate.stored(status, headers, body, oversized=oversized)
        if not _same(sent, completed):
            self.gate.mismatches += 1
            log.error(
                "key %r: the response sent (%d, %d bytes) is not the one completed in the "
                "app's transaction (%d, %d bytes): a retry will get the stored one",
                self.run.ticket.key,
                sent.status,
                len(sent.body),
                completed.status,
                len(completed.body),
            )
        return None

    async def finish(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        step = self.finishing(status, headers, body)
        if step is not None:
            await step


def request_ticket(request: Any) -> RequestTicket | None:
    """The request's ticket: ``None`` when the middleware does not manage the request (a safe
    method, an excluded route, no key where none is required, idempotency disabled).

    ``request`` is a Starlette/FastAPI ``Request``, a Flask/werkzeug request, a Django
    ``HttpRequest``, or an ASGI scope / WSGI environ. Raises
    :class:`~oncepay.errors.ConfigurationError` when no transactional middleware is in front
    of the app: completing nothing in the transaction must not pass unnoticed."""
    carrier = _carrier(request)
    if TICKET_KEY not in carrier:
        raise ConfigurationError(_NO_MIDDLEWARE)
    ticket = carrier[TICKET_KEY]
    assert ticket is None or isinstance(ticket, RequestTicket)
    return ticket


def _carrier(request: Any) -> Mapping[str, Any]:
    if isinstance(request, Mapping):
        return request
    for attribute in ("scope", "environ", "META"):  # Starlette, werkzeug, Django
        carrier = getattr(request, attribute, None)
        if isinstance(carrier, Mapping):
            return carrier
    raise TypeError(f"no ASGI scope or WSGI environ in a {type(request).__qualname__}")


def response_parts(response: Any) -> Parts:
    """Status, headers and body of a framework's response, as the middleware will see them.
    A streamed response cannot be completed ahead of sending: its body is not known yet."""
    if isinstance(response, StoredResponse):
        return response.status, list(response.headers), response.body
    if is_a(response, ("starlette.responses", "Response")):
        body = getattr(response, "body", None)
        if isinstance(body, bytes):
            return response.status_code, _decoded(response.raw_headers), body
    elif is_a(response, ("werkzeug.wrappers.response", "Response")):
        if not response.is_streamed:
            return response.status_code, response.headers.to_wsgi_list(), response.get_data()
    elif is_a(response, ("django.http.response", "HttpResponse")):
        return response.status_code, list(response.items()), response.content
    raise TypeError(
        f"cannot complete with a {type(response).__qualname__}: pass the framework's buffered "
        "response (not a streamed one) or a StoredResponse"
    )


def _decoded(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def _dbapi(conn: Any) -> Any:
    """Django's connection (or its default-alias proxy) as the driver connection under it."""
    if is_a(
        conn,
        ("django.db.backends.base.base", "BaseDatabaseWrapper"),
        ("django.utils.connection", "ConnectionProxy"),
    ):
        conn.ensure_connection()
        return conn.connection
    return unwrapped(conn)


def _same(sent: StoredResponse, completed: StoredResponse) -> bool:
    """Same status and body, and every stored header sent (names case-insensitively)."""
    if (sent.status, sent.body) != (completed.status, completed.body):
        return False
    remaining = [(k.lower(), v) for k, v in sent.headers]
    for name, value in completed.headers:
        try:
            remaining.remove((name.lower(), value))
        except ValueError:
            return False
    return True
