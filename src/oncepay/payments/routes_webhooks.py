"""Webhook endpoints, deliveries and redelivery (SPEC §6): the API side of
:mod:`oncepay.payments.webhooks`."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from oncepay.payments import models
from oncepay.payments.db import read
from oncepay.payments.deps import (
    DEFAULT_LIMIT,
    KEY_HEADER,
    PROBLEMS,
    Limit,
    MerchantDep,
    ServicesDep,
    idempotent_local,
)
from oncepay.payments.errors import ResourceMissing
from oncepay.payments.ids import is_id, new_id
from oncepay.payments.models import delivery_public, endpoint_public
from oncepay.payments.reads import get_object, page
from oncepay.payments.reply import Reply
from oncepay.payments.schema import events, webhook_attempts, webhook_deliveries, webhook_endpoints
from oncepay.payments.webhooks import new_secret, redeliver, validate_url

__all__ = ["register"]

E = webhook_endpoints.c


async def _endpoint(
    conn: AsyncConnection, endpoint_id: str, merchant_id: str, *, lock: bool = True
) -> Any:
    """The merchant's endpoint (row-locked for a change, on PostgreSQL), or 404."""
    if not is_id(endpoint_id):
        raise ResourceMissing(f"no webhook endpoint {endpoint_id!r}")
    query = select(webhook_endpoints).where(
        E.id == endpoint_id, E.merchant_id == merchant_id, E.deleted.is_(False)
    )
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise ResourceMissing(f"no webhook endpoint {endpoint_id!r}")
    return row


async def _save(conn: AsyncConnection, endpoint_id: str, **values: Any) -> Any:
    values["updated_at"] = time.time()
    await conn.execute(update(webhook_endpoints).where(E.id == endpoint_id).values(**values))
    return (await conn.execute(select(webhook_endpoints).where(E.id == endpoint_id))).one()


