"""The simulated acquirer called as a function, for a payments process that embeds it: the
same operations as its HTTP routes (same validation, fingerprints, idempotency by reference,
faults and answers, byte for byte), without an HTTP request in between.

:func:`call` takes the request an HTTP client would send — the path, the JSON body as a dict,
the ``Idempotency-Key`` — and answers its status and body. A fault that drops the connection
raises :class:`~oncepay.simulator.faults.ConnectionDropped`, as the HTTP route's answer breaks
off; a stall after the commit sleeps in the caller's task, which its own timeout cancels (the
operation itself runs to its end, as under a server)."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import unquote

from starlette.responses import Response

from oncepay.simulator.bodies import AmountBody, AuthorizeBody, LookupBody, VoidBody, parse_payload
from oncepay.simulator.documents import Answer
from oncepay.simulator.faults import ConnectionDropped, is_dropped
from oncepay.simulator.money import run_authorize, run_follow_on
from oncepay.simulator.problems import Problem, problem
from oncepay.simulator.references import run_lookup
from oncepay.simulator.state import Simulator

__all__ = ["call"]

_FOLLOW_ONS: dict[str, Literal["capture", "void", "refund"]] = {
    "capture": "capture",
    "void": "void",
    "refunds": "refund",
}


async def call(
    sim: Simulator, path: str, payload: dict[str, Any], key: str
) -> tuple[int, bytes, dict[str, Any] | None]:
    """The answer to ``POST path`` with ``payload`` as its JSON body and ``key`` as its
    ``Idempotency-Key``: (status, body, the body's document when this call made it, else
    None: the body is what the HTTP route answers, byte for byte, either way)."""
    try:
        response = await _route(sim, unquote(path), payload, key)
    except Problem as exc:  # the app's one exception handler, as over HTTP
        response = problem(exc.status, exc.code, exc.detail, **exc.extra)
    if is_dropped(response):
        raise ConnectionDropped("fault injection: connection dropped after commit")
    document = response.document if isinstance(response, Answer) else None
    return response.status_code, bytes(response.body), document


async def _route(sim: Simulator, path: str, payload: dict[str, Any], key: str) -> Response:
    if path == "/v1/authorizations":
        body, fingerprint = parse_payload(path, payload, AuthorizeBody, key)
        return await run_authorize(sim, body, fingerprint)
    if path == "/v1/lookups":
        lookup, _ = parse_payload(path, payload, LookupBody, key)
        return await run_lookup(sim, lookup)
    root, _, rest = path.partition("/v1/authorizations/")
    authorization_id, _, action = rest.partition("/")
    kind = _FOLLOW_ONS.get(action)
    if root or not authorization_id or kind is None:
        raise Problem(404, "not_found", "Not Found")
    model: type[AmountBody] | type[VoidBody] = VoidBody if kind == "void" else AmountBody
    follow_on, fingerprint = parse_payload(path, payload, model, key)
    return await run_follow_on(sim, kind, authorization_id, follow_on, fingerprint)
