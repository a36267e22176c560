"""The recovery worker (SPEC §5): the completer and the reaper (and, every
``reconcile_interval``, reconciliation: SPEC §10, ``oncepay.reconciliation.pipeline``).

* The **completer** finds requests whose holder went away — an idempotency record still
  executing, with a recovery point, whose lease lapsed — takes each over through the engine
  (fenced: a live holder or a retrying client keeps it) and drives it to the end from its
  recovery point. Unknown acquirer outcomes come back here each time their short lease lapses:
  that lease is the back-off schedule.
* The **reaper** purges expired idempotency records in bounded batches.

Running several workers, or a worker beside client retries, is safe: every takeover is a fenced
claim, so one holder at a time drives each request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date

from sqlalchemy import text

from oncepay.errors import ConfigurationError
from oncepay.idempotency.purge import purge_expired
from oncepay.insight.live import LiveInsight
from oncepay.payments import idempotent, operations
from oncepay.payments.context import Services
from oncepay.payments.events import finding_opened
from oncepay.payments.metrics import (
    INSIGHT_FINDINGS,
    INSIGHT_RECORDS,
    RECOVERY_RUNS,
    sync_usage_logs,
)
from oncepay.payments.phases import Operation, parse_point
from oncepay.payments.storage.idempotency import IDEMPOTENCY_TABLE
from oncepay.payments.webhooks.delivery import delivery_client, keep_delivering
from oncepay.reconciliation.pipeline import reconcile_recent
from oncepay.reconciliation.queries import observe, observe_failure, observe_open
from oncepay.reconciliation.remediation import ORPHAN_VOID, VoidOrphan
from oncepay.storage.db import read, write

__all__ = ["RecoveryReport", "reap", "recover_once", "run_worker"]

log = logging.getLogger("oncepay.worker")

# How often the adaptive TTL file is checked for a change (a stat): a new analysis is applied
# within half a minute.
TTL_FILE_CHECK = 30.0

# Abandoned requests taken per pass: enough to drain a crash's backlog in a few passes,
# few enough that one pass never holds the worker for long.
RECOVERY_BATCH = 100
PURGE_BATCH = 1000


@dataclass
class RecoveryReport:
    results: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.results.values())


async def abandoned(
    svc: Services, now: float, limit: int = RECOVERY_BATCH
) -> list[tuple[str, str, str, str]]:
    """(scope, key, fingerprint, recovery point) of requests whose holder went away."""
    async with read(svc.db) as conn:
        rows = await conn.execute(
            text(
                "SELECT scope, idempotency_key, fingerprint, recovery_point "
                f"FROM {IDEMPOTENCY_TABLE} WHERE state = 'executing' AND lease_expires_at <= :now "
                "AND expires_at > :now AND recovery_point IS NOT NULL "
                "ORDER BY lease_expires_at LIMIT :limit"
            ),
            {"now": now, "limit": limit},
        )
        return [(row[0], row[1], row[2], row[3]) for row in rows]


async def recover_once(svc: Services, *, now: float | None = None) -> RecoveryReport:
    """One pass of the completer over every abandoned request found now."""
    report = RecoveryReport()
    for scope, key, fingerprint, recovery_point in await abandoned(svc, now or time.time()):
        parsed = parse_point(recovery_point)
        if parsed is None:
            continue
        _, op_name, object_id = parsed
        try:
            op = _resumable(op_name, object_id)
            reply = await idempotent.resume(svc, scope, key, fingerprint, op)
        except Exception:  # one bad record must not stall the others behind it
            log.exception("recovery of key %r at %r failed", key, recovery_point)
            reply, result = None, "error"
        else:
            result = (
                "skipped" if reply is None else ("unknown" if reply.status >= 500 else "finished")
            )
        RECOVERY_RUNS.labels(result).inc()
        report.results[result] += 1
    return report


def _resumable(op_name: str, object_id: str) -> Operation:
    """The operation a recovery point names: a payment's, or reconciliation's orphan void."""
    if op_name == ORPHAN_VOID:
        return VoidOrphan(object_id)
    return operations.resume(op_name, object_id)


async def keep_unfinished(svc: Services, *, now: float | None = None) -> int:
    """Push out the expiry of every request still unfinished and abandoned (executing, with a
    recovery point, its lease lapsed) to ``unfinished_retention`` from now, so the reaper never
    purges a half-done request and a late retry resumes it instead of starting it anew.

    Live requests are left alone (they finish, or are abandoned and caught by a later pass),
    and so are rows locked by a phase right now (``SKIP LOCKED``): this pass must never wait
    for — or deadlock with — the requests it looks after."""
    now = time.time() if now is None else now
    keep = svc.settings.unfinished_retention
    lock = "" if svc.db.is_sqlite else " FOR UPDATE SKIP LOCKED"
    async with write(svc.db) as conn:
        result = await conn.execute(
            text(
                f"UPDATE {IDEMPOTENCY_TABLE} SET expires_at = :until "
                f"WHERE (scope, idempotency_key) IN (SELECT scope, idempotency_key "
                f"FROM {IDEMPOTENCY_TABLE} WHERE state = 'executing' "
                "AND recovery_point IS NOT NULL AND lease_expires_at <= :now "
                f"AND expires_at < :threshold{lock})"
            ),
            {"until": now + keep, "threshold": now + keep / 2, "now": now},
        )
        return int(result.rowcount or 0)


async def reap(svc: Services, *, now: float | None = None) -> int:
    """Purge expired idempotency records, a bounded batch at a time."""
    return await purge_expired(svc.engine.store, now=now or time.time(), batch=PURGE_BATCH)


async def run_worker(svc: Services, stop: asyncio.Event) -> None:
    """Every ``worker_interval`` seconds until ``stop``: recover and reap in one loop, deliver
    webhooks in another, so a slow webhook endpoint never delays recovery."""
    async with delivery_client() as client:

        async def recovery() -> bool:
            report = await recover_once(svc)
            if report.total:
                log.info("recovery: %s", dict(report.results))
            await keep_unfinished(svc)
            await reap(svc)
            return report.total >= RECOVERY_BATCH

        async def reconciliation() -> bool:
            for result in await reconcile_recent(svc, failed=reconciliation_failed):
                observe(result)  # the reconciliation metrics (docs/reconciliation.md)
                log.info("reconciliation %s %s: %s", result.acquirer, result.day, result)
            await observe_open(svc.db)
            return False

        async def learned_ttls() -> bool:
            """The adaptive TTL file read again when it changed; a broken one is logged and
            the TTLs learned before stay."""
            assert svc.ttl_policy is not None
            try:
                if await asyncio.to_thread(svc.ttl_policy.reload):
                    log.info("learned TTLs reloaded: %d applied", len(svc.ttl_policy.learned()))
            except ConfigurationError as exc:
                log.warning("%s; the TTLs learned before stay", exc.detail)
            return False

        live = insight_job(svc)
        jobs = [
            _every(svc, stop, recovery),
            keep_delivering(svc, client, stop, interval=svc.settings.worker_interval),
        ]
        if live is not None:
            jobs.append(_every(svc, stop, live))
        if svc.ttl_policy is not None and svc.settings.adaptive_ttl_file:
            jobs.append(_every(svc, stop, learned_ttls, TTL_FILE_CHECK))
        if svc.settings.reconcile_interval > 0:
            jobs.append(_every(svc, stop, reconciliation, svc.settings.reconcile_interval))
        try:
            await asyncio.gather(*jobs)
        finally:
            if live is not None:
                live.close()


@dataclass
class InsightJob:
    """The detectors on the live key-usage log (docs/insight.md): each run reads what was
    appended, stores the findings (their events with them) and counts it all in /metrics; the
    learned TTLs go to the gate's policy unless a file is its source."""

    svc: Services
    live: LiveInsight

    async def __call__(self) -> bool:
        step = await self.live.step()
        INSIGHT_RECORDS.inc(step.records)
        for finding in step.opened:
            INSIGHT_FINDINGS.labels(finding.kind).inc()
            log.warning("insight: %s %s: %s", finding.tenant, finding.kind, finding.detail)
        sync_usage_logs()
        policy, settings = self.svc.ttl_policy, self.svc.settings
        if step.ttl is not None and policy is not None and not settings.adaptive_ttl_file:
            policy.update(step.ttl)
        return step.more

    def close(self) -> None:
        self.live.close()


