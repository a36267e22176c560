"""What every HTTP surface shares: which requests are managed, how a key, scope and
fingerprint are read from a request, and how a decision becomes a response. No I/O here:
the ASGI and WSGI middleware and the gateway do the sending.

This module is also the seam between ``oncepay.http`` and the payments service: the payments
API drives the same :class:`Gate` (``decide`` with the merchant as scope, then ``finish`` or
``abandon``) so that its decision table is the middleware's, not a copy. It is a stable
contract inside OncePay, not part of the user-facing surface (``oncepay.http.__all__``): a
change to :class:`Gate`, :class:`Request`, :class:`Run`, :class:`Respond` or
:class:`Passthrough` is a change to both."""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import formatdate

from oncepay._drivers.frozen import quick_init
from oncepay.errors import (
    ClientError,
    ConfigurationError,
    IdempotencyKeyInvalid,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
    LeaseLost,
    OncePayError,
    RequestInProgress,
    RequestTooLarge,
    StoreUnavailable,
)
from oncepay.http.problems import Problem, problem_for
from oncepay.idempotency.engine import (
    Decision,
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
from oncepay.idempotency.stores.base import TransactionalStore
from oncepay.insight.ttl_policy import TtlPolicy
from oncepay.insight.usage_log import UsageSink

__all__ = [
    "Claimable",
    "Gate",
    "NotExecuted",
    "Passthrough",
    "Request",
    "Respond",
    "RouteTemplate",
    "Run",
    "default_cacheable",
    "fastapi_validation_error",
]

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
# The same names as ASGI spells them (lower-case bytes), to filter a response before decoding it.
_NOT_STORED_RAW = frozenset(name.encode() for name in NOT_STORED)
REPLAYED_HEADER = "idempotent-replayed"
# Neither Stripe nor the IETF draft tells a client when its key lapses; we do, as an HTTP-date.
EXPIRES_HEADER = "idempotency-key-expires"
_EXPIRES_RAW = EXPIRES_HEADER.encode()
BODY_OMITTED_HEADER = "idempotent-body-omitted"
# An app (the gateway, say) sets this on a 5xx whose side effect may have happened — the
# upstream timed out after receiving the request. The key then stays locked until its lease
# lapses instead of being released for an immediate, possibly concurrent, second run.
OUTCOME_UNKNOWN_HEADER = "idempotency-outcome"


class OutcomeUnknown(Exception):
    """Raised by an app (the gateway) whose response broke off after its side effect may have
    happened — the upstream answered, then dropped the connection mid-body. The middleware
    then keeps the key locked until its lease lapses, as for ``Idempotency-Outcome: unknown``,
    instead of releasing it as it does for any other exception (one that means the app
    failed before acting, or rolled back)."""


# The same header's other value: on a 4xx or 5xx, "refused before anything ran" (a validation
# error, an authorization failure). Nothing is stored and the key is released, so the client
# may fix its request and send it again under the same key.
NOT_EXECUTED = "not-executed"
# "Not now, nothing ran, try again": 408 (RFC 9110 §15.5.9), 425 Too Early (RFC 8470) and 429
# (RFC 6585). Storing one would answer every retry with it (OncePay's own client retries 429
# with the same key); 5xx are never stored anyway (503 included).
NOT_NOW = frozenset({408, 425, 429})

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
    source: str | None = None  # the client's address, for the key-usage log
    template: str | None = None  # the route template, when routed before the gate (payments)

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


@quick_init
@dataclass(frozen=True, slots=True)
class Claimable:
    """A request the gate has read and would claim: its tenant, key, fingerprint and the TTL
    a new record gets (``fixed``: the one a learned TTL replaces, for the policy's count).
    :meth:`Gate.prepare` hands it to a caller that claims inside its own transaction
    (``Engine.aclaim_in``), then calls :meth:`Gate.claimed`, or :meth:`Gate.claim` when
    the key turned out to have a record; :meth:`Gate.decide` is ``prepare`` then ``claim``."""

    tenant: str
    key: str
    fingerprint: str
    ttl: float | None
    fixed: float | None = None


ScopeFunction = Callable[[Request], str]
# The route template a request matched (``/v1/payments/{id}``), for the key-usage log; None
# when unknown (the path is logged then).
RouteTemplate = Callable[[Request], str | None]
Redactor = Callable[[StoredResponse], StoredResponse]
# Whether a 4xx/5xx answer (status, headers, body) says the app refused before anything ran.
NotExecuted = Callable[[int, Sequence[tuple[str, str]], bytes], bool]


def default_scope(request: Request) -> str:
    return scope_from_authorization(request.header("authorization"))


def default_cacheable(status: int) -> bool:
    """Which answers are stored: everything below 500 but the "not now" statuses."""
    return status < 500 and status not in NOT_NOW


# Where FastAPI says a RequestValidationError was found: the request's parts, never a handler's.
_FASTAPI_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


def fastapi_validation_error(status: int, headers: Sequence[tuple[str, str]], body: bytes) -> bool:
    """FastAPI's own answer to a request that failed validation before the endpoint ran: a 422
    ``{"detail": [{"type", "loc", "msg", ...}, ...]}`` whose every ``loc`` starts with a part of
    the request. Recognised by its shape, so that the core never imports FastAPI; an app with
    its own RequestValidationError handler sets ``Idempotency-Outcome: not-executed`` instead.
    """
    if status != 422 or not body.startswith(b'{"detail":['):
        return False
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # echoed input can be as deep or long as the request's
        return False
    errors = document.get("detail") if len(document) == 1 else None
    return isinstance(errors, list) and bool(errors) and all(map(_is_request_error, errors))


def _is_request_error(error: object) -> bool:
    if not isinstance(error, dict) or not {"type", "loc", "msg"} <= error.keys():
        return False
    loc = error["loc"]
    return isinstance(loc, list) and bool(loc) and loc[0] in _FASTAPI_LOCATIONS


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
        cacheable: Callable[[int], bool] = default_cacheable,
        not_executed: NotExecuted | None = fastapi_validation_error,
        fingerprint_secret: bytes | str | None = None,
        transactional: bool = False,
        usage_log: UsageSink | None = None,
        route_template: RouteTemplate | None = None,
        ttl_policy: TtlPolicy | None = None,
    ) -> None:
        if transactional and not isinstance(engine.store, TransactionalStore):
            raise ConfigurationError(
                f"transactional=True: {type(engine.store).__name__} cannot complete inside the "
                "app's transaction; use the SQLite or PostgreSQL store in the app's database"
            )
        self.engine = engine
        self.methods = frozenset(m.upper() for m in methods)
        self.include = tuple(include) if include is not None else None
        self.exclude = tuple(exclude)
        self.required = required
        self.headers = (header.lower(), *(a.lower() for a in aliases))
        self.scope = scope
        self.route_ttl = _checked_route_ttl(route_ttl or {}, engine.lease)
        # Learned TTLs (SPEC §9, opt-in) for new records, the fixed ones their fallback.
        self.ttl_policy = _checked_policy(ttl_policy, engine.lease)
        self.stripe_compatible = stripe_compatible
        self.fail_open = fail_open
        self.max_body = max_body
        self.max_response = max_response
        self.redact = redact
        self.cacheable = cacheable
        self.not_executed = not_executed
        secret = fingerprint_secret
        self.secret = secret.encode() if isinstance(secret, str) else secret
        # The app completes records in its own transaction (oncepay.http.transaction), and how
        # often what it sent was not what it completed (each one also logged as an error).
        self.transactional = transactional
        self.mismatches = 0
        # SPEC §9: every decision recorded (off the hot path: the sink only buffers it).
        self.usage_log = usage_log
        self.route_template = route_template
        # Templates the app's router reported for paths it served (see executed()): a replay
        # or a 409 never reaches the router, so its template is looked up here.
        self._templates: dict[str, str] = {}

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

    def key(self, request: Request) -> str | Invalid | None:
        """The key the request names; ``None`` when absent and optional; ``Invalid`` when
        malformed, or sent twice: an Idempotency-Key is one RFC 8941 Item, one line."""
        for index, name in enumerate(self.headers):
            values = [value for header, value in request.headers if header == name]
            if len(values) > 1:
                return Invalid(
                    IdempotencyKeyInvalid(f"{len(values)} {name} header lines: send one")
                )
            if values:
                # An alias beside the key (or two aliases): which one is meant is a guess,
                # as with two lines of one header.
                also = [h for h in self.headers[index + 1 :] if request.header(h) is not None]
                if also:
                    return Invalid(
                        IdempotencyKeyInvalid(f"both {name} and {also[0]} sent: send one key")
                    )
                return (
                    self.engine.parse(values[0], required=True)
                    if _single(values[0])
                    else (Invalid(IdempotencyKeyInvalid(_FOLDED)))
                )
        return self.engine.parse(None, required=self.required)

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
        prepared = self.prepare(request, body, scope=scope)
        if not isinstance(prepared, Claimable):
            return prepared
        return await self.claim(request, prepared)

    async def claim(self, request: Request, claimable: Claimable) -> Passthrough | Respond | Run:
        """The second half of :meth:`decide`: claim what :meth:`prepare` read through the
        engine, and answer its decision (also for a caller whose own claim in its
        transaction found that the key has a record)."""
        tenant, key, fp, ttl = claimable.tenant, claimable.key, claimable.fingerprint, claimable.ttl
        try:
            decision = await self.engine.begin(tenant, key, fp, ttl=ttl)
        except OncePayError as exc:
            return self.failed(exc)
        if isinstance(decision, Execute):
            if self.ttl_policy is not None and not decision.ticket.resumed:
                # A new record is counted in the policy's savings (a takeover keeps the old
                # record's expiry: not counted).
                assert ttl is not None  # prepare() sets both with a policy
                assert claimable.fixed is not None
                self.ttl_policy.stored(ttl, claimable.fixed)
            return Run(decision.ticket, http_date(decision.ticket.expires_at))
        answer = self._answer(decision)
        if self.usage_log is not None:
            kind = _KINDS.get(type(decision)) or _invalid_kind(decision)
            self._note(request, tenant, key, fp, kind, answer.status, ttl)
        return answer

    def prepare(
        self, request: Request, body: bytes, *, scope: str | None = None
    ) -> Passthrough | Respond | Claimable:
        """What :meth:`decide` reads before it claims, for a caller that claims a new key
        inside its own transaction: a :class:`Claimable`, or the answer when there is nothing
        to claim (no key, an invalid one, no tenant)."""
        parsed = self.key(request)
        if parsed is None:
            return Passthrough()
        if isinstance(parsed, Invalid):
            refused = self.problem(parsed.error)
            if self.usage_log is not None:
                self._note_invalid(request, parsed, refused.status, scope)
            return refused
        ttl = self._ttl_for(request.path) if self.route_ttl else None
        query = request.query  # request.target and default_scope spelled out (every request)
        target = f"{request.path}?{query}" if query else request.path
        fp = fingerprint(request.method, target, body, secret=self.secret)
        try:
            tenant = (
                scope
                if scope is not None
                else scope_from_authorization(request.header("authorization"))
                if self.scope is default_scope
                else self.scope(request)
            )
        except OncePayError as exc:
            return self.failed(exc)
        if self.ttl_policy is None:  # the policy off costs this one check
            return Claimable(tenant, parsed, fp, ttl)
        learned, fixed = self._learned_ttl(self.ttl_policy, request, tenant, ttl)
        return Claimable(tenant, parsed, fp, learned, fixed)

    def claimed(self, claimable: Claimable, ticket: Ticket) -> Run:
        """The run of a key the caller claimed itself (``Engine.aclaim_in`` said it was new),
        counted as :meth:`decide` counts a new record."""
        if self.ttl_policy is not None and claimable.ttl is not None:
            assert claimable.fixed is not None  # prepare() sets both with a policy
            self.ttl_policy.stored(claimable.ttl, claimable.fixed)
        return Run(ticket, http_date(ticket.expires_at))

    def failed(self, exc: OncePayError) -> Passthrough | Respond:
        """The answer when deciding raised ``exc``, before anything ran (call it in the
        ``except``): a 503 or, failing open, a pass-through for a store outage; a problem for
        the rest."""
        if isinstance(exc, StoreUnavailable):
            if self.fail_open:
                log.warning("idempotency store unavailable, failing open: %s", exc.detail)
                return Passthrough()
            # The client's 503 says only that the store could not be reached (problems.py).
            log.warning("idempotency store unavailable, answering 503: %s", exc.detail)
            return self.problem(exc)
        if not isinstance(exc, ClientError):  # a configuration error found only now, say
            log.exception("idempotency failed before the request ran: %s", exc.detail)
        return self.problem(exc)  # a ClientError: the scope function found no principal

    def answer(self, decision: Decision) -> Respond | Run:
        """:meth:`decide`'s outcome for an engine's decision (without the key-usage log)."""
        if isinstance(decision, Execute):
            return Run(decision.ticket, http_date(decision.ticket.expires_at))
        return self._answer(decision)

    def _answer(self, decision: Replay | InProgress | Reused | Invalid) -> Respond:
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

    # -- the key-usage log (SPEC §9) -----------------------------------------------------------

    def executed(
        self, request: Request, run: Run, status: int, template: str | None = None
    ) -> None:
        """Record that ``run`` executed and ``status`` was answered; ``template`` is the route
        the app's router matched, when the surface can tell (it is remembered for the path)."""
        if self.usage_log is None:
            return
        if template is not None and template != request.path:
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()  # paths with ids are many: start over, never grow
            self._templates[request.path] = template
        ticket = run.ticket
        ttl = self._ttl_for(request.path) if self.route_ttl else None
        if self.ttl_policy is not None:
            ttl = self._learned_ttl(self.ttl_policy, request, ticket.scope, ttl)[0]
        self._note(request, ticket.scope, ticket.key, ticket.fingerprint, "executed", status, ttl)

    def _note(
        self,
        request: Request,
        tenant: str,
        key: str,
        fp: str,
        kind: str,
        status: int,
        ttl: float | None,
    ) -> None:
        assert self.usage_log is not None
        self.usage_log.record(
            tenant,
            self._route(request),
            key,
            fp,
            kind,
            status,
            request.source,
            self.engine.ttl if ttl is None else ttl,
        )

    def _note_invalid(
        self, request: Request, parsed: Invalid, status: int, scope: str | None
    ) -> None:
        """A missing or malformed key: no fingerprint was taken; the tenant if it is known."""
        try:
            tenant = self.scope(request) if scope is None else scope
        except OncePayError:
            tenant = ""
        key = self.raw_key(request) or ""
        assert self.usage_log is not None
        kind, route = _invalid_kind(parsed), self._route(request)
        # No record was stored: no TTL (``null``, as docs/insight.md says).
        self.usage_log.record(tenant, route, key, "", kind, status, request.source, None)

    def _route(self, request: Request) -> str:
        """``METHOD template``: the request's own, else the user's route function's, else the
        one the router reported for the path, else the path."""
        template = request.template
        if template is None and self.route_template is not None:
            template = self.route_template(request)
        elif template is None and self._templates:
            template = self._templates.get(request.path)
        return f"{request.method} {template or request.path}"

    def problem(self, error: OncePayError, expires: str = "") -> Respond:
        problem: Problem = problem_for(error, stripe_compatible=self.stripe_compatible)
        headers = problem.headers + ([(EXPIRES_HEADER, expires)] if expires else [])
        return Respond(problem.status, headers, problem.body)

    def _replay(self, response: StoredResponse, expires: str) -> Respond:
        headers = [*response.headers, (REPLAYED_HEADER, "true"), (EXPIRES_HEADER, expires)]
        return Respond(response.status, headers, response.body)

    def _learned_ttl(
        self, policy: TtlPolicy, request: Request, tenant: str, ttl: float | None
    ) -> tuple[float, float]:
        """(the TTL to store with, the fixed one it replaces) for a new record."""
        fixed = self.engine.ttl if ttl is None else ttl
        return policy.ttl_for(tenant, self._route(request), fixed), fixed

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
        return self._kept(status, kept, body, oversized)

    def _kept(
        self, status: int, kept: tuple[tuple[str, str], ...], body: bytes, oversized: bool
    ) -> StoredResponse:
        """:meth:`stored` once the headers not to store are gone."""
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
        if status >= 400 and self._refused(status, headers, body):
            return self.abandon(run)
        if self.cacheable(status):
            return self.engine.complete(
                run.ticket, self.stored(status, headers, body, oversized=oversized)
            )
        if _outcome(headers) == "unknown":
            key = run.ticket.key
            log.warning("outcome unknown for key %r: kept locked until its lease lapses", key)
            return None
        return self.abandon(run)

    def finishing_raw(
        self,
        run: Run,
        status: int,
        raw_headers: Iterable[tuple[bytes, bytes]],
        body: bytes,
        *,
        oversized: bool = False,
    ) -> Awaitable[None] | None:
        """:meth:`finishing` for the headers as ASGI sends them (bytes, our expiry header
        among them, which is never stored). The usual answer, a cacheable one below 400, is
        decoded and filtered in one pass; any other goes the general way."""
        if status < 400 and self.cacheable(status):
            kept = tuple(
                [
                    (k.decode("latin-1"), v.decode("latin-1"))
                    for k, v in raw_headers
                    if k != _EXPIRES_RAW and k.lower() not in _NOT_STORED_RAW
                ]
            )
            return self.engine.complete(run.ticket, self._kept(status, kept, body, oversized))
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers if k != _EXPIRES_RAW
        ]
        return self.finishing(run, status, headers, body, oversized=oversized)

    def keeps(self, status: int, headers: list[tuple[str, str]], body: bytes | None = None) -> bool:
        """Whether an answer that ran is stored under its key (:meth:`finishing` completes the
        record rather than releasing it or leaving it locked): only such an answer says when
        the key expires. ``body`` None: judged before the body is known (a streamed answer)."""
        if status >= 400 and (
            _outcome(headers) == NOT_EXECUTED
            if body is None
            else self._refused(status, headers, body)
        ):
            return False
        return self.cacheable(status)

    def _refused(self, status: int, headers: list[tuple[str, str]], body: bytes) -> bool:
        """Whether the app refused the request before anything ran (nothing to store)."""
        if _outcome(headers) == NOT_EXECUTED:
            return True
        return self.not_executed is not None and self.not_executed(status, headers, body)

    def unstored(self, run: Run, error: OncePayError) -> None:
        """Log why a response that ran could not be stored; call it in the ``except``."""
        key = run.ticket.key
        if isinstance(error, LeaseLost):
            log.warning(
                "response not stored: its lease ran out and a newer attempt holds key %r "
                "(a retry gets that attempt's answer)",
                key,
            )
        else:
            log.exception(
                "response could not be stored; key %r stays locked until its lease lapses", key
            )

    async def abandon(self, run: Run) -> None:
        """Release the key after a 5xx or an exception. A failure to release is logged, not
        raised: the key then frees itself when its lease lapses, and nothing was stored."""
        try:
            await self.engine.release(run.ticket)
        except OncePayError as exc:
            log.warning("could not release idempotency key after an error: %s", exc.detail)


