"""The operators' view of insight findings (SPEC §9, §11): every tenant's, behind the
operator token."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from oncepay.insight import store
from oncepay.payments.api.deps import DEFAULT_LIMIT, PROBLEMS, Limit, ServicesDep, resource_router
from oncepay.payments.api.routes.insight import FindingList, Kind, Status
from oncepay.payments.errors import InvalidRequest
from oncepay.payments.models import list_public

__all__ = ["router"]

router = resource_router("/v1/admin/insight", operator=True)


@router.get("/findings", response_model=FindingList, responses=PROBLEMS)
async def list_all_insight_findings(
    request: Request,
    services: ServicesDep,
    limit: Limit = DEFAULT_LIMIT,
    starting_after: str | None = None,
    kind: Kind | None = None,
    status: Status | None = None,
    tenant: str | None = None,
) -> dict[str, Any]:
    """Every tenant's findings (or one `tenant`'s), newest first."""
    where = list(store.filters(kind, status))
    if tenant is not None:
        where.append(store.findings.c.merchant_id == tenant)
    found = await store.every_tenant(services.db, limit, starting_after, where)
    if found is None:
        raise InvalidRequest(f"starting_after: {starting_after!r} is not a finding of this list")
    rows, more = found
    return list_public(rows, more, store.public, request.url.path)