def reconciliation_failed(acquirer: str, day: date, exc: Exception) -> None:
    """A scheduled day that could not be reconciled: counted
    (``oncepay_reconciliation_runs{outcome="failed"}``) and logged; the next pass tries it
    again, and the other acquirers and days of this pass still run."""
    observe_failure(acquirer)
    log.error("reconciliation %s %s failed; trying again next pass", acquirer, day, exc_info=exc)


def insight_job(svc: Services) -> InsightJob | None:
    """The worker's insight job, or None without a key-usage log."""
    if not svc.settings.usage_log:
        return None
    return InsightJob(svc, LiveInsight(svc.settings.usage_log, svc.db, announce=finding_opened))


async def _every(
    svc: Services,
    stop: asyncio.Event,
    job: Callable[[], Awaitable[bool]],
    interval: float | None = None,
) -> None:
    """Run ``job`` until ``stop``; wait ``interval`` (``worker_interval``) between runs unless
    it says more work is already waiting (a backlog is worked off at full speed, not one batch
    a tick)."""
    while not stop.is_set():
        busy = False
        try:
            busy = await job()
        except Exception:
            log.exception("worker job failed; trying again next interval")
        if busy:
            await asyncio.sleep(0)  # let the API's own requests in between batches
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval or svc.settings.worker_interval)
