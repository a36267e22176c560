"""What tests and operators ask of a running simulator: its faults (read and replace), the
operations it recorded, and its health. Faults never strike here."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.engine import RowMapping
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from oncepay.simulator.bodies import explain
from oncepay.simulator.documents import iso
from oncepay.simulator.faults import Faults
from oncepay.simulator.problems import Problem
from oncepay.simulator.schema import operations
from oncepay.simulator.state import simulator_of

__all__ = ["get_faults", "health", "list_operations", "put_faults"]


async def get_faults(request: Request) -> Response:
    return JSONResponse(simulator_of(request).faults.model_dump(mode="json"))


async def put_faults(request: Request) -> Response:
    try:
        faults = Faults.model_validate_json(await request.body())
    except ValidationError as exc:
        raise Problem(400, "invalid_request", explain(exc)) from None
    simulator_of(request).faults = faults
    return JSONResponse(faults.model_dump(mode="json"))


async def list_operations(request: Request) -> Response:
    sim = simulator_of(request)
    await sim.ready()
    query = select(operations).order_by(operations.c.created_at, operations.c.reference)
    order_id = request.query_params.get("order_id")
    if order_id is not None:
        query = query.where(operations.c.order_id == order_id)
    async with sim.reading() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return JSONResponse({"operations": [_operation_summary(row) for row in rows]})


def _operation_summary(row: RowMapping) -> dict[str, Any]:
    keys = ("reference", "type", "authorization_id", "order_id", "status", "amount", "currency")
    return {**{key: row[key] for key in keys}, "created_at": iso(row["created_at"])}


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})