def register(app: FastAPI) -> None:  # noqa: PLR0915 - one short function per route
    post: dict[str, Any] = {"responses": PROBLEMS, "openapi_extra": {"parameters": [KEY_HEADER]}}

    @app.post("/v1/webhook_endpoints", status_code=201, response_model=models.WebhookEndpoint,
              **post)  # fmt: skip
    async def create_endpoint(
        body: models.WebhookEndpointCreate,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
    ) -> Response:
        """Subscribe a URL to events. The answer carries the signing `secret`, shown only now
        (and in a replay of this request)."""

        async def work(conn: AsyncConnection) -> Reply:
            allow = services.settings.webhook_allow_private
            url, now = validate_url(body.url, allow_private=allow), time.time()
            endpoint_id = new_id("we")
            await conn.execute(webhook_endpoints.insert().values(
                id=endpoint_id, merchant_id=merchant.id, url=url, events=json.dumps(body.events),
                description=body.description, disabled=False, secret=new_secret(),
                deleted=False, created_at=now, updated_at=now,
            ))  # fmt: skip
            row = await _endpoint(conn, endpoint_id, merchant.id)
            return Reply.json(201, endpoint_public(row, secret=True))

        return await idempotent_local(request, services, merchant, work)

    @app.get("/v1/webhook_endpoints", response_model=models.WebhookEndpointList,
             responses=PROBLEMS)  # fmt: skip
    async def list_endpoints(
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
    ) -> Any:
        rows, more = await page(services.db, webhook_endpoints, merchant.id, limit, starting_after,
                                [E.deleted.is_(False)])  # fmt: skip
        return {"object": "list", "data": [endpoint_public(r) for r in rows], "has_more": more}

    @app.get("/v1/webhook_endpoints/{endpoint_id}", response_model=models.WebhookEndpoint,
             responses=PROBLEMS)  # fmt: skip
    async def get_endpoint(endpoint_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        async with read(services.db) as conn:
            return endpoint_public(await _endpoint(conn, endpoint_id, merchant.id, lock=False))

    @app.post("/v1/webhook_endpoints/{endpoint_id}", response_model=models.WebhookEndpoint,
              **post)  # fmt: skip
    async def update_endpoint(
        endpoint_id: str,
        body: models.WebhookEndpointUpdate,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
    ) -> Response:
        """Change the URL, the events or the description; `disabled` switches delivery off or
        back on (re-enabling clears the reason it was disabled for)."""

        async def work(conn: AsyncConnection) -> Reply:
            await _endpoint(conn, endpoint_id, merchant.id)
            values: dict[str, Any] = {}
            if body.url is not None:
                allow = services.settings.webhook_allow_private
                values["url"] = validate_url(body.url, allow_private=allow)
            if body.events is not None:
                values["events"] = json.dumps(body.events)
            if body.description is not None:
                values["description"] = body.description
            if body.disabled is not None:
                values["disabled"] = body.disabled
                values["disabled_reason"] = "disabled by request" if body.disabled else None
            row = await _save(conn, endpoint_id, **values)
            return Reply.json(200, endpoint_public(row))

        return await idempotent_local(request, services, merchant, work)

    @app.delete("/v1/webhook_endpoints/{endpoint_id}", response_model=models.DeletedObject,
                responses=PROBLEMS)  # fmt: skip
    async def delete_endpoint(
        endpoint_id: str, services: ServicesDep, merchant: MerchantDep
    ) -> Any:
        """Stop delivering to it; deliveries still pending are canceled."""
        from oncepay.payments.db import write

        async with write(services.db) as conn:
            await _endpoint(conn, endpoint_id, merchant.id)
            await _save(conn, endpoint_id, deleted=True, disabled=True,
                        disabled_reason="deleted")  # fmt: skip
            await conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.endpoint_id == endpoint_id,
                       webhook_deliveries.c.status == "pending")
                .values(status="canceled", last_error="endpoint deleted", updated_at=time.time())
            )  # fmt: skip
        return {"id": endpoint_id, "object": "webhook_endpoint", "deleted": True}

    @app.post("/v1/webhook_endpoints/{endpoint_id}/rotate_secret",
              response_model=models.WebhookEndpoint, **post)  # fmt: skip
    async def rotate_secret(
        endpoint_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.RotateSecret | None = None,
    ) -> Response:
        """A new signing secret (shown in this answer). For `overlap_seconds` (default a day)
        deliveries carry signatures by both the new and the old secret."""
        overlap = (body or models.RotateSecret()).overlap_seconds

        async def work(conn: AsyncConnection) -> Reply:
            row = await _endpoint(conn, endpoint_id, merchant.id)
            row = await _save(conn, endpoint_id, secret=new_secret(), previous_secret=row.secret,
                              previous_secret_expires_at=time.time() + overlap)  # fmt: skip
            return Reply.json(200, endpoint_public(row, secret=True))

        return await idempotent_local(request, services, merchant, work)

    @app.get("/v1/webhook_endpoints/{endpoint_id}/deliveries",
             response_model=models.WebhookDeliveryList, responses=PROBLEMS)  # fmt: skip
    async def endpoint_deliveries(
        endpoint_id: str,
        services: ServicesDep,
        merchant: MerchantDep,
        limit: Limit = DEFAULT_LIMIT,
        starting_after: str | None = None,
        status: models.DeliveryStatus | None = None,
    ) -> Any:
        """Deliveries to this endpoint, newest first; `status=dead` lists the dead letters."""
        async with read(services.db) as conn:
            await _endpoint(conn, endpoint_id, merchant.id, lock=False)
        where = [webhook_deliveries.c.endpoint_id == endpoint_id]
        if status is not None:
            where.append(webhook_deliveries.c.status == status)
        rows, more = await page(services.db, webhook_deliveries, merchant.id, limit,
                                starting_after, where)  # fmt: skip
        return {"object": "list", "data": [delivery_public(r) for r in rows], "has_more": more}

    @app.get("/v1/events/{event_id}/deliveries", response_model=models.WebhookDeliveryList,
             responses=PROBLEMS)  # fmt: skip
    async def event_deliveries(event_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        await get_object(services.db, events, event_id, merchant.id)
        async with read(services.db) as conn:
            rows = list(await conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.event_id == event_id)
                .order_by(webhook_deliveries.c.seq.desc())
            ))  # fmt: skip
        return {"object": "list", "data": [delivery_public(r) for r in rows], "has_more": False}

    @app.get("/v1/webhook_deliveries/{delivery_id}", response_model=models.WebhookDelivery,
             responses=PROBLEMS)  # fmt: skip
    async def get_delivery(delivery_id: str, services: ServicesDep, merchant: MerchantDep) -> Any:
        """One delivery with every attempt: status code, latency, error."""
        row = await get_object(services.db, webhook_deliveries, delivery_id, merchant.id)
        async with read(services.db) as conn:
            attempts = await conn.execute(
                select(webhook_attempts).where(webhook_attempts.c.delivery_id == delivery_id)
                .order_by(webhook_attempts.c.attempt)
            )  # fmt: skip
            log = [{"attempt": a.attempt, "status_code": a.status_code,
                    "latency_ms": round(a.latency_ms, 3), "error": a.error,
                    "created": int(a.created_at)} for a in attempts]  # fmt: skip
        return {**delivery_public(row), "attempt_log": log}

    @app.post("/v1/events/{event_id}/redeliver", response_model=models.WebhookDeliveryList,
              **post)  # fmt: skip
    async def redeliver_event(
        event_id: str,
        request: Request,
        services: ServicesDep,
        merchant: MerchantDep,
        body: models.Redeliver | None = None,
    ) -> Response:
        """Queue the event again for every enabled subscriber, or for `endpoint` only. It keeps
        its `webhook-id`, so a receiver that handled it already will not handle it twice."""
        target = body.endpoint if body else None

        async def work(conn: AsyncConnection) -> Reply:
            if (
                not is_id(event_id)
                or not (
                    await conn.execute(
                        select(events.c.id).where(
                            events.c.id == event_id, events.c.merchant_id == merchant.id
                        )
                    )
                ).first()
            ):
                raise ResourceMissing(f"no event {event_id!r}")  # fmt: skip
            if target is not None:
                await _endpoint(conn, target, merchant.id)
            ids = await redeliver(conn, merchant_id=merchant.id, event_id=event_id,
                                  endpoint_id=target)  # fmt: skip
            rows = await conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.id.in_(ids))
            )
            data = [delivery_public(r) for r in rows]
            return Reply.json(200, {"object": "list", "data": data, "has_more": False})

        return await idempotent_local(request, services, merchant, work)
