"""Events: the merchant's outbox, listed and read (their webhook deliveries are under
``webhook_endpoints``' routes)."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from oncepay.payments import models
from oncepay.payments.api.deps import (
    PROBLEMS,
    MerchantDep,
    PageDep,
    ServicesDep,
    resource_router,
)
from oncepay.payments.models import event_public, list_public
from oncepay.payments.reads import EVENTS, get_object, page
from oncepay.payments.storage.schema import events

__all__ = ["router"]

router = resource_router("/v1/events")


@router.get("", response_model=models.EventList, responses=PROBLEMS)
async def list_events(
    request: Request,
    services: ServicesDep,
    merchant: MerchantDep,
    paging: PageDep,
    type: models.KnownEventType | None = None,
) -> dict[str, Any]:
    """Newest first, optionally of one `type` (e.g. `payment.captured`), paged and filtered
    by `created` like every list."""
    scope = [events.c.type == type] if type else []
    rows, more = await page(services.db, EVENTS, merchant.id, paging, scope=scope)
    return list_public(rows, more, event_public, request.url.path)


@router.get("/{event_id}", response_model=models.Event, responses=PROBLEMS)
async def get_event(
    event_id: models.EventId, services: ServicesDep, merchant: MerchantDep
) -> dict[str, Any]:
    return event_public(await get_object(services.db, EVENTS, event_id, merchant.id))
