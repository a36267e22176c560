"""The operator dashboard (SPEC §11, docs/dashboard.md): server-rendered pages under
``/dashboard`` behind the operator token, live through server-sent events, every asset shipped
in the package (it works offline). Actions go through the operator API, in process, under an
Idempotency-Key minted when the form was drawn, so a double click or a resent form acts once."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import httpx
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates

from oncepay.errors import OncePayError
from oncepay.idempotency.keys import parse_key
from oncepay.payments.context import Services
from oncepay.payments.dashboard import queries
from oncepay.payments.dashboard.auth import (
    COOKIE,
    SESSION_SECONDS,
    NotSignedIn,
    Operator,
    new_session,
    operator,
    session_id,
)
from oncepay.payments.errors import InvalidRequest, ResourceMissing
from oncepay.payments.metrics import REGISTRY

__all__ = ["STATIC", "problem_page", "router"]

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.filters["when"] = lambda t: (
    datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"
)
templates.env.filters["money"] = lambda amount, currency: f"{amount:,} {currency}"

router = APIRouter(prefix="/dashboard", include_in_schema=False)
STREAM_INTERVAL = 1.0  # seconds between two snapshots of the live overview
MAX_SEQ = 2**63 - 1  # a page cursor is a row's seq, a BIGINT


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def _token(request: Request) -> str:
    token = _services(request).settings.admin_token
    if not token:
        raise ResourceMissing("the dashboard is off: set ONCEPAY_ADMIN_TOKEN to turn it on")
    return token


async def _operator(request: Request) -> Operator:
    who = operator(request, _token(request))
    if who.session and await queries.signed_out(_services(request).db, session_id(who.session)[0]):
        raise NotSignedIn
    return who


OperatorDep = Annotated[Operator, Depends(_operator)]


def not_signed_in(request: Request, exc: NotSignedIn) -> Response:
    """Pages send the browser to sign in; the stream and the CSV answer 401."""
    if request.url.path.endswith((".csv", "/stream")) or request.method != "GET":
        return Response("sign in first", 401, media_type="text/plain")
    query = f"?{request.url.query}" if request.url.query else ""
    back = urlencode({"next": request.url.path + query})
    return RedirectResponse(f"/dashboard/login?{back}", 303)


# Pages load scripts and styles from the package only; nothing may frame them.
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _page(request: Request, name: str, who: Operator | None, **context: Any) -> HTMLResponse:
    token = _token(request)
    response = templates.TemplateResponse(
        request,
        name,
        {"csrf": who.csrf(token) if who else "", "signed_in": who is not None, **context},
    )
    return _guarded(response)


def _guarded(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def problem_page(request: Request, error: OncePayError) -> HTMLResponse | None:
    """A dashboard page's 4xx as a page when a browser asked for one (a filter that is no
    filter, a payment that does not exist), with the pages' headers; the CSV, the live stream
    and a script (no ``text/html`` in ``Accept``) get the problem document as the API does."""
    path = request.url.path
    if (
        not path.startswith("/dashboard")
        or path.startswith("/dashboard/static")
        or path.endswith((".csv", "/stream"))
        or "text/html" not in request.headers.get("accept", "")
        or error.status >= 500
    ):
        return None
    context = {"csrf": "", "signed_in": False, "status": error.status}
    context.update(title=error.title, detail=error.detail)
    page = templates.TemplateResponse(request, "error.html", context, status_code=error.status)
    return _guarded(page)


# -- signing in ----------------------------------------------------------------------------


def _safe_next(value: str | None) -> str:
    # Only a path of the dashboard itself: never an open redirect to another site.
    if value and value.startswith("/dashboard") and not value.startswith("//"):
        return value
    return "/dashboard"


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    _token(request)
    return _page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
async def login(
    request: Request, token: Annotated[str, Form()], next: Annotated[str, Form()] = "/dashboard"
) -> Response:
    expected = _token(request)
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        refused = _page(request, "login.html", None, next=_safe_next(next), error=True)
        refused.status_code = 401
        return refused
    response = RedirectResponse(_safe_next(next), 303)
    response.set_cookie(
        COOKIE,
        new_session(expected),
        max_age=SESSION_SECONDS,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, who: OperatorDep, csrf: Annotated[str, Form()]) -> Response:
    _check_csrf(request, who, csrf)
    if who.session:  # ended for every process, not only this browser's cookie
        session, expires_at = session_id(who.session)
        await queries.sign_out(_services(request).db, session, expires_at, now=time.time())
    response = RedirectResponse("/dashboard/login", 303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


def _check_csrf(request: Request, who: Operator, given: str) -> None:
    if who.session and not hmac.compare_digest(given, who.csrf(_token(request))):
        raise InvalidRequest("the form is stale or forged: reload the page and try again")


# -- the live overview ------------------------------------------------------------------------


@router.get("")
async def overview_page(request: Request, who: OperatorDep) -> HTMLResponse:
    snapshot = await _snapshot(_services(request))
    return _page(request, "overview.html", who, snapshot=snapshot, active="overview")


@router.get("/stream")
async def stream(request: Request, who: OperatorDep) -> StreamingResponse:
    """Server-sent events: a snapshot of the overview every second until the browser goes, or
    until the session that opened the stream is signed out or expires (then a ``signed_out``
    event, and the stream ends)."""
    services = _services(request)

    async def events() -> AsyncIterator[bytes]:
        while not await request.is_disconnected():
            try:  # the session is checked again before every snapshot: signed out or expired
                await _operator(request)  # since the stream opened, it ends here
            except NotSignedIn:
                yield b"event: signed_out\ndata: {}\n\n"
                return
            snapshot = await _snapshot(services)
            yield f"event: overview\ndata: {json.dumps(snapshot)}\n\n".encode()
            await asyncio.sleep(STREAM_INTERVAL)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _snapshot(services: Services) -> dict[str, Any]:
    snapshot = await queries.overview(services.db)
    snapshot["decisions"] = _samples("oncepay_idempotency_decisions", "decision")
    snapshot["acquirers"] = _acquirers(services)
    return snapshot


def _samples(metric: str, label: str, **match: str) -> dict[str, float]:
    """This process's counter ``metric`` by ``label`` (the dashboard's live figures are the
    serving process's own; /metrics sums every process)."""
    found: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name != metric:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            if all(sample.labels.get(k) == v for k, v in match.items()):
                key = sample.labels.get(label, "")
                found[key] = found.get(key, 0.0) + sample.value
    return found


