"""Payments: create, capture, cancel, refund (each idempotent), read and list."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response

from oncepay.payments import models
from oncepay.payments.api.deps import (
    POST,
    PROBLEMS,
    MerchantDep,
    PageDep,
    ServicesDep,
    idempotent,
    resource_router,
)
from oncepay.payments.models import list_public, payment_public, refund_public
from oncepay.payments.operations import Cancel, Capture, CreatePayment, CreateRefund
from oncepay.payments.reads import PAYMENTS, REFUNDS, get_object, page
from oncepay.payments.storage.schema import refunds

__all__ = ["router"]

router = resource_router("/v1/payments")


@router.post("", status_code=201, response_model=models.Payment, **POST)
async def create_payment(
    body: models.PaymentCreate, request: Request, services: ServicesDep, merchant: MerchantDep
) -> Response:
    """Authorize a payment, and capture it when `capture_method` is `automatic`."""
    return await idempotent(request, services, merchant, CreatePayment(body))


@router.post("/{payment_id}/capture", response_model=models.Payment, **POST)
async def capture_payment(
    payment_id: str,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.CaptureRequest | None = None,
) -> Response:
    """Capture an authorized payment, all of it or `amount` (at most the authorized)."""
    amount = body.amount if body else None
    return await idempotent(request, services, merchant, Capture(payment_id, amount))


@router.post("/{payment_id}/cancel", response_model=models.Payment, **POST)
async def cancel_payment(
    payment_id: str,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.CancelRequest | None = None,
) -> Response:
    """Void an authorization: the held money is released."""
    return await idempotent(request, services, merchant, Cancel(payment_id))


@router.post("/{payment_id}/refunds", status_code=201, response_model=models.Refund, **POST)
async def create_refund(
    payment_id: str,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.RefundCreate | None = None,
) -> Response:
    """Refund captured money: `amount`, or all that is left."""
    amount = body.amount if body else None
    return await idempotent(request, services, merchant, CreateRefund(payment_id, amount))


@router.get("/{payment_id}", response_model=models.Payment, responses=PROBLEMS)
async def get_payment(
    payment_id: str, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    return payment_public(await get_object(services.db, PAYMENTS, payment_id, merchant.id))


@router.get("", response_model=models.PaymentList, responses=PROBLEMS)
async def list_payments(
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
) -> dict[str, Any]:
    """Newest first; pass the last id you saw as `starting_after` for the next page."""
    rows, more = await page(services.db, PAYMENTS, merchant.id, paging)
    return list_public(rows, more, payment_public)


@router.get("/{payment_id}/refunds", response_model=models.RefundList, responses=PROBLEMS)
async def list_refunds(
    payment_id: str,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
) -> dict[str, Any]:
    """The payment's refunds, newest first, paged like every list."""
    await get_object(services.db, PAYMENTS, payment_id, merchant.id)
    where = [refunds.c.payment_id == payment_id]
    rows, more = await page(services.db, REFUNDS, merchant.id, paging, where)
    return list_public(rows, more, refund_public)
