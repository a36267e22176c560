"""Insight findings (SPEC §9, docs/insight.md): what the worker's live detectors found in how a
merchant's clients use their idempotency keys. A merchant lists its own findings only."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel

from oncepay.insight import store
from oncepay.insight.findings import KINDS
from oncepay.payments.api.deps import PROBLEMS, MerchantDep, PageDep, ServicesDep, resource_router
from oncepay.payments.models import list_public
from oncepay.payments.reads import Readable, page

__all__ = ["FINDINGS", "FindingList", "Kind", "Status", "router"]

router = resource_router("/v1/insight")

FINDINGS: Readable[Any] = Readable(store.findings, "insight finding")
Kind = Literal["key_per_retry", "key_reuse", "replay_storm", "retry_after_expiry", "no_backoff"]
Status = Literal["open", "closed"]
assert set(Kind.__args__) == set(KINDS)  # type: ignore[attr-defined]  # one list of kinds


class Finding(BaseModel):
    id: str
    object: Literal["insight_finding"]
    tenant: str
    kind: Kind
    status: Status
    first_at: float
    last_at: float
    events: int
    detail: str
    evidence: dict[str, Any]
    created: int
    updated: int


class FindingList(BaseModel):
    object: Literal["list"]
    data: list[Finding]
    has_more: bool
    url: str


@router.get("/findings", response_model=FindingList, responses=PROBLEMS)
async def list_insight_findings(
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    kind: Kind | None = None,
    status: Status | None = None,
) -> dict[str, Any]:
    """The merchant's findings, newest first, optionally of one `kind` or `status`; each says
    what its clients did wrong and what to do, with its evidence."""
    scope = store.filters(kind, None)
    where = store.filters(None, status)
    rows, more = await page(services.db, FINDINGS, merchant.id, paging, where, scope=scope)
    return list_public(rows, more, store.public, request.url.path)
