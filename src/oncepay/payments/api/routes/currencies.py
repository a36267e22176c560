"""Currencies: every ISO 4217 code a payment may be in, with its exponent and amount limit."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from oncepay.payments import models
from oncepay.payments.api.deps import PROBLEMS, MerchantDep, resource_router
from oncepay.payments.currencies import CURRENCIES

__all__ = ["router"]

router = resource_router("/v1/currencies")


@router.get("", response_model=models.CurrencyList, responses=PROBLEMS)
async def list_currencies(request: Request, merchant: MerchantDep) -> dict[str, Any]:
    """Every currency, by code: `exponent` (JPY 0, USD 2, KWD 3) says how many minor units make
    a major one, `max_amount` the largest amount in minor units. One page: the list is short."""
    data = [money.public() for money in CURRENCIES.values()]
    return {"object": "list", "data": data, "has_more": False, "url": request.url.path}
