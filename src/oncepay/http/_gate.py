"""What every HTTP surface shares: which requests are managed, how a key, scope and
fingerprint are read from a request, and how a decision becomes a response. No I/O here:
the ASGI and WSGI middleware and the gateway do the sending."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate

from oncepay.errors import (
    ClientError,
    IdempotencyKeyReused,
    OncePayError,
    RequestInProgress,
    RequestTooLarge,
    StoreUnavailable,
)
from oncepay.http.problems import Problem, problem_for
from oncepay.idempotency._frozen import quick_init
from oncepay.idempotency.engine import (
    Engine,
    Execute,
    InProgress,
    Invalid,
    Replay,
    Reused,
    Ticket,
)
from oncepay.idempotency.keys import fingerprint, scope_from_authorization
from oncepay.idempotency.records import StoredResponse

__all__ = ["Gate", "Passthrough", "Request", "Respond", "Run"]

log = logging.getLogger("oncepay.http")

# RFC 9110 §7.6.1 hop-by-hop headers belong to one connection, not to the response; Date is
# set anew on every answer and Set-Cookie must never be replayed to whoever sends the key.
NOT_STORED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "date",
        "set-cookie",
    }
)
REPLAYED_HEADER = "idempotent-replayed"
# Neither Stripe nor the IETF draft tells a client when its key lapses; we do, as an HTTP-date.
EXPIRES_HEADER = "idempotency-key-expires"
BODY_OMITTED_HEADER = "idempotent-body-omitted"
# An app (the gateway, say) sets this on a 5xx whose side effect may have happened — the
# upstream timed out after receiving the request. The key then stays locked until its lease
# lapses instead of being released for an immediate, possibly concurrent, second run.
OUTCOME_UNKNOWN_HEADER = "idempotency-outcome"

# SPEC §2: bodies above 1 MiB are refused before anything is stored. Payment requests are a
# few hundred bytes; a megabyte leaves room for rich metadata without inviting abuse.
DEFAULT_MAX_BODY = 1024 * 1024
# Stored responses above this keep status and headers only (see docs/middleware.md): a record
# store is no blob store, and 1 MiB per key times a day of keys adds up fast.
DEFAULT_MAX_RESPONSE = 1024 * 1024


@quick_init
@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Sequence[tuple[str, str]]  # names in lower case, as ASGI gives them

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def target(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Not managed (or failing open): hand the request to the app untouched."""


