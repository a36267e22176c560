"""What every route of the payments API shares (as in full-stack-fastapi-template's
``api/deps.py``): the services and merchant dependencies, problem responses, the query-string
check and the idempotent request helpers."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Query, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPBearer

from oncepay.errors import OncePayError
from oncepay.http.gate import Request as GateRequest
from oncepay.http.problems import PROBLEM_CONTENT_TYPE
from oncepay.idempotency.engine import Invalid
from oncepay.payments import models
from oncepay.payments.api.accesslog import DECISION
from oncepay.payments.api.jsonbody import StrictJsonRoute
from oncepay.payments.context import Services
from oncepay.payments.errors import InvalidRequest, OperatorOnly, ResourceMissing
from oncepay.payments.idempotent import Work, gated
from oncepay.payments.idempotent import idempotent as run_idempotent
from oncepay.payments.idempotent import idempotent_local as run_idempotent_local
from oncepay.payments.merchants import authenticate, require_scope
from oncepay.payments.phases import Operation
from oncepay.payments.reads import PageQuery, Range
from oncepay.payments.records import Merchant
from oncepay.payments.reply import Reply

__all__ = [
    "DEFAULT_LIMIT",
    "KEY_HEADER",
    "POST",
    "PROBLEMS",
    "Limit",
    "MerchantDep",
    "OperatorDep",
    "PageDep",
    "ServicesDep",
    "direct",
    "idempotent",
    "idempotent_local",
    "known_query_only",
    "operator_required",
    "problem_response",
    "resource_router",
    "send",
]

# Stripe's default page is 10 and its ceiling 100; so are ours.
DEFAULT_LIMIT = 10
MAX_LIMIT = 100

bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")

PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {
        "model": models.Problem,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "description": description,
    }
    for status, description in {
        400: "Malformed request or Idempotency-Key",
        401: "Missing or invalid API key",
        403: "A restricted API key used outside its scopes",
        402: "The acquirer refused a capture or a void",
        404: "No such object (or another merchant's)",
        409: "Invalid state transition, or the key's first request is still running",
        413: "Request body too large",
        422: "Idempotency-Key reused with a different request",
        429: "Rate limit reached: retry after Retry-After seconds (nothing ran)",
        503: "Acquirer outcome unknown or store unavailable: retry with the same key",
    }.items()
}
KEY_HEADER = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": True,
    "description": "1-255 printable ASCII characters; a token or an RFC 8941 sf-string.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}


# What every POST route declares: its problems, and the Idempotency-Key it requires.
POST: dict[str, Any] = {"responses": PROBLEMS, "openapi_extra": {"parameters": [KEY_HEADER]}}


def problem_response(error: OncePayError) -> Response:
    return send(Reply.problem(error))


def send(reply: Reply, request: Request | None = None) -> Response:
    if request is not None and reply.decision is not None:
        request.scope.setdefault("state", {})[DECISION] = reply.decision  # the access log's
    response = Response(reply.body, reply.status)
    for name, value in reply.headers:
        if name.lower() != "content-length":
            response.headers.append(name, value)
    return response


# -- dependencies --------------------------------------------------------------------------------


# Dependencies are ``async def`` even when they await nothing: FastAPI runs a plain ``def`` on
# a worker thread, a hop that costs more than any of them.
async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(_services)]


Credentials = Annotated[Any, Security(bearer)]  # documents bearer auth in the OpenAPI


async def _merchant(request: Request, services: ServicesDep, credentials: Credentials) -> Merchant:
    merchant = await authenticate(services, request.headers.get("authorization"))
    # Before any idempotency key is claimed: a 429 stores nothing (api/ratelimit.py).
    await request.app.state.rate_limits.check(merchant.key_id, merchant.id)
    template = getattr(request.scope.get("route"), "path_format", None)
    require_scope(merchant, template or request.url.path, request.method)
    _refuse_unknown_query(request)  # only now: see known_query_only
    return merchant


MerchantDep = Annotated[Merchant, Depends(_merchant)]


async def _operator(request: Request, services: ServicesDep, credentials: Credentials) -> None:
    """The operator token (``ONCEPAY_ADMIN_TOKEN``, SPEC §11) guards the operator API: a
    bearer token compared in constant time. With no token configured the operator API does
    not exist (404), so a forgotten setting never leaves it open."""
    expected = services.settings.admin_token
    if not expected:
        raise ResourceMissing("the operator API is off: set ONCEPAY_ADMIN_TOKEN to turn it on")
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), expected.encode()
    ):
        raise OperatorOnly("send the operator token as 'Authorization: Bearer <token>'")
    _refuse_unknown_query(request)


# Every operator route depends on this: ``router = resource_router(operator=True)``.
OperatorDep = Annotated[None, Depends(_operator)]


async def operator_required(request: Request, services: Services) -> None:
    """The operator token check where a route needs it only sometimes (``/metrics`` with
    ``ONCEPAY_METRICS_REQUIRE_TOKEN``)."""
    await _operator(request, services, None)


Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


# Unix seconds up to the year 5138: a larger number is a mistake (milliseconds), not a time.
MAX_TIME = 10**11
Cursor = Annotated[
    str | None,
    Query(max_length=64, description="An object id of this list (the cursor), e.g. pay_…"),
]


def _seconds(bound: str) -> Any:
    return Query(
        alias=f"created[{bound}]", ge=0, le=MAX_TIME, description=f"created {bound} (Unix s)"
    )


async def _created(
    gt: Annotated[int | None, _seconds("gt")] = None,
    gte: Annotated[int | None, _seconds("gte")] = None,
    lt: Annotated[int | None, _seconds("lt")] = None,
    lte: Annotated[int | None, _seconds("lte")] = None,
) -> Range:
    return Range(gt, gte, lt, lte)


async def _page_query(
    created: Annotated[Range, Depends(_created)],
    limit: Limit = DEFAULT_LIMIT,
    starting_after: Cursor = None,
    ending_before: Cursor = None,
) -> PageQuery:
    return PageQuery(limit, starting_after, ending_before, created)


PageDep = Annotated[PageQuery, Depends(_page_query)]  # the query string every list takes


async def known_query_only(request: Request) -> None:
    """Unknown query parameters are refused, like unknown body fields (Stripe does the same):
    a misspelt ``limt=5`` must not silently mean the default. On a route that authenticates
    the merchant this runs after authentication instead (in the merchant dependency), so a
    caller without a valid key gets 401 whatever its query says, as for FastAPI's own query
    checks, which run after every dependency."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is not None and not _authenticates(dependant):
        _refuse_unknown_query(request)


