"""Refunds, read one by one (they are created and listed under their payment)."""

from __future__ import annotations

from typing import Any

from oncepay.payments import models
from oncepay.payments.api.deps import PROBLEMS, MerchantDep, ServicesDep, resource_router
from oncepay.payments.models import refund_public
from oncepay.payments.reads import REFUNDS, get_object

__all__ = ["router"]

router = resource_router("/v1/refunds")


@router.get("/{refund_id}", response_model=models.Refund, responses=PROBLEMS)
async def get_refund(
    refund_id: str, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    return refund_public(await get_object(services.db, REFUNDS, refund_id, merchant.id))