@quick_init
@dataclass(frozen=True, slots=True)
class Respond:
    """Answer without running the app: a replay or a problem."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


@quick_init
@dataclass(frozen=True, slots=True)
class Run:
    """Run the app, then hand its response to :meth:`Gate.finish`."""

    ticket: Ticket
    expires: str


ScopeFunction = Callable[[Request], str]
Redactor = Callable[[StoredResponse], StoredResponse]


def default_scope(request: Request) -> str:
    return scope_from_authorization(request.header("authorization"))


class Gate:
    """The HTTP policy over an :class:`Engine`, configured once, used per request."""

    def __init__(
        self,
        engine: Engine,
        *,
        methods: Iterable[str] = ("POST", "PATCH"),
        include: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        required: bool = True,
        header: str = "Idempotency-Key",
        aliases: Iterable[str] = (),
        scope: ScopeFunction = default_scope,
        route_ttl: Mapping[str, float] | None = None,
        stripe_compatible: bool = False,
        fail_open: bool = False,
        max_body: int = DEFAULT_MAX_BODY,
        max_response: int = DEFAULT_MAX_RESPONSE,
        redact: Redactor | None = None,
        cacheable: Callable[[int], bool] = lambda status: status < 500,
    ) -> None:
        self.engine = engine
        self.methods = frozenset(m.upper() for m in methods)
        self.include = tuple(include) if include is not None else None
        self.exclude = tuple(exclude)
        self.required = required
        self.headers = (header.lower(), *(a.lower() for a in aliases))
        self.scope = scope
        self.route_ttl = dict(route_ttl or {})
        self.stripe_compatible = stripe_compatible
        self.fail_open = fail_open
        self.max_body = max_body
        self.max_response = max_response
        self.redact = redact
        self.cacheable = cacheable

    # -- which requests -------------------------------------------------------------------------

    def manages(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        if self.include is not None and not _matches(path, self.include):
            return False
        return not (self.exclude and _matches(path, self.exclude))

    def raw_key(self, request: Request) -> str | None:
        for name in self.headers:
            value = request.header(name)
            if value is not None:
                return value
        return None

    def wants_key(self, request: Request) -> bool:
        """Whether the body must be read: the key is present, or absent but required."""
        return self.required or self.raw_key(request) is not None

    def too_large(self) -> Respond:
        return self.problem(
            RequestTooLarge(f"request body exceeds the limit of {self.max_body} bytes")
        )

    # -- the decision ---------------------------------------------------------------------------

    async def decide(
        self, request: Request, body: bytes, *, scope: str | None = None
    ) -> Passthrough | Respond | Run:
        """``scope`` overrides the scope function, for callers that authenticated the tenant
        themselves (the payments API scopes keys by merchant)."""
        parsed = self.engine.parse(self.raw_key(request), required=self.required)
        if parsed is None:
            return Passthrough()
        if isinstance(parsed, Invalid):
            return self.problem(parsed.error)
        ttl = self._ttl_for(request.path) if self.route_ttl else None
        fp = fingerprint(request.method, request.target, body)
        try:
            tenant = self.scope(request) if scope is None else scope
            decision = await self.engine.begin(tenant, parsed, fp, ttl=ttl)
        except StoreUnavailable as exc:
            if self.fail_open:
                log.warning("idempotency store unavailable, failing open: %s", exc.detail)
                return Passthrough()
            return self.problem(exc)
        except ClientError as exc:  # the scope function found no principal (scopes.py)
            return self.problem(exc)
        if isinstance(decision, Execute):
            return Run(decision.ticket, http_date(decision.ticket.expires_at))
        expires = http_date(decision.expires_at) if not isinstance(decision, Invalid) else ""
        if isinstance(decision, Replay):
            return self._replay(decision.response, expires)
        if isinstance(decision, InProgress):
            error: OncePayError = RequestInProgress(
                "a request with this key is still being processed; retry later",
                retry_after=decision.retry_after,
            )
        elif isinstance(decision, Reused):
            error = IdempotencyKeyReused(
                "this key was used for a request with a different method, path or body"
            )
        else:
            error = decision.error
        return self.problem(error, expires)

    def problem(self, error: OncePayError, expires: str = "") -> Respond:
        problem: Problem = problem_for(error, stripe_compatible=self.stripe_compatible)
        headers = problem.headers + ([(EXPIRES_HEADER, expires)] if expires else [])
        return Respond(problem.status, headers, problem.body)

    def _replay(self, response: StoredResponse, expires: str) -> Respond:
        headers = [*response.headers, (REPLAYED_HEADER, "true"), (EXPIRES_HEADER, expires)]
        return Respond(response.status, headers, response.body)

    def _ttl_for(self, path: str) -> float | None:
        for pattern, ttl in self.route_ttl.items():
            if fnmatch.fnmatchcase(path, pattern):
                return ttl
        return None

    # -- after the app answered -----------------------------------------------------------------

    def stored(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        oversized: bool = False,
    ) -> StoredResponse:
        """The response as it is kept for replay; ``oversized`` when the body went past
        ``max_response`` (the caller stopped collecting it)."""
        kept = tuple([(k, v) for k, v in headers if k.lower() not in NOT_STORED])
        if oversized or len(body) > self.max_response:
            log.warning(
                "response body exceeds max_response=%d bytes: stored without its body",
                self.max_response,
            )
            kept = (*_without(kept, "content-length"), ("content-length", "0"))
            kept = (*kept, (BODY_OMITTED_HEADER, "true"))
            body = b""
        response = StoredResponse(status, kept, body)
        return self.redact(response) if self.redact else response

    async def finish(
        self,
        run: Run,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        oversized: bool = False,
    ) -> None:
        """Store a cacheable response, or release the key so that a retry runs again.

        Raises ``StoreUnavailable``/``LeaseLost`` when the response could not be stored: the
        caller must then not report success (the key stays locked until its lease lapses).
        """
        step = self.finishing(run, status, headers, body, oversized=oversized)
        if step is not None:
            await step

    def finishing(
        self,
        run: Run,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        oversized: bool = False,
    ) -> Awaitable[None] | None:
        """:meth:`finish` without a coroutine of its own: the store call it makes, for the
        caller to await (the ASGI middleware, on every request), or None if there is none."""
        headers = headers if isinstance(headers, list) else list(headers)
        if self.cacheable(status):
            return self.engine.complete(run.ticket, self.stored(status, headers, body,
                                                                oversized=oversized))  # fmt: skip
        if any(k.lower() == OUTCOME_UNKNOWN_HEADER and v == "unknown" for k, v in headers):
            key = run.ticket.key
            log.warning("outcome unknown for key %r: kept locked until its lease lapses", key)
            return None
        return self.abandon(run)

    async def abandon(self, run: Run) -> None:
        """Release the key after a 5xx or an exception. A failure to release is logged, not
        raised: the key then frees itself when its lease lapses, and nothing was stored."""
        try:
            await self.engine.release(run.ticket)
        except OncePayError as exc:
            log.warning("could not release idempotency key after an error: %s", exc.detail)


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in patterns)


def _without(headers: Iterable[tuple[str, str]], name: str) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers if k.lower() != name)


def http_date(timestamp: float) -> str:
    """An IMF-fixdate, remembered for the last second asked: formatdate costs ~3 us and
    every managed response asks for one, mostly for the same second."""
    second = int(timestamp)
    if _last_date[0] != second:
        _last_date[:] = [second, formatdate(second, usegmt=True)]
    return str(_last_date[1])


_last_date: list[object] = [None, ""]
