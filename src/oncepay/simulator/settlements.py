"""Settlement reports: the money that moved on one UTC day (``GET /v1/settlements``), as JSON
or CSV, in the order it moved."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from oncepay.simulator.documents import iso
from oncepay.simulator.problems import Problem
from oncepay.simulator.schema import movements
from oncepay.simulator.state import Simulator, simulator_of

__all__ = ["SETTLEMENT_COLUMNS", "settlements"]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SETTLEMENT_COLUMNS = [
    "authorization_id",
    "reference",
    "order_id",
    "type",
    "amount",
    "currency",
    "created_at",
]


async def settlements(request: Request) -> Response:
    sim = simulator_of(request)
    day = _settlement_day(request.query_params.get("date"))
    fmt = request.query_params.get("format", "json")
    if fmt not in {"json", "csv"}:
        raise Problem(400, "invalid_format", "format must be json or csv")
    await sim.before("settlements")  # a read: nothing commits, so no after-commit faults
    await sim.ready()
    entries = await _movements_on(sim, day)
    if fmt == "csv":
        return _csv(entries)
    return JSONResponse({"date": day.isoformat(), "entries": entries})


def _settlement_day(value: str | None) -> date:
    if value is None or not _DATE.match(value):
        raise Problem(400, "invalid_date", "date must be YYYY-MM-DD (a UTC day)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Problem(400, "invalid_date", f"{value} is not a calendar date") from None


async def _movements_on(sim: Simulator, day: date) -> list[dict[str, Any]]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    end = start + timedelta(days=1).total_seconds()
    query = (
        select(*(movements.c[name] for name in SETTLEMENT_COLUMNS))
        .where(movements.c.created_at >= start, movements.c.created_at < end)
        .order_by(movements.c.created_at, movements.c.reference)
    )
    async with sim.reading() as conn:
        rows = (await conn.execute(query)).mappings().all()
    return [{**row, "created_at": iso(row["created_at"])} for row in rows]


def _csv(entries: list[dict[str, Any]]) -> Response:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SETTLEMENT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(entries)
    return Response(out.getvalue(), media_type="text/csv")
