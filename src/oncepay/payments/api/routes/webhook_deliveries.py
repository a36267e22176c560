"""Webhook deliveries: of an event, one with its attempts, and redelivery of an event."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import models
from oncepay.payments.api.deps import (
    POST,
    PROBLEMS,
    MerchantDep,
    PageDep,
    ServicesDep,
    idempotent_local,
    resource_router,
)
from oncepay.payments.models import delivery_public, list_public
from oncepay.payments.reads import DELIVERIES, EVENTS, get_object, page
from oncepay.payments.reply import Reply
from oncepay.payments.storage.schema import webhook_deliveries
from oncepay.payments.webhooks import endpoints

__all__ = ["router"]

router = resource_router()


@router.get(
    "/v1/events/{event_id}/deliveries",
    response_model=models.WebhookDeliveryList,
    responses=PROBLEMS,
)
async def event_deliveries(
    event_id: models.EventId,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
) -> dict[str, Any]:
    """Every delivery of the event (one per endpoint, and per redelivery), newest first."""
    await get_object(services.db, EVENTS, event_id, merchant.id)
    scope = [webhook_deliveries.c.event_id == event_id]
    rows, more = await page(services.db, DELIVERIES, merchant.id, paging, scope=scope)
    return list_public(rows, more, delivery_public, request.url.path)


@router.get(
    "/v1/webhook_deliveries/{delivery_id}",
    response_model=models.WebhookDelivery,
    responses=PROBLEMS,
)
async def get_delivery(
    delivery_id: models.DeliveryId, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    """One delivery with every attempt: status code, latency, error."""
    row, attempts = await endpoints.delivery_attempts(services.db, delivery_id, merchant.id)
    log = [
        {
            "attempt": a.attempt,
            "status_code": a.status_code,
            "latency_ms": round(a.latency_ms, 3),
            "error": a.error,
            "created": int(a.created_at),
        }
        for a in attempts
    ]
    return {**delivery_public(row), "attempt_log": log}


@router.post("/v1/events/{event_id}/redeliver", response_model=models.WebhookDeliveryList, **POST)
async def redeliver_event(
    event_id: models.EventId,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.Redeliver | None = None,
) -> Response:
    """Queue the event again for every enabled subscriber, or for `endpoint` only. It keeps
    its `webhook-id`, so a receiver that handled it already will not handle it twice."""
    target = body.endpoint if body else None
    url = f"/v1/events/{event_id}/deliveries"

    async def work(conn: AsyncConnection) -> Reply:
        rows = await endpoints.redeliver_event(conn, merchant.id, event_id, target)
        return Reply.json(200, list_public(rows, False, delivery_public, url))

    return await idempotent_local(request, services, merchant, work)