def _refuse_unknown_query(request: Request) -> None:
    """Unknown query parameters are refused, and so is a NUL character in any parameter, path
    or query: PostgreSQL refuses one in text, so it names nothing (a path's id: 404; a query
    parameter: 400), where it would otherwise fail the statement that carries it."""
    for name, value in request.path_params.items():
        if isinstance(value, str) and "\x00" in value:
            raise ResourceMissing(f"{name}: no id has a NUL character")
    query = request.scope.get("query_string")
    if query and b"%00" in query:
        for name, value in request.query_params.multi_items():
            if "\x00" in name or "\x00" in value:
                raise InvalidRequest(f"{name!r}: a NUL character is not allowed")
    dependant = getattr(request.scope.get("route"), "dependant", None)
    if dependant is None or not query:
        return  # no query string (every POST, most reads): nothing can be unknown
    known = {param.alias for param in _all_query_params(dependant)}
    deep = _deep_objects(request)  # metadata[key]=value: any key of a declared deepObject
    unknown = sorted(
        name
        for name in set(request.query_params) - known
        if not (name.endswith("]") and name.partition("[")[0] in deep)
    )
    if unknown:
        raise InvalidRequest(f"unknown query parameter(s): {', '.join(unknown)}")
    # Each parameter once, as each JSON key once (jsonbody.py): ``limit=1&limit=100`` would
    # otherwise mean whichever one the framework keeps, and a proxy may keep the other.
    names = [name for name, _ in request.query_params.multi_items()]
    if len(names) != len(set(names)):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise InvalidRequest(f"query parameter(s) given more than once: {', '.join(twice)}")


def _deep_objects(request: Request) -> set[str]:
    """The query parameters a route documents as ``style: deepObject`` (in its
    ``openapi_extra``): their keys are free, so FastAPI cannot declare them one by one."""
    extra = getattr(request.scope.get("route"), "openapi_extra", None) or {}
    return {
        param["name"]
        for param in extra.get("parameters", ())
        if param.get("in") == "query" and param.get("style") == "deepObject"
    }


def _all_query_params(dependant: Any) -> list[Any]:
    found = list(dependant.query_params)
    for sub in dependant.dependencies:
        found.extend(_all_query_params(sub))
    return found


def _authenticates(dependant: Any) -> bool:
    return bool(_calls(dependant) & {_merchant, _operator})


async def idempotent(
    request: Request, services: Services, merchant: Merchant, op: Operation
) -> Response:
    body = await request.body()
    reply = await run_idempotent(services, gate_request(request), body, merchant, op)
    return send(reply, request)