def _acquirers(services: Services) -> list[dict[str, Any]]:
    health: list[dict[str, Any]] = []
    for acquirer in services.acquirers:
        outcomes = _samples("oncepay_acquirer_calls", "outcome", acquirer=acquirer.name)
        calls = sum(outcomes.values())
        failed = calls - outcomes.get("approved", 0) - outcomes.get("declined", 0)
        breaker = getattr(acquirer, "breaker", None)
        p50, p99 = _latency(acquirer.name)
        health.append(
            {
                "name": acquirer.name,
                "breaker": str(getattr(breaker, "state", "unknown")),
                "calls": int(calls),
                "error_rate": round(failed / calls, 4) if calls else None,
                "p50_ms": p50,
                "p99_ms": p99,
            }
        )
    return health


def _latency(acquirer: str) -> tuple[float | None, float | None]:
    """p50 and p99 of this process's acquirer calls, from the histogram's buckets."""
    buckets: list[tuple[float, float]] = []
    for family in REGISTRY.collect():
        if family.name != "oncepay_acquirer_call_seconds":
            continue
        merged: dict[float, float] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("acquirer") == acquirer:
                bound = float(sample.labels["le"])
                merged[bound] = merged.get(bound, 0.0) + sample.value
        buckets = sorted(merged.items())
    if not buckets or buckets[-1][1] == 0:
        return None, None
    total = buckets[-1][1]

    def quantile(q: float) -> float | None:
        for bound, count in buckets:
            if count >= q * total:
                return None if bound == float("inf") else round(bound * 1000, 1)
        return None

    return quantile(0.5), quantile(0.99)


# -- search, CSV, a payment's timeline --------------------------------------------------------


