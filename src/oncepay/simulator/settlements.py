"""Settlement reports: the money that moved on one UTC day (``GET /v1/settlements``), as JSON
or CSV, in the order it moved; and the day's authorizations
(``GET /v1/settlements/authorizations``, also in the JSON report).

Each line carries SPEC §10's columns first (``reference, type, amount, currency, fee, net,
settled_at, payout_id``), then the simulator's own (``authorization_id, order_id,
created_at``). The simulator settles a movement the day it happens; the fee comes from its
:class:`~oncepay.reconciliation.fees.FeeSchedule` and every currency's lines of a day are paid
out together, so a payout's lines sum to its net (the JSON's ``payouts``)."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Table, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from oncepay.reconciliation.fees import FeeSchedule
from oncepay.simulator.documents import iso
from oncepay.simulator.problems import Problem
from oncepay.simulator.schema import authorizations, movements
from oncepay.simulator.state import Simulator, simulator_of

__all__ = ["AUTHORIZATION_COLUMNS", "SETTLEMENT_COLUMNS", "day_authorizations", "settlements"]

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
SETTLEMENT_COLUMNS = [
    "reference",
    "type",
    "amount",
    "currency",
    "fee",
    "net",
    "settled_at",
    "payout_id",
    "authorization_id",
    "order_id",
    "created_at",
]
_MOVEMENT_COLUMNS = ["reference", "type", "amount", "currency", "authorization_id", "order_id"]
AUTHORIZATION_COLUMNS = [
    "id",
    "reference",
    "order_id",
    "amount",
    "currency",
    "status",
    "voided",
    "captured_amount",
]


async def settlements(request: Request) -> Response:
    sim = simulator_of(request)
    day, fmt = _settlement_day(request.query_params.get("date")), _format(request)
    await sim.before("settlements")  # a read: nothing commits, so no after-commit faults
    await sim.ready()
    entries = [_settled(row, day, sim.fees) for row in await _movements_on(sim, day)]
    if fmt == "csv":
        return _csv(entries, SETTLEMENT_COLUMNS)
    document = {
        "date": day.isoformat(),
        "entries": entries,
        "payouts": _payouts(entries),
        "authorizations": await _authorizations_on(sim, day),
    }
    return JSONResponse(document)


async def day_authorizations(request: Request) -> Response:
    """The authorizations created on the day, whatever became of them: the orphans are among
    the approved ones that were never voided."""
    sim = simulator_of(request)
    day, fmt = _settlement_day(request.query_params.get("date")), _format(request)
    await sim.before("settlements")
    await sim.ready()
    rows = await _authorizations_on(sim, day)
    if fmt == "csv":
        return _csv(rows, AUTHORIZATION_COLUMNS)
    return JSONResponse({"date": day.isoformat(), "authorizations": rows})


def _format(request: Request) -> str:
    fmt = request.query_params.get("format", "json")
    if fmt not in {"json", "csv"}:
        raise Problem(400, "invalid_format", "format must be json or csv")
    return fmt


def _settlement_day(value: str | None) -> date:
    if value is None or not _DATE.match(value):
        raise Problem(400, "invalid_date", "date must be YYYY-MM-DD (a UTC day)")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Problem(400, "invalid_date", f"{value} is not a calendar date") from None


def _settled(row: dict[str, Any], day: date, fees: FeeSchedule) -> dict[str, Any]:
    fee = fees.fee(row["type"], row["amount"])
    moved_at = iso(row["created_at"])
    return {
        **row,
        "fee": fee,
        "net": FeeSchedule.net(row["type"], row["amount"], fee),
        "settled_at": moved_at,
        "payout_id": f"po_{day:%Y%m%d}_{row['currency']}",
        "created_at": moved_at,
    }


def _payouts(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    payouts: dict[str, dict[str, Any]] = {}
    for entry in entries:
        payout = payouts.setdefault(
            entry["payout_id"],
            {"id": entry["payout_id"], "currency": entry["currency"], "net": 0, "lines": 0},
        )
        payout["net"] += entry["net"]
        payout["lines"] += 1
    return [payouts[key] for key in sorted(payouts)]


async def _movements_on(sim: Simulator, day: date) -> list[dict[str, Any]]:
    columns = [*_MOVEMENT_COLUMNS, "created_at"]
    return await _rows_on(sim, day, movements, columns)


async def _authorizations_on(sim: Simulator, day: date) -> list[dict[str, Any]]:
    rows = await _rows_on(sim, day, authorizations, [*AUTHORIZATION_COLUMNS, "created_at"])
    return [
        {**row, "voided": bool(row["voided"]), "created_at": iso(row["created_at"])} for row in rows
    ]


async def _rows_on(
    sim: Simulator, day: date, table: Table, columns: list[str]
) -> list[dict[str, Any]]:
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    end = start + timedelta(days=1).total_seconds()
    query = (
        select(*(table.c[name] for name in columns))
        .where(table.c.created_at >= start, table.c.created_at < end)
        .order_by(table.c.created_at, table.c.reference)
    )
    async with sim.reading() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings().all()]


def _csv(entries: list[dict[str, Any]], columns: list[str]) -> Response:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(entries)
    return Response(out.getvalue(), media_type="text/csv")
