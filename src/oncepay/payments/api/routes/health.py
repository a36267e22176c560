"""Operations endpoints: health (the database answers) and Prometheus metrics."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from oncepay.payments.api.deps import ServicesDep, operator_required, resource_router
from oncepay.payments.metrics import exposition
from oncepay.payments.reads import ping

__all__ = ["router"]

router = resource_router()


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, str]:
    await ping(services.db)
    return {"status": "ok"}


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    if services.settings.metrics_require_token:  # docs/observability.md, "Metrics"
        await operator_required(request, services)
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
