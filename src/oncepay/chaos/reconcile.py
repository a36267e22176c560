"""Reconciliation in the chaos audit (SPEC §10, docs/guarantees.md): orphaned authorizations
are injected directly at both acquirers (approved there, with no OncePay payment behind them,
as a crash between an acquirer's approval and OncePay's commit would leave them); after the
drain every day of the run is reconciled for both acquirers, twice, and the audit requires:

* no discrepancy other than the injected orphans (the faults moved no money OncePay does not
  know of, and OncePay knows of none the acquirers did not settle);
* each injected orphan voided at its acquirer exactly once (its operations counted), and none
  of OncePay's own authorizations voided by reconciliation;
* the second pass over the same days changes nothing (no run, discrepancy or void added)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import func, select

from oncepay.payments.context import Services
from oncepay.payments.settings import Settings
from oncepay.reconciliation.store import discrepancies, runs
from oncepay.storage.db import Database, read
from oncepay.storage.ids import new_id

__all__ = [
    "ACQUIRERS",
    "Injected",
    "Reconciled",
    "checks",
    "days_between",
    "inject_orphans",
    "reconcile_all",
    "reconcile_stack",
    "summary",
]

ACQUIRERS = ("primary", "secondary")
ORPHAN_KIND = "orphaned_authorization"
# An injection is retried (same reference: the acquirer keys by it) while faults strike.
INJECT_ATTEMPTS = 20


@dataclass(frozen=True, slots=True)
class Injected:
    """An authorization approved at ``acquirer`` for ``order_id``, which OncePay never saw."""

    acquirer: str
    authorization_id: str
    reference: str
    order_id: str


@dataclass
class Reconciled:
    """What reconciling every day of both acquirers, twice, left behind."""

    days: list[str] = field(default_factory=list)
    runs: int = 0  # kept runs after the first pass
    discrepancies: list[dict[str, Any]] = field(default_factory=list)  # every one, any status
    runs_again: int = 0  # kept runs after the second pass
    discrepancies_again: int = 0
    failures: list[str] = field(default_factory=list)  # runs that raised


async def inject_orphans(
    acquirers: dict[str, httpx.AsyncClient], per_acquirer: int
) -> list[Injected]:
    """``per_acquirer`` approved authorizations at each acquirer (a client whose base URL is
    the acquirer's) for orders OncePay never created, with ids shaped like OncePay's own so
    that nothing but the books tells them apart."""
    found: list[Injected] = []
    for acquirer in ACQUIRERS:
        for n in range(per_acquirer):
            order = new_id("pay")
            reference = f"{order}_a1"
            body: dict[str, Any] = {
                "reference": reference,
                "order_id": order,
                "amount": 1000 + n,
                "currency": "EUR",
                "payment_method": "pm_card_ok",
                "capture": False,
            }
            answer = await _authorize(acquirers[acquirer], body)
            found.append(Injected(acquirer, answer["id"], reference, order))
    return found


async def _authorize(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    last = ""
    for _ in range(INJECT_ATTEMPTS):
        try:
            response = await client.post("/v1/authorizations", json=body)
        except httpx.HTTPError as exc:
            last = repr(exc)
        else:
            if response.status_code == 201:
                answer: dict[str, Any] = response.json()
                if answer["status"] == "approved":
                    return answer
            last = f"{response.status_code} {response.text[:200]}"
        await asyncio.sleep(0.2)  # then the same reference again: the acquirer keys by it
    raise RuntimeError(f"could not inject an orphan at {client.base_url}: {last}")


def days_between(since: float, until: float) -> list[date]:
    """Every UTC day from the one of ``since`` to the one of ``until``."""
    first = datetime.fromtimestamp(since, UTC).date()
    last = datetime.fromtimestamp(until, UTC).date()
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


async def reconcile_all(
    services: Services, days: Sequence[date], grace_days: int = 3
) -> Reconciled:
    """Reconcile each day of both acquirers through the persisting pipeline (as the worker
    and ``oncepay reconcile`` do), then all of it a second time."""
    from oncepay.reconciliation import pipeline

    done = Reconciled(days=[d.isoformat() for d in days])
    for second in (False, True):
        for day in days:
            for acquirer in ACQUIRERS:
                try:
                    await pipeline.reconcile(services, acquirer, day=day, grace_days=grace_days)
                except Exception as exc:  # reported as a violation
                    done.failures.append(f"{acquirer} {day}: {exc!r}")
        count_runs, found = await _kept(services.db)
        if second:
            done.runs_again, done.discrepancies_again = count_runs, len(found)
        else:
            done.runs, done.discrepancies = count_runs, found
    return done


async def reconcile_stack(
    database_url: str, urls: dict[str, str], days: Sequence[date]
) -> Reconciled:
    """:func:`reconcile_all` for the chaos stack: the acquirers reached at ``urls``, as the
    stack's API processes and worker reach them."""
    from oncepay.payments import bootstrap

    settings = Settings(
        database_url=database_url,
        acquirer_url=urls["primary"],
        secondary_acquirer_url=urls["secondary"],
        run_worker=False,
    )
    services = await bootstrap.start(settings)
    try:
        return await reconcile_all(services, days)
    finally:
        await services.aclose()


async def _kept(db: Database) -> tuple[int, list[dict[str, Any]]]:
    async with read(db) as conn:
        count_runs = (await conn.execute(select(func.count()).select_from(runs))).scalar_one()
        rows = (await conn.execute(select(discrepancies))).mappings().all()
    return int(count_runs), [dict(row) for row in rows]


def checks(
    injected: list[Injected], reconciled: Reconciled, operations: list[dict[str, Any]]
) -> dict[str, list[str]]:
    """Violations by check; every list must be empty. ``operations`` are both acquirers'
    operations after the reconciliation, each with its ``acquirer``."""
    return {
        "reconciliation finds only the injected orphans": _only_orphans(injected, reconciled),
        "each injected orphan voided exactly once": _voided_once(injected, operations),
        "reconciling again changes nothing": _again(reconciled),
    }


def _only_orphans(injected: list[Injected], reconciled: Reconciled) -> list[str]:
    expected = {(i.acquirer, ORPHAN_KIND, i.reference) for i in injected}
    found = [f"a run failed: {failure}" for failure in reconciled.failures]
    seen = set()
    for row in reconciled.discrepancies:
        key = (row["acquirer"], row["kind"], row["reference"])
        seen.add(key)
        if key not in expected:
            found.append(f"{row['acquirer']} {row['kind']} {row['reference']}: {row['detail']}")
    found += [f"{a} {r}: the injected orphan was not found" for a, _, r in expected - seen]
    return found


def _voided_once(injected: list[Injected], operations: list[dict[str, Any]]) -> list[str]:
    voids = Counter(
        (op["acquirer"], op["authorization_id"])
        for op in operations
        if op["type"] == "void" and op["status"] == "approved"
    )
    found = [
        f"{i.acquirer} {i.authorization_id} ({i.reference}): voided {n} times"
        for i in injected
        if (n := voids.get((i.acquirer, i.authorization_id), 0)) != 1
    ]
    orphans = {(i.acquirer, i.authorization_id) for i in injected}
    found += [
        f"{op['acquirer']} {op['reference']}: reconciliation voided OncePay's own authorization"
        for op in operations
        if op["type"] == "void"
        and op["reference"].endswith("_orphan_void")
        and (op["acquirer"], op["authorization_id"]) not in orphans
    ]
    return found


def _again(reconciled: Reconciled) -> list[str]:
    found = []
    if reconciled.runs_again != reconciled.runs:
        found.append(f"runs: {reconciled.runs} after the first pass, {reconciled.runs_again} after")
    if reconciled.discrepancies_again != len(reconciled.discrepancies):
        found.append(
            f"discrepancies: {len(reconciled.discrepancies)} after the first pass, "
            f"{reconciled.discrepancies_again} after the second"
        )
    return found


def summary(injected: list[Injected], reconciled: Reconciled) -> dict[str, int]:
    """The report's figures: orphans injected, days and runs, discrepancies by kind."""
    kinds = Counter(row["kind"] for row in reconciled.discrepancies)
    return {
        "orphans injected": len(injected),
        "days reconciled per acquirer": len(reconciled.days),
        "runs kept": reconciled.runs,
        **{f"discrepancies: {kind}": n for kind, n in sorted(kinds.items())},
    }
