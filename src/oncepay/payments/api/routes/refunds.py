"""Refunds: read one by one, and listed across payments (they are created under their
payment, and listed there too)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query, Request

from oncepay.payments import models
from oncepay.payments.api.deps import PROBLEMS, MerchantDep, PageDep, ServicesDep, resource_router
from oncepay.payments.models import list_public, refund_public
from oncepay.payments.reads import REFUNDS, get_object, page
from oncepay.payments.storage.schema import refunds

__all__ = ["router"]

router = resource_router("/v1/refunds")


@router.get("", response_model=models.RefundList, responses=PROBLEMS)
async def list_all_refunds(
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    payment: Annotated[str | None, Query(pattern=models.ID_PATTERNS["payment"])] = None,
    status: models.RefundStatus | None = None,
) -> dict[str, Any]:
    """Every refund of the merchant, newest first; `payment` keeps one payment's."""
    scope = [refunds.c.payment_id == payment] if payment is not None else []
    where = [refunds.c.status == status] if status is not None else []
    rows, more = await page(services.db, REFUNDS, merchant.id, paging, where, scope=scope)
    return list_public(rows, more, refund_public, request.url.path)


@router.get("/{refund_id}", response_model=models.Refund, responses=PROBLEMS)
async def get_refund(
    refund_id: models.RefundId, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    return refund_public(await get_object(services.db, REFUNDS, refund_id, merchant.id))
