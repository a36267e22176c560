"""Payments: create, capture, cancel, refund (each idempotent), read and list."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.responses import Response

from oncepay.payments import models
from oncepay.payments.api.deps import (
    POST,
    PROBLEMS,
    MerchantDep,
    PageDep,
    ServicesDep,
    direct,
    idempotent,
    resource_router,
)
from oncepay.payments.currencies import CURRENCIES, MAX_AMOUNT
from oncepay.payments.errors import InvalidRequest
from oncepay.payments.models import list_public, payment_public, refund_public
from oncepay.payments.operations import Cancel, Capture, CreatePayment, CreateRefund
from oncepay.payments.reads import PAYMENTS, REFUNDS, Range, get_object, metadata_is, page
from oncepay.payments.storage.schema import payments, refunds

__all__ = ["METADATA_FILTER", "router"]

router = resource_router("/v1/payments")

# metadata[key]=value, any key: a deepObject (its keys are free, so it is declared here and
# read from the query string by hand; deps.py lets its keys through the unknown-query check).
METADATA_FILTER: dict[str, Any] = {
    "name": "metadata",
    "in": "query",
    "required": False,
    "style": "deepObject",
    "explode": True,
    "description": "metadata[key]=value: only payments whose metadata has that key with that "
    "value (several: all of them).",
    "schema": {
        "type": "object",
        "maxProperties": 10,
        "propertyNames": {"minLength": 1, "maxLength": models.MAX_METADATA_KEY},
        "additionalProperties": {"type": "string", "maxLength": models.MAX_METADATA_VALUE},
    },
}
MAX_METADATA_FILTERS = 10


@router.post("", status_code=201, response_model=models.Payment, **POST)
@direct
async def create_payment(
    body: models.PaymentCreate, request: Request, services: ServicesDep, merchant: MerchantDep
) -> Response:
    """Authorize a payment, and capture it when `capture_method` is `automatic`."""
    return await idempotent(request, services, merchant, CreatePayment(body))


@router.post("/{id}/capture", response_model=models.Payment, **POST)
async def capture_payment(
    id: models.PaymentId,  # SPEC §5 names it {id}
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.CaptureRequest | None = None,
) -> Response:
    """Capture an authorized payment, all of it or `amount` (at most the authorized)."""
    amount = body.amount if body else None
    return await idempotent(request, services, merchant, Capture(id, amount))


@router.post("/{id}/cancel", response_model=models.Payment, **POST)
async def cancel_payment(
    id: models.PaymentId,  # SPEC §5 names it {id}
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.CancelRequest | None = None,
) -> Response:
    """Void an authorization: the held money is released."""
    return await idempotent(request, services, merchant, Cancel(id))


@router.post("/{id}/refunds", status_code=201, response_model=models.Refund, **POST)
async def create_refund(
    id: models.PaymentId,  # SPEC §5 names it {id}
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.RefundCreate | None = None,
) -> Response:
    """Refund captured money: `amount`, or all that is left."""
    amount = body.amount if body else None
    return await idempotent(request, services, merchant, CreateRefund(id, amount))


@router.get("/{id}", response_model=models.Payment, responses=PROBLEMS)
async def get_payment(
    id: models.PaymentId,  # SPEC §5 names it {id}
    services: ServicesDep,
    merchant: MerchantDep,
) -> dict[str, Any]:
    return payment_public(await get_object(services.db, PAYMENTS, id, merchant.id))


def _amount(bound: str) -> Any:
    return Query(alias=f"amount[{bound}]", ge=0, le=MAX_AMOUNT, description=f"amount {bound}")


async def _amounts(
    gt: Annotated[int | None, _amount("gt")] = None,
    gte: Annotated[int | None, _amount("gte")] = None,
    lt: Annotated[int | None, _amount("lt")] = None,
    lte: Annotated[int | None, _amount("lte")] = None,
) -> Range:
    return Range(gt, gte, lt, lte)


def _metadata(request: Request) -> dict[str, str]:
    """The ``metadata[key]=value`` pairs of the query string."""
    found: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if not (name.startswith("metadata[") and name.endswith("]")):
            continue
        key = name[len("metadata[") : -1]
        if not 0 < len(key) <= models.MAX_METADATA_KEY or "\x00" in key + value:
            raise InvalidRequest(
                f"{name}: a metadata key is 1-{models.MAX_METADATA_KEY} characters"
            )
        if len(value) > models.MAX_METADATA_VALUE:
            raise InvalidRequest(f"{name}: at most {models.MAX_METADATA_VALUE} characters")
        if found.get(key, value) != value:
            raise InvalidRequest(f"{name}: given twice with different values")
        found[key] = value
    if len(found) > MAX_METADATA_FILTERS:
        raise InvalidRequest(f"metadata: at most {MAX_METADATA_FILTERS} keys to filter by")
    return found


@router.get(
    "",
    response_model=models.PaymentList,
    responses=PROBLEMS,
    openapi_extra={"parameters": [METADATA_FILTER]},
)
async def list_payments(
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    amounts: Annotated[Range, Depends(_amounts)],
    status: models.PaymentStatus | None = None,
    currency: Annotated[str | None, Query(pattern="^[A-Z]{3}$")] = None,
) -> dict[str, Any]:
    """Newest first; pass the last id you saw as `starting_after` for the next page (or the
    first as `ending_before` for the previous one). Filters: `status`, `currency`,
    `created[gt|gte|lt|lte]`, `amount[gt|gte|lt|lte]`, `metadata[key]=value`."""
    c = payments.c
    scope = amounts.conditions(c.amount)
    if currency is not None:
        if currency not in CURRENCIES:  # a typo must not look like a quiet day
            raise InvalidRequest(f"unknown currency {currency!r}; GET /v1/currencies lists them")
        scope.append(c.currency == currency)
    for n, (key, value) in enumerate(_metadata(request).items()):
        scope.append(metadata_is(services.db, c.metadata, key, value, n))
    where = [c.status == status] if status is not None else []
    rows, more = await page(services.db, PAYMENTS, merchant.id, paging, where, scope=scope)
    return list_public(rows, more, payment_public, request.url.path)


@router.get("/{id}/refunds", response_model=models.RefundList, responses=PROBLEMS)
async def list_refunds(
    id: models.PaymentId,  # SPEC §5 names it {id}
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
) -> dict[str, Any]:
    """The payment's refunds, newest first, paged like every list."""
    await get_object(services.db, PAYMENTS, id, merchant.id)
    scope = [refunds.c.payment_id == id]
    rows, more = await page(services.db, REFUNDS, merchant.id, paging, scope=scope)
    return list_public(rows, more, refund_public, request.url.path)
