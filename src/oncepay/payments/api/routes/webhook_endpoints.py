"""Webhook endpoints (SPEC §6): subscribe, change, delete, rotate the secret, list deliveries."""

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
from oncepay.payments.models import delivery_public, endpoint_public, list_public
from oncepay.payments.reads import DELIVERIES, ENDPOINTS, Range, page
from oncepay.payments.reply import Reply
from oncepay.payments.storage.schema import webhook_deliveries, webhook_endpoints
from oncepay.payments.webhooks import endpoints

__all__ = ["router"]

router = resource_router("/v1/webhook_endpoints")


@router.post("", status_code=201, response_model=models.WebhookEndpoint, **POST)
async def create_endpoint(
    body: models.WebhookEndpointCreate,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
) -> Response:
    """Subscribe a URL to events. The answer carries the signing `secret`, shown only now
    (and in a replay of this request)."""
    allow = services.settings.webhook_allow_private

    async def work(conn: AsyncConnection) -> Reply:
        row = await endpoints.create_endpoint(conn, merchant.id, body, allow_private=allow)
        return Reply.json(201, endpoint_public(row, secret=True))

    return await idempotent_local(request, services, merchant, work)


@router.get("", response_model=models.WebhookEndpointList, responses=PROBLEMS)
async def list_endpoints(
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    request: Request,
) -> dict[str, Any]:
    """Newest first (deleted endpoints are gone from the list)."""
    scope = [webhook_endpoints.c.deleted.is_(False)]
    rows, more = await page(services.db, ENDPOINTS, merchant.id, paging, scope=scope)
    return list_public(rows, more, endpoint_public, request.url.path)


@router.get("/{endpoint_id}", response_model=models.WebhookEndpoint, responses=PROBLEMS)
async def get_endpoint(
    endpoint_id: models.EndpointId, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    return endpoint_public(await endpoints.read_endpoint(services.db, endpoint_id, merchant.id))


@router.post("/{endpoint_id}", response_model=models.WebhookEndpoint, **POST)
async def update_endpoint(
    endpoint_id: models.EndpointId,
    body: models.WebhookEndpointUpdate,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
) -> Response:
    """Change the URL, the events or the description; `disabled` switches delivery off or
    back on (re-enabling clears the reason it was disabled for)."""
    allow = services.settings.webhook_allow_private

    async def work(conn: AsyncConnection) -> Reply:
        row = await endpoints.update_endpoint(
            conn, endpoint_id, merchant.id, body, allow_private=allow
        )
        return Reply.json(200, endpoint_public(row))

    return await idempotent_local(request, services, merchant, work)


@router.delete("/{endpoint_id}", response_model=models.DeletedObject, responses=PROBLEMS)
async def delete_endpoint(
    endpoint_id: models.EndpointId, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    """Stop delivering to it; deliveries still pending are canceled."""
    await endpoints.delete_endpoint(services.db, endpoint_id, merchant.id)
    return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}


@router.post("/{endpoint_id}/rotate_secret", response_model=models.WebhookEndpoint, **POST)
async def rotate_secret(
    endpoint_id: models.EndpointId,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.RotateSecret | None = None,
) -> Response:
    """A new signing secret (shown in this answer). For `overlap_seconds` (default a day)
    deliveries carry signatures by both the new and the old secret."""
    overlap = (body or models.RotateSecret()).overlap_seconds

    async def work(conn: AsyncConnection) -> Reply:
        row = await endpoints.rotate_secret(conn, endpoint_id, merchant.id, overlap)
        return Reply.json(200, endpoint_public(row, secret=True))

    return await idempotent_local(request, services, merchant, work)


@router.get(
    "/{endpoint_id}/deliveries", response_model=models.WebhookDeliveryList, responses=PROBLEMS
)
async def endpoint_deliveries(
    endpoint_id: models.EndpointId,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    request: Request,
    status: models.DeliveryStatus | None = None,
) -> dict[str, Any]:
    """Deliveries to this endpoint, newest first; `status=dead` lists the dead letters."""
    await endpoints.read_endpoint(services.db, endpoint_id, merchant.id)
    scope = [webhook_deliveries.c.endpoint_id == endpoint_id]
    where = [webhook_deliveries.c.status == status] if status is not None else []
    rows, more = await page(services.db, DELIVERIES, merchant.id, paging, where, scope=scope)
    return list_public(rows, more, delivery_public, request.url.path)


@router.post("/{endpoint_id}/test", response_model=models.WebhookDelivery, **POST)
async def send_test_delivery(
    endpoint_id: models.EndpointId,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    body: models.CancelRequest | None = None,
) -> Response:
    """Queue a test delivery ("ping"): a new `webhook_endpoint.test` event, sent to this
    endpoint only (whatever it subscribes to), signed and retried like any delivery. The answer
    is the delivery; follow it at `GET /v1/webhook_deliveries/{id}`."""

    async def work(conn: AsyncConnection) -> Reply:
        row = await endpoints.send_test(conn, endpoint_id, merchant.id)
        return Reply.json(200, delivery_public(row))

    return await idempotent_local(request, services, merchant, work)


@router.post("/{endpoint_id}/redeliver", response_model=models.WebhookRedelivery, **POST)
async def redeliver_range(
    endpoint_id: models.EndpointId,
    body: models.RedeliverRange,
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
) -> Response:
    """Queue again, for this endpoint, every event created in `created` that it subscribes to
    (at most 1000 a request), oldest first. Each keeps its `webhook-id` (the event id), so a
    receiver that handled one already will not handle it twice."""
    created = Range(body.created.gt, body.created.gte, body.created.lt, body.created.lte)

    async def work(conn: AsyncConnection) -> Reply:
        ids = await endpoints.redeliver_range(conn, endpoint_id, merchant.id, created)
        answer = {"object": "webhook_redelivery", "endpoint": endpoint_id, "deliveries": len(ids)}
        return Reply.json(200, answer)

    return await idempotent_local(request, services, merchant, work)