async def idempotent_local(
    request: Request,
    services: Services,
    merchant: Merchant,
    work: Work,
) -> Response:
    body = await request.body()
    reply = await run_idempotent_local(services, gate_request(request), body, merchant, work)
    return send(reply, request)


async def key_first(request: Request, merchant: Merchant | None = None) -> Response | None:
    """SPEC §2's first row before the body's checks: a merchant's POST whose body (or path)
    does not validate, sent with no ``Idempotency-Key`` or a malformed one, is answered as
    the key's problem (400 ``idempotency_key_missing`` / ``_invalid``), counted and logged as
    that decision, as it would be with a good body. None when the key is good (the body's
    problem stands) or the caller is no merchant."""
    services: Services = request.app.state.services
    if not isinstance(services.engine.parse(request.headers.get("idempotency-key")), Invalid):
        return None
    if merchant is None:
        try:
            merchant = await authenticate(services, request.headers.get("authorization"))
        except OncePayError:
            return None  # the operator API, say: its own checks answer

    async def never(_: Any) -> Reply:
        raise AssertionError("a request without a good key is never executed")

    # No body: a request without a good key is never fingerprinted (and the body's stream was
    # read by the route; this handler's request object has no copy of it).
    return send(await gated(services, gate_request(request), b"", merchant, never), request)


def gate_request(request: Request) -> GateRequest:
    client = request.client
    return GateRequest(
        request.method,
        request.url.path,
        request.url.query,
        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]],
        client.host if client else None,  # for the key-usage log: the client, the route
        getattr(request.scope.get("route"), "path_format", None),
    )


# Endpoints taking (body, request, services, merchant) and nothing else, answered without
# FastAPI's request handler when the request is plain (see ApiRoute.answer_directly).
_DIRECT: set[Callable[..., Awaitable[Response]]] = set()

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])


def direct(endpoint: Endpoint) -> Endpoint:
    """Mark an endpoint ``(body, request, services, merchant)`` (the decorator below the
    route's): a plain request to it — no query string, a body that validates — is answered
    without FastAPI's dependency solving, which cost some 7 % of a payment's CPU in the
    service (``bench/e2e/PROFILE.md``). Anything else goes through FastAPI as before."""
    _DIRECT.add(endpoint)
    return endpoint


class ApiRoute(StrictJsonRoute):
    """Every route of the API: a bad body is answered only once the caller is known (401
    before 400 or 415, as for FastAPI's own checks, which run after the dependencies)."""

    async def answer_directly(self, request: Request) -> Response | None:
        """A :func:`direct` endpoint's plain request, answered as FastAPI would: the merchant
        dependency (authentication, rate limit, scope) then the endpoint. The body is
        validated first, by the route's own field (FastAPI's validation exactly), and only
        for a request FastAPI would hand the endpoint: a query string (refused or not by the
        unknown-query check), an empty body or one that does not validate goes to FastAPI,
        which answers it in its order (401 before 422). Nothing has been counted or claimed
        when it does."""
        if self.endpoint not in _DIRECT or request.scope.get("query_string"):
            return None
        parsed = getattr(request, "_json", None)
        if parsed is None or self.body_field is None:
            return None
        body, errors = self.body_field.validate(parsed, {}, loc=("body",))
        if errors:
            return None
        services: Services = request.app.state.services
        merchant = await _merchant(request, services, None)
        answer: Response = await self.endpoint(body, request, services, merchant)
        return answer

    async def before_refusing(self, request: Request) -> Response | None:
        calls = _calls(self.dependant)
        services: Services = request.app.state.services
        if _operator in calls:
            await _operator(request, services, None)
        elif _merchant in calls:
            caller = await authenticate(services, request.headers.get("authorization"))
            await request.app.state.rate_limits.check(caller.key_id, caller.id)  # it counts
            require_scope(caller, self.path_format, request.method)  # 403 before 400 too
            if request.method == "POST":
                return await key_first(request, caller)  # the key's problem before the body's
        return None


def _calls(dependant: Any) -> set[Any]:
    found = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= _calls(sub)
    return found


def resource_router(prefix: str = "", *, operator: bool = False) -> APIRouter:
    """A resource's router: its routes read JSON by one rule and refuse unknown query
    parameters. ``operator=True``: every route needs the operator token (the operator API,
    under ``/v1/admin``, hidden from the merchants' OpenAPI document)."""
    dependencies = [Depends(_operator)] if operator else [Depends(known_query_only)]
    return APIRouter(
        prefix=prefix,
        route_class=ApiRoute,
        dependencies=dependencies,
        include_in_schema=not operator,
    )