# How many path -> template pairs a gate remembers: a day of refund paths would be millions.
_MAX_TEMPLATES = 10_000
_KINDS: dict[type, str] = {Replay: "replayed", InProgress: "in_progress", Reused: "reused"}


def _invalid_kind(decision: object) -> str:
    missing = isinstance(decision, Invalid) and isinstance(decision.error, IdempotencyKeyMissing)
    return "missing" if missing else "invalid"


def _checked_route_ttl(route_ttl: Mapping[str, float], lease: float) -> dict[str, float]:
    """The per-route TTLs, each longer than the lease: refused at start-up, naming the route,
    rather than failing every request on that route later."""
    for pattern, ttl in route_ttl.items():
        if not 0 < lease < ttl:
            raise ConfigurationError(
                f"route_ttl[{pattern!r}] is {ttl}s, not longer than the lease ({lease}s): a "
                "record on that route would expire while its request still runs"
            )
    return dict(route_ttl)


def _checked_policy(policy: TtlPolicy | None, lease: float) -> TtlPolicy | None:
    """A policy whose shortest TTL outlasts the lease: refused at start-up otherwise."""
    if policy is not None and not policy.minimum > lease:
        raise ConfigurationError(
            f"the adaptive TTL minimum ({policy.minimum}s) must be longer than the lease "
            f"({lease}s): a record would expire while its request still runs"
        )
    return policy


_FOLDED = (
    "Idempotency-Key holds a comma: two header lines folded into one? Send one key, quoted "
    '("a,b") if the comma belongs to it'
)


def _single(value: str) -> bool:
    """Whether a key header's value cannot be two lines folded into one: a bare key with a
    comma may be exactly that (RFC 9110 §5.3; WSGI servers fold repeats so), a quoted one not."""
    return "," not in value or value.lstrip(" \t").startswith('"')


def _outcome(headers: Iterable[tuple[str, str]]) -> str | None:
    """The app's ``Idempotency-Outcome``, if it sent one."""
    for name, value in headers:
        if name.lower() == OUTCOME_UNKNOWN_HEADER:
            return value.strip().lower()
    return None


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
