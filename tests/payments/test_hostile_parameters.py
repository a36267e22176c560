"""SPEC §8 over every GET route the service has — the merchants' API, the operator's API and the
dashboard — on SQLite and PostgreSQL: a hostile value in any path or query parameter (a NUL,
which PostgreSQL refuses in text; numbers past a BIGINT; digits that are not ASCII; a very long
string) is answered with a 4xx (or found to name nothing), never a 500 and never a stream cut
off halfway. The routes and their parameters are read from the app itself, so a route added
later is walked too."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute

from tests.payments.stack import Stack, running_stack

TOKEN = "hostile-parameters-operator-token"
HOSTILE = [
    "x\x00y",
    "9" * 30,
    "-" + "9" * 30,
    "²",
    "1e400",
    "x" * 5000,
    "pay_" + "0" * 24 + "\x00",
]
# Routes that stream forever (the dashboard's live overview) or sign the operator out.
SKIPPED = {"/dashboard/stream", "/dashboard/login"}


@pytest.fixture
async def operated(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(payments_url, tmp_path, admin_token=TOKEN) as stack:
        await stack.pay(key="one-payment")  # something for the searches to walk past
        yield stack


def _get_routes(stack: Stack) -> list[tuple[str, list[str]]]:
    app: Any = stack.client._transport.app  # type: ignore[attr-defined]
    routes = []
    for route in app.routes:
        if not isinstance(route, APIRoute) or "GET" not in (route.methods or ()):
            continue
        if route.path in SKIPPED:
            continue
        routes.append((route.path, sorted(_query_names(route.dependant))))
    return routes


def _query_names(dependant: Any) -> set[str]:
    """The query parameters of a route and of every dependency it has, by their names."""
    names = {field.alias for field in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _client(stack: Stack, path: str) -> httpx.AsyncClient:
    operator = path.startswith(("/v1/admin", "/dashboard"))
    key = TOKEN if operator else stack.api_key
    return httpx.AsyncClient(
        transport=stack.client._transport,
        base_url="http://payments",
        headers={"Authorization": f"Bearer {key}"},
    )


async def _wrong(client: httpx.AsyncClient, path: str, params: dict[str, str]) -> str | None:
    """What is wrong with the answer to ``GET path?params`` (None: a 2xx-4xx, problems as
    problem documents with a detail)."""
    what = f"GET {path[:80]!r} { ({k: v[:40] for k, v in params.items()}) }"
    try:
        answer = await client.get(path, params=params)
    except Exception as exc:  # the app raised (the transport hands its exceptions over)
        return f"{what}: {exc!r}"[:300]
    if answer.status_code >= 500:
        return f"{what}: {answer.status_code} {answer.text[:200]}"
    if answer.status_code >= 400 and "json" in answer.headers.get("content-type", ""):
        if answer.headers["content-type"] != "application/problem+json":
            return f"{what}: {answer.status_code} as {answer.headers['content-type']}"
        if not answer.json().get("detail"):
            return f"{what}: {answer.status_code} without a detail"
    return None


async def test_no_get_route_answers_a_hostile_parameter_with_a_500(operated: Stack) -> None:
    routes = _get_routes(operated)
    assert len(routes) > 25, routes  # the walk reaches the API, the admin API and the dashboard
    assert any(p.startswith("/dashboard/payments") for p, _ in routes)
    asked, wrong = 0, []
    for template, query in routes:
        names = re.findall(r"{(\w+)(?::\w+)?}", template)
        async with _client(operated, template) as client:
            for value in HOSTILE:
                path = template
                for name in names:
                    path = re.sub(r"\{" + name + r"(?::\w+)?\}", quote(value, safe=""), path)
                asked += 1
                wrong.append(await _wrong(client, path, {}))
                for name in query:
                    asked += 1
                    wrong.append(await _wrong(client, path, {name: value}))
    assert asked > 200
    bad = [w for w in wrong if w]
    assert not bad, "\n".join(bad)


async def test_no_post_route_answers_a_hostile_path_parameter_with_a_500(operated: Stack) -> None:
    app: Any = operated.client._transport.app  # type: ignore[attr-defined]
    templates = [
        route.path
        for route in app.routes
        if isinstance(route, APIRoute) and "POST" in (route.methods or ()) and "{" in route.path
    ]
    assert len(templates) > 10, templates
    wrong: list[str] = []
    for template in templates:
        async with _client(operated, template) as client:
            for value in HOSTILE:
                path = re.sub(r"\{\w+(?::\w+)?\}", quote(value, safe=""), template)
                headers = {"Idempotency-Key": f"hostile-{len(wrong)}-{abs(hash(path))}"}
                try:
                    answer = await client.post(path, json={}, headers=headers)
                except Exception as exc:
                    wrong.append(f"POST {path[:80]!r}: {exc!r}"[:300])
                    continue
                if answer.status_code >= 500:
                    wrong.append(f"POST {path[:80]!r}: {answer.status_code} {answer.text[:200]}")
    assert not wrong, "\n".join(wrong)


async def test_a_csv_export_refuses_a_bad_filter_before_it_streams(operated: Stack) -> None:
    async with _client(operated, "/dashboard") as client:
        for params in (
            {"amount_min": "9" * 26},
            {"amount_max": "²"},
            {"merchant": "\x00"},
            {"id": "pay_\x00"},
        ):
            answer = await client.get("/dashboard/payments.csv", params=params)
            assert answer.status_code == 400, (params, answer.text)
            assert answer.headers["content-type"] == "application/problem+json"
        page = await client.get("/dashboard/payments", params={"before": str(2**63)})
        assert page.status_code == 400
        everything = await client.get("/dashboard/payments.csv", params={"amount_min": "1"})
        assert everything.status_code == 200
        assert len(everything.text.strip().splitlines()) == 2  # the header and the payment