def _parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{value!r} is not a date or time (YYYY-MM-DD[THH:MM])") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _filter(
    id: str | None = None,
    key: str | None = None,
    reference: str | None = None,
    event: str | None = None,
    merchant: str | None = None,
    status: str | None = None,
    amount_min: str | None = None,  # text: a form sends its empty fields as ""
    amount_max: str | None = None,
    created_from: str | None = None,
    created_to: str | None = None,
) -> queries.PaymentFilter:
    if status and status not in queries.STATUSES:
        raise InvalidRequest(f"unknown status {status!r}")
    texts = {"id": id, "key": key, "reference": reference, "event": event, "merchant": merchant}
    for name, value in texts.items():
        if value and "\x00" in value:  # PostgreSQL refuses NUL in text: it names nothing
            raise InvalidRequest(f"{name}: a NUL character is not allowed")

    def clean(value: str | None) -> str | None:
        return value.strip() or None if value else None

    return queries.PaymentFilter(
        id=clean(id),
        key=key or None,
        reference=clean(reference),
        event=clean(event),
        merchant=clean(merchant),
        status=status or None,
        amount_min=_amount(amount_min),
        amount_max=_amount(amount_max),
        created_from=_parse_time(created_from),
        created_to=_parse_time(created_to),
    )


def _amount(value: str | None) -> int | None:
    if not value or not value.strip():
        return None
    # ASCII digits only (str.isdigit takes "²" too) and fewer than a BIGINT's 19.
    if not re.fullmatch(r"[0-9]{1,18}", value.strip()):
        raise InvalidRequest(
            f"{value!r} is not an amount in minor units (a whole number of at most 18 digits)"
        )
    return int(value)


FilterDep = Annotated[queries.PaymentFilter, Depends(_filter)]


@router.get("/payments")
async def payments_page(
    request: Request,
    who: OperatorDep,
    found: FilterDep,
    before: Annotated[int | None, Query(ge=1, le=MAX_SEQ)] = None,
) -> HTMLResponse:
    rows, next_before = await queries.search_payments(_services(request).db, found, before=before)
    query = dict(request.query_params)
    query.pop("before", None)
    next_link = (
        f"/dashboard/payments?{urlencode({**query, 'before': next_before})}"
        if next_before
        else None
    )
    return _page(
        request,
        "payments.html",
        who,
        active="payments",
        rows=[queries.payment_view(row) for row in rows],
        form=dict(request.query_params),
        statuses=queries.STATUSES,
        next_link=next_link,
        csv_link=f"/dashboard/payments.csv?{urlencode(query)}",
    )


CSV_COLUMNS = (
    "id",
    "merchant",
    "amount",
    "currency",
    "status",
    "acquirer",
    "created",
    "amount_settled",
    "settled_at",
)


@router.get("/payments.csv")
async def payments_csv(request: Request, who: OperatorDep, found: FilterDep) -> StreamingResponse:
    """Every payment the filter matches (not only the page shown), streamed."""
    db = _services(request).db

    async def lines() -> AsyncIterator[str]:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        async for row in queries.payment_rows(db, found):
            view = queries.payment_view(row)
            view["created"] = _iso(view["created"])
            view["settled_at"] = _iso(view["settled_at"])
            writer.writerow([view[c] for c in CSV_COLUMNS])
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    headers = {"Content-Disposition": f'attachment; filename="payments-{stamp}.csv"'}
    return StreamingResponse(lines(), media_type="text/csv; charset=utf-8", headers=headers)


def _iso(moment: float | None) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat() if moment else ""


@router.get("/payments/{payment_id}")
async def payment_page(request: Request, who: OperatorDep, payment_id: str) -> HTMLResponse:
    services = _services(request)
    found = (
        None
        if "\x00" in payment_id  # no id has one (and PostgreSQL refuses it in text)
        else await queries.timeline(services.db, payment_id, _key_hasher(services))
    )
    if found is None:
        raise ResourceMissing(f"no payment {payment_id}")
    trace_url = services.settings.dashboard_trace_url
    return _page(
        request, "payment.html", who, active="payments", timeline=found, trace_url=trace_url
    )


def _key_hasher(services: Services) -> Callable[[str], str]:
    """Keys are shown hashed the way the key-usage log hashes them (so a key found here is the
    one in the log), or keyed by the operator token when there is no log."""
    usage_log = services.gate.usage_log
    hash_key = getattr(usage_log, "hash_key", None)
    if callable(hash_key):
        return hash_key  # type: ignore[no-any-return]
    secret = hashlib.sha256((services.settings.admin_token or "").encode()).digest()

    def keyed(key: str) -> str:
        return hashlib.blake2b(key.encode(), key=secret, digest_size=16).hexdigest()

    return keyed


