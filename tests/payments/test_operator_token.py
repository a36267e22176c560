"""The operator token (SPEC §11) guards every operator route: off when unset (404), a
constant-time bearer check, and a merchant's API key is never an operator's."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from oncepay.payments.api.app import create_app
from oncepay.payments.api.deps import resource_router
from oncepay.payments.settings import Settings
from tests.payments.stack import running_stack

TOKEN = "op-token-0123456789abcdef"


@pytest.mark.parametrize("configured", [TOKEN, None])
async def test_operator_routes_need_the_operator_token(
    tmp_path: Path, configured: str | None
) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    async with running_stack(url, tmp_path, admin_token=configured) as stack:
        router = resource_router("/v1/admin", operator=True)

        @router.get("/ping")
        async def ping() -> dict[str, bool]:
            return {"ok": True}

        app = create_app(
            Settings(database_url=url, admin_token=configured), services=stack.services
        )
        app.router.routes.extend(router.routes)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://p") as client:
            as_operator = await client.get(
                "/v1/admin/ping", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            as_merchant = await client.get(
                "/v1/admin/ping", headers={"Authorization": f"Bearer {stack.api_key}"}
            )
            anonymous = await client.get("/v1/admin/ping")
            unknown_query = await client.get(
                "/v1/admin/ping?x=1", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            schema = (await client.get("/openapi.json")).json()
    if configured is None:
        # No token configured: the operator API does not exist, whoever asks.
        for response in (as_operator, as_merchant, anonymous):
            assert response.status_code == 404
            assert response.headers["content-type"].startswith("application/problem+json")
        return
    assert as_operator.status_code == 200, as_operator.text
    assert as_operator.json() == {"ok": True}
    for response in (as_merchant, anonymous):
        assert response.status_code == 401
        assert response.json()["code"] == "operator_token_required"
    assert unknown_query.status_code == 400
    assert "/v1/admin/ping" not in schema["paths"]  # operators' routes stay out of the doc