# -- queues: insight findings and reconciliation discrepancies --------------------------------


@router.get("/findings")
async def findings_page(request: Request, who: OperatorDep, status: str = "open") -> HTMLResponse:
    rows = await _operator_api(request, "GET", "/v1/admin/insight/findings", _status(status))
    return _page(request, "findings.html", who, active="findings", rows=rows, status=status)


@router.get("/discrepancies")
async def discrepancies_page(
    request: Request, who: OperatorDep, status: str = "open"
) -> HTMLResponse:
    rows = await _operator_api(
        request, "GET", "/v1/admin/reconciliation/discrepancies", _status(status)
    )
    return _page(
        request,
        "discrepancies.html",
        who,
        active="discrepancies",
        rows=rows,
        status=status,
        form_key=lambda: f"dash-{uuid.uuid4().hex}",
        flash=_flash(request.query_params.get("done")),
    )


@router.post("/discrepancies/{discrepancy_id}/{action}")
async def close_discrepancy(
    request: Request,
    who: OperatorDep,
    discrepancy_id: str,
    action: str,
    note: Annotated[str, Form(min_length=1, max_length=2000)],
    idempotency_key: Annotated[str, Form(min_length=1, max_length=255)],
    csrf: Annotated[str, Form()],
) -> Response:
    _check_csrf(request, who, csrf)
    if action not in ("resolve", "accept"):
        raise ResourceMissing(f"no action {action!r}: resolve or accept")
    # An id is a number: checked before it goes into the operator API's path, where "..", "?"
    # or "%2F" would name another route.
    if not (discrepancy_id.isascii() and discrepancy_id.isdigit() and len(discrepancy_id) <= 19):
        raise ResourceMissing(f"no discrepancy {discrepancy_id!r}")
    parse_key(idempotency_key)  # the header's own grammar (SPEC §2): else 400, before sending
    answer = await _operator_call(
        request,
        "POST",
        f"/v1/admin/reconciliation/discrepancies/{discrepancy_id}/{action}",
        json_body={"note": note},
        headers={"Idempotency-Key": idempotency_key},
    )
    if answer.status_code >= 400:
        raise _passed_on(answer)
    return RedirectResponse(f"/dashboard/discrepancies?done={action}d+{discrepancy_id}", 303)


_DONE = re.compile(r"(resolved|accepted) [0-9]{1,19}")  # what close_discrepancy redirects with


def _passed_on(answer: httpx.Response) -> InvalidRequest:
    """The operator API's problem, passed on as it is (status, code, title, detail); a 5xx of
    it is a 502 of the dashboard's."""
    problem = answer.json() if answer.content else {}
    error = InvalidRequest(problem.get("detail", f"the operator API answered {answer.status_code}"))
    error.status = answer.status_code if answer.status_code < 500 else 502
    error.code = problem.get("code", error.code)
    error.title = problem.get("title", error.title)
    return error


def _flash(done: str | None) -> str | None:
    """The banner after closing one: only what the dashboard's own redirect says, never a text
    a link of someone else's put there."""
    return done if done is not None and _DONE.fullmatch(done) else None


def _status(status: str) -> dict[str, str]:
    return {} if status == "all" else {"status": status}


async def _operator_call(
    request: Request,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    json_body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """The operator API of this very app, called in process with the operator token."""
    transport = httpx.ASGITransport(app=request.app)
    sent = {"Authorization": f"Bearer {_token(request)}", **(headers or {})}
    async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
        return await client.request(method, path, params=params, json=json_body, headers=sent)


async def _operator_api(
    request: Request, method: str, path: str, params: dict[str, str]
) -> list[dict[str, Any]] | None:
    """A list from the operator API (its first 100), or None where that API is not there."""
    answer = await _operator_call(request, method, path, params={**params, "limit": "100"})
    if answer.status_code == 404:
        return None
    if answer.status_code >= 400:  # e.g. an unknown status filter: the API's 4xx, passed on
        raise _passed_on(answer)
    data: list[dict[str, Any]] = answer.json()["data"]
    return data
