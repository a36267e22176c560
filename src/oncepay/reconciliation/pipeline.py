"""The reconciliation pipeline: one acquirer's day, end to end, persisted (SPEC §10).

:func:`reconcile` is the one entry point (``oncepay reconcile``, the worker's schedule, the
operator API and the chaos audit all call it):

1. **Read.** The acquirer's settlement report of ``day`` (fetched from the acquirer, or the
   ``report`` bytes given, read through ``mapping``), its earlier reports of the grace window
   (what settled before: a second settlement is a duplicate), the day's approved
   authorizations. A first pass reads the whole report and keeps only its line count: a
   report that cannot be read raises :class:`~oncepay.reconciliation.errors.ReportError`
   before anything is written. Meanwhile OncePay's movements, payments and holds are read
   from the payments database (the books).
2. **Match and settle, streaming.** A second pass feeds each line to
   :class:`~oncepay.reconciliation.matcher.Matching`; every
   :data:`~oncepay.reconciliation.settlement.BATCH` settled pairs are posted once
   (:mod:`.settlement`: guard row, journal, the payment's settlement columns and a
   ``payment.settled`` event, one transaction per batch) by a task of its own while the next
   batch is matched. Memory holds the books and a batch or two, never the report's pairs.
   Then :func:`~oncepay.reconciliation.matcher.refine` (money settled on a failed or
   canceled payment).
3. **Plan remediation.** Orphaned authorizations (void) and stale ones (cancel the payment).
   More actions not taken before than ``settings.reconcile_action_cap``: none is taken and one
   ``remediation_withheld`` discrepancy is raised instead.
4. **Keep the run.** The run row and the discrepancies it found, the new ones with a
   ``reconciliation.discrepancy_opened`` event to the merchant of the payment they name (one
   that names no payment of OncePay has no merchant to tell: operators see it), in one
   transaction.
5. **Remediate** (:mod:`.remediation`): each action once, through the idempotency engine; a
   done action resolves its discrepancy with a note.

Idempotent: a re-run of a day with nothing new writes nothing (no run row, settlement, ledger
entry, event, discrepancy or action), and two runs at once write each row once. The run's id is
a digest of (acquirer, day, outcome)."""

from __future__ import annotations

import asyncio
import gc
import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import select

from oncepay import _heap as heap
from oncepay.payments.context import Services
from oncepay.payments.events import emit_many
from oncepay.reconciliation.acquirer import AcquirerReports
from oncepay.reconciliation.bulk import settled_references
from oncepay.reconciliation.fees import DEFAULT_SCHEDULE, FeeSchedule
from oncepay.reconciliation.mapping import ONCEPAY, ColumnMapping
from oncepay.reconciliation.matcher import (
    DEFAULT_GRACE_DAYS,
    DEFAULT_VALIDITY_DAYS,
    Books,
    Matching,
    alert,
    named_payment,
    refine,
    without_in_flight,
)
from oncepay.reconciliation.records import (
    Authorization,
    Discrepancy,
    Kind,
    Operation,
    Outcome,
    ReportLine,
)
from oncepay.reconciliation.remediation import (
    CANCEL_STALE,
    VOID_ORPHAN,
    Action,
    canceled_as_stale,
    finished,
    take,
    unfinished,
    voided_by_us,
)
from oncepay.reconciliation.report import counting, read_report, report_lines
from oncepay.reconciliation.settlement import BATCH, Posted, post_settlements, without_settled
from oncepay.reconciliation.source import (
    holds_from,
    holds_of,
    in_flight,
    merchants_of,
    operations_between,
    payments_by_id,
)
from oncepay.reconciliation.store import OpenedDiscrepancy, actions, save_run_in, statuses
from oncepay.storage.db import Database, read, write

__all__ = ["RunResult", "reconcile", "reconcile_recent"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one run found and did.

    ``discrepancies`` are all those the run found (the SPEC §10 document lists them); of them
    ``opened`` were new (no earlier run had found them) and ``still_open`` remain open after
    remediation (``oncepay reconcile`` exits 1 when it is not 0). ``settled`` counts the lines
    posted to the ledger by this run (0 on a re-run). Actions: ``taken`` were done now;
    ``withheld`` were over the cap (none taken, one alert raised); ``pending`` are held by
    another run or wait for the acquirer's answer (they are resumed); ``refused`` the acquirer
    (or the payment's state) refused."""

    run_id: str
    acquirer: str
    day: date
    lines: int  # movements read from the report (row types the mapping skips not counted)
    matched: int
    settled: int
    discrepancies: tuple[Discrepancy, ...]
    opened: int
    still_open: int
    new_run: bool  # False: the same outcome was kept before, no run row written
    actions_taken: int = 0
    actions_withheld: int = 0
    actions_pending: int = 0
    actions_refused: int = 0
    opened_kinds: dict[str, int] = field(default_factory=dict)  # kind -> opened by this run

    def as_json(self) -> dict[str, object]:
        """The SPEC §10 document, ``{"matched": N, "discrepancies": [...]}``."""
        return {
            "matched": self.matched,
            "discrepancies": [d.as_json() for d in self.discrepancies],
        }


async def reconcile(
    services: Services,
    acquirer: str,
    *,
    day: date | None = None,
    report: bytes | None = None,
    grace_days: int = DEFAULT_GRACE_DAYS,
    now: float | None = None,
    mapping: ColumnMapping = ONCEPAY,
    reports: AcquirerReports | None = None,
) -> RunResult:
    """Reconcile ``acquirer`` (a configured name: primary, secondary) for the UTC ``day``
    (default: today, by ``now``), persist the run, post the settlements, remediate.

    ``report``: the report's bytes (a real processor's, through ``mapping``) instead of the
    acquirer's; it is then matched with no authorizations and no earlier reports, and fees are
    checked only for ``net = amount - fee``. ``reports``: where the acquirer's reports come
    from (default: the configured acquirer's own address). Raises
    :class:`~oncepay.reconciliation.errors.ReportError` for an unreadable report and
    :class:`~oncepay.reconciliation.acquirer.AcquirerUnavailable` when the reports cannot be
    fetched; nothing is written in either case."""
    now = time.time() if now is None else now
    day = day or datetime.fromtimestamp(now, UTC).date()
    if acquirer not in {a.name for a in services.acquirers}:
        raise ValueError(f"no acquirer {acquirer!r} is configured")
    db = services.db
    inputs = await _inputs(services, acquirer, day, report, grace_days, reports)
    chosen = mapping if report else ONCEPAY
    with _long_lived():
        count, flying, books = await _validated(services, acquirer, day, grace_days, inputs, chosen)
        gc.freeze()  # the books: a million objects, alive until the run ends
        outcome, posted = await _match_and_post(
            db, acquirer, day, grace_days, now, inputs, chosen, books
        )
    outcome = refine(outcome, await payments_by_id(db, _unknown_payments(outcome)))
    outcome = without_in_flight(outcome, flying)
    outcome = await _without_settled_missing(db, outcome)
    planned = await _plan(services, acquirer, outcome)
    done_before = await finished(db, planned)
    fresh = [action for action in planned if action.id not in done_before]
    cap = services.settings.reconcile_action_cap
    withheld = 0
    if len(fresh) > cap:
        withheld, planned = len(fresh), [a for a in planned if a.id in done_before]
        outcome = _with_alert(outcome, acquirer, day, len(fresh), cap)
    saved = await _keep(services, acquirer, day, outcome, now, count)
    tally = await _remediate(services, acquirer, planned, saved.run_id, set(done_before))
    found = await statuses(
        db, acquirer, [(d.kind.value, d.reference) for d in outcome.discrepancies]
    )
    still_open = sum(
        1 for d in outcome.discrepancies if found.get((d.kind.value, d.reference)) == "open"
    )
    taken = await _actions_of(db, acquirer, outcome.discrepancies)
    told = tuple(_told(d, taken.get(d.reference), withheld > 0) for d in outcome.discrepancies)
    kinds: dict[str, int] = {}
    for opened in saved.opened_rows:
        kinds[opened.found.kind.value] = kinds.get(opened.found.kind.value, 0) + 1
    return RunResult(
        run_id=saved.run_id,
        acquirer=acquirer,
        day=day,
        lines=count,
        matched=outcome.matched,
        settled=posted.lines,
        discrepancies=told,
        opened=saved.opened,
        still_open=still_open,
        new_run=saved.new_run,
        actions_taken=tally.get("done", 0),
        actions_withheld=withheld,
        actions_pending=tally.get("in_progress", 0),
        actions_refused=tally.get("refused", 0),
        opened_kinds=kinds,
    )


@contextmanager
def _long_lived() -> Iterator[None]:
    """Keep the cyclic garbage collector off the objects alive at the start and after each
    ``gc.freeze()`` (the books) until the block ends. Its full collections walk every tracked
    object, the books' million included, and a run allocates enough to trigger a dozen: at
    100k lines they were a quarter of the run's CPU time (bench/reconciliation/RESULTS.md).
    New garbage is still collected, less often (:data:`_YOUNG`); the frozen objects are handed
    back to the collector at the end (``gc.unfreeze``), whatever happened, and its thresholds
    restored when the last run in the process ends. Concurrent runs in one process may unfreeze
    each other's objects early: a cost, never a leak."""
    gc.freeze()
    if not _Sparse.runs:
        _Sparse.saved = gc.get_threshold()
        gc.set_threshold(_YOUNG, *_Sparse.saved[1:])
    _Sparse.runs += 1
    try:
        yield
    finally:
        _Sparse.runs -= 1
        if not _Sparse.runs:
            gc.set_threshold(*_Sparse.saved)
        gc.unfreeze()
        if not _Sparse.runs:
            heap.resettle()  # a serving process's start-up objects: frozen again


# Allocations between two young collections during a run (Python's default: 700). A line
# allocates a few tuples the collector tracks (its cells, the line, its pair with the
# operation, its staged row), most alive until their batch is posted: every young collection
# walked the batches in flight, and the young and middle collections took ~2.8 s of a 1M
# run's loop (5,600 and 490 of them). At 100,000 a 1M run makes some 40, and what they free
# (cycles, rare here) waits at most that many allocations.
_YOUNG = 100_000


class _Sparse:
    """Runs in their passes in this process, and the thresholds the first of them found."""

    runs = 0
    saved: tuple[int, int, int] = gc.get_threshold()


# Lines between two turns of the event loop while a pass runs (the other task's database
# replies are handled at each turn).
_YIELD_EVERY = 256


class _Poster:
    """Posts settled pairs a batch at a time, each in a task (and a transaction) of its own,
    so that the database writes while the next batch is parsed and matched here.

    Two batches may be in flight (:data:`_IN_FLIGHT`). On PostgreSQL each has its own
    connection, so the server writes two batches at once (one core each on a 2-core machine),
    but only when they share no payment and no reference: two transactions that lock the
    same payment rows in different orders could deadlock, and a reference's guard would make
    the later batch wait anyway. A batch that shares one waits for the batch it shares with.
    On SQLite the second batch is staged on a connection of its own while the first writes
    (settlement's ``_post_staged_ahead``), then waits for the one writer (``write``'s lock, in
    order: no deadlock, whatever they share) and starts at once, with no gap for the loop to
    notice the first one's end. Each batch is
    still its own transaction: one that dies writes nothing, and a batch after it may have
    committed already (a re-run settles what is left, as after any failure)."""

    def __init__(self, db: Database, acquirer: str, now: float) -> None:
        self.db, self.acquirer, self.now = db, acquirer, now
        self.posted = Posted()
        self.flying: list[tuple[asyncio.Future[Posted], frozenset[str]]] = []
        self.rerun = False  # the last batch posted had every line settled already

    async def post(self, batch: list[tuple[ReportLine, Operation]]) -> None:
        if not batch:
            return
        touched: frozenset[str] = frozenset()  # SQLite: its one writer orders the batches
        if not self.db.is_sqlite:
            touched = frozenset(op.payment_id for _, op in batch) | frozenset(
                op.reference for _, op in batch
            )
        while self.flying and (
            len(self.flying) >= _IN_FLIGHT or any(touched & seen for _, seen in self.flying)
        ):
            task, _ = self.flying.pop(0)
            await task
        task = asyncio.ensure_future(self._post(batch))
        self.flying.append((task, touched))

    async def _post(self, batch: list[tuple[ReportLine, Operation]]) -> Posted:
        """One batch; once a batch found every line settled (a re-run), the next ones are
        first checked in a read-only transaction and only their unsettled lines posted."""
        if self.rerun:
            batch, twice = await without_settled(self.db, batch)
            self.posted.twice += twice
            if not batch:
                return self.posted
        mine = Posted()
        await post_settlements(self.db, self.acquirer, batch, now=self.now, posted=mine)
        self.posted.lines += mine.lines
        self.posted.payments += mine.payments
        self.posted.twice += mine.twice
        self.rerun = not mine.lines
        return self.posted

    async def done(self) -> Posted:
        while self.flying:
            task, _ = self.flying.pop(0)
            await task
        return self.posted

    async def abandon(self) -> None:
        """After a failure: let the batches being posted finish (or fail) on their own terms."""
        flying, self.flying = self.flying, []
        await asyncio.gather(*(task for task, _ in flying), return_exceptions=True)


# Batches posted at once (see _Poster).
_IN_FLIGHT = 2


async def reconcile_recent(
    services: Services,
    *,
    now: float | None = None,
    failed: Callable[[str, date, Exception], None] | None = None,
) -> list[RunResult]:
    """The worker's schedule: every configured acquirer's previous day and the current day so
    far. With ``failed``, a day that cannot be reconciled (its report unreachable, say) is
    handed to it and the others still run (the next pass tries it again); without, the error
    is raised."""
    now = time.time() if now is None else now
    today = datetime.fromtimestamp(now, UTC).date()
    grace = services.settings.reconcile_grace_days
    results = []
    for acquirer in services.acquirers:
        for day in (today - timedelta(days=1), today):
            try:
                result = await reconcile(
                    services, acquirer.name, day=day, grace_days=grace, now=now
                )
            except Exception as exc:
                if failed is None:
                    raise
                failed(acquirer.name, day, exc)
            else:
                results.append(result)
    return results


# -- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Inputs:
    report: bytes
    authorizations: list[Authorization]
    settled_before: frozenset[str]
    fees: FeeSchedule | None
    from_file: bool = False  # a report given (--report), not the acquirer's report of the day


async def _inputs(
    services: Services,
    acquirer: str,
    day: date,
    report: bytes | None,
    grace_days: int,
    reports: AcquirerReports | None,
) -> _Inputs:
    if report is not None:
        return _Inputs(report, [], frozenset(), None, from_file=True)
    source = reports or AcquirerReports.of(services.acquirers[acquirer])
    try:
        earlier: set[str] = set()
        for back in range(grace_days, 0, -1):
            past = await source.settlement_csv(day - timedelta(days=back))
            earlier.update(line.reference for line in read_report(io.BytesIO(past), ONCEPAY))
        today = await source.settlement_csv(day)
        every = await source.authorizations(day, voided=True)
    finally:
        if reports is None:
            await source.aclose()
    ours = await voided_by_us(services.db, acquirer, [a.id for a in every if a.voided])
    kept = [a for a in every if not a.voided or a.id in ours]
    return _Inputs(today, kept, frozenset(earlier), DEFAULT_SCHEDULE)


async def _validated(
    services: Services,
    acquirer: str,
    day: date,
    grace_days: int,
    inputs: _Inputs,
    chosen: ColumnMapping,
) -> tuple[int, frozenset[str], Books]:
    """First pass: the whole report is read before anything is written (a ReportError here
    leaves the database untouched), keeping nothing but the count. OncePay's side is read
    meanwhile (the database works while we parse): in flight first, after the report, before
    the books (see without_in_flight)."""
    reading = asyncio.ensure_future(_flying_and_books(services, acquirer, day, grace_days, inputs))
    try:
        count = 0
        for counted in counting(inputs.report, chosen):
            count = counted
            await asyncio.sleep(0)  # the books' queries are sent and answered meanwhile
    except BaseException:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        raise
    flying, books = await reading
    return count, flying, books


async def _match_and_post(
    db: Database,
    acquirer: str,
    day: date,
    grace_days: int,
    now: float,
    inputs: _Inputs,
    chosen: ColumnMapping,
    books: Books,
) -> tuple[Outcome, Posted]:
    """Second pass: match and post as the lines stream through, BATCH settled pairs at a time
    (memory holds the books and a batch or two, not the report's pairs). A batch is posted by
    a task of its own while the next one is matched, one batch at a time, in order."""
    poster = _Poster(db, acquirer, now)
    pending: list[tuple[ReportLine, Operation]] = []
    matching = Matching(books, fees=inputs.fees, settle=lambda line, op: pending.append((line, op)))
    # Its index of the books (a dict of a million entries) and the references seen (a set that
    # grows to as many) out of the collector's way too: each full collection of the pass walked
    # both, 26 of them in a 1M run, ~2 s of the loop's CPU (bench/reconciliation/RESULTS.md).
    gc.freeze()
    try:
        for number, line in enumerate(report_lines(inputs.report, chosen), 1):
            matching.take(line)
            if len(pending) >= BATCH:
                await poster.post(pending)
                pending = []
            elif not number % _YIELD_EVERY:
                await asyncio.sleep(0)  # the posting task's replies are handled meanwhile
        outcome = matching.finish(inputs.authorizations, as_of=day, grace_days=grace_days)
        await poster.post(pending)  # the last batch, and the residual's pairs
        posted = await poster.done()
    except BaseException:
        await poster.abandon()
        raise
    return _with_settled_twice(outcome, posted.twice), posted


def _with_settled_twice(outcome: Outcome, twice: list[Discrepancy]) -> Outcome:
    """The lines posting found settled before in another payout or at another time (an
    earlier report's, or an earlier run's): ``duplicate_settlement``, not matched. The
    matcher counted them matched (it sees one report, the database sees every run's). A
    reference the report itself repeats is one duplicate, as the database keeps it: the
    settlement before is the better evidence, so the matcher's own is left out."""
    if not twice:
        return outcome
    again = {d.reference for d in twice}
    kept = (
        d
        for d in outcome.discrepancies
        if d.kind is not Kind.DUPLICATE_SETTLEMENT or d.reference not in again
    )
    found = sorted((*kept, *twice), key=lambda d: (d.reference, d.kind.value, d.detail))
    return Outcome(outcome.matched - len(twice), tuple(found), outcome.settled, outcome.orphans)


async def _without_settled_missing(db: Database, outcome: Outcome) -> Outcome:
    """An operation an earlier run settled (its guard row is written) is not missing, whatever
    the report at hand holds: a report given as a file comes with no earlier reports to say
    what settled before, and the next day's file holds none of this day's settlements."""
    missing = sorted(
        {d.reference for d in outcome.discrepancies if d.kind is Kind.MISSING_AT_ACQUIRER}
    )
    if not missing:
        return outcome
    async with read(db) as conn:
        done = await settled_references(conn, db, missing)
    if not done:
        return outcome
    kept = tuple(
        d
        for d in outcome.discrepancies
        if d.kind is not Kind.MISSING_AT_ACQUIRER or d.reference not in done
    )
    return Outcome(outcome.matched, kept, outcome.settled, outcome.orphans)


async def _flying_and_books(
    services: Services, acquirer: str, day: date, grace_days: int, inputs: _Inputs
) -> tuple[frozenset[str], Books]:
    flying = await in_flight(services.db)
    return flying, await _books(services, acquirer, day, grace_days, inputs)


async def _books(
    services: Services, acquirer: str, day: date, grace_days: int, inputs: _Inputs
) -> Books:
    """OncePay's movements of days ``day - grace_days`` to ``day + 1`` (see ``run.py``), the
    payments the authorizations name, and the holds old enough to be stale.

    A report given as a file is today's (SPEC §7: ``--date`` or ``--report``) but may well be
    yesterday's: its movements are looked for at least DEFAULT_GRACE_DAYS back, so that a
    small ``--grace-days`` does not make the lines of an older file unknown to OncePay."""
    db = services.db
    back = max(grace_days, DEFAULT_GRACE_DAYS) if inputs.from_file else grace_days
    first, last = day - timedelta(days=back), day + timedelta(days=1)
    # Each chunk of the books frozen as it is built (the run unfreezes them at its end): the
    # collector's full collections would otherwise walk the growing books again and again
    # (17 s of a 1M run's 137 s went to reading the books).
    operations = await operations_between(db, acquirer, first, last, after_chunk=gc.freeze)
    payments = await payments_by_id(db, (a.order_id for a in inputs.authorizations))
    stale_from = last - timedelta(days=DEFAULT_VALIDITY_DAYS)
    holds = await holds_from(db, acquirer, stale_from)
    since = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    canceled = await canceled_as_stale(db, acquirer, since)
    held = {hold.payment_id for hold in holds}
    holds += await holds_of(db, [pid for pid in canceled if pid not in held], stale_from)
    holds.sort(key=lambda hold: hold.payment_id)
    return Books(operations, payments, inputs.settled_before, holds)


def _unknown_payments(outcome: Outcome) -> set[str]:
    return {
        pid
        for d in outcome.discrepancies
        if d.kind is Kind.UNKNOWN_AT_ONCEPAY and (pid := named_payment(d))
    }


# -- remediation --------------------------------------------------------------------------------


async def _plan(services: Services, acquirer: str, outcome: Outcome) -> list[Action]:
    """The orphans' voids and the stale payments' cancels."""
    voids = [
        Action(VOID_ORPHAN, acquirer, auth.reference, auth.id, auth.order_id or None)
        for auth in outcome.orphans
    ]
    stale = [d for d in outcome.discrepancies if d.kind is Kind.STALE_AUTHORIZATION]
    owners = await merchants_of(services.db, [str(d.payment_id) for d in stale])
    cancels = [
        Action(CANCEL_STALE, acquirer, d.reference, str(owners[pid][1]), pid, owners[pid][0])
        for d in stale
        if (pid := str(d.payment_id)) in owners and owners[pid][1]
    ]
    return voids + cancels


def _with_alert(outcome: Outcome, acquirer: str, day: date, wanted: int, cap: int) -> Outcome:
    detail = (
        f"{wanted} remediation actions at {acquirer} on {day}, over the cap of {cap}: "
        "none taken, a person must look"
    )
    raised = alert(Kind.REMEDIATION_WITHHELD, f"{acquirer}:{day.isoformat()}", detail)
    found = sorted(
        (*outcome.discrepancies, raised), key=lambda d: (d.reference, d.kind.value, d.detail)
    )
    return Outcome(outcome.matched, tuple(found), outcome.settled, outcome.orphans)


async def _remediate(
    services: Services, acquirer: str, planned: list[Action], run_id: str, earlier: set[str]
) -> dict[str, int]:
    """Take the planned actions, and those earlier runs left pending, once each; count what
    this run did (an action an earlier run finished only has its discrepancy resolved)."""
    tally: dict[str, int] = {}
    todo = {action.id: action for action in planned}
    for action in await unfinished(services.db, acquirer):
        todo.setdefault(action.id, action)
    for action in todo.values():
        status = await take(services, action, run_id)
        if action.id not in earlier:
            tally[status] = tally.get(status, 0) + 1
    return tally


async def _actions_of(
    db: Database, acquirer: str, found: tuple[Discrepancy, ...]
) -> dict[str, tuple[str, str, str | None]]:
    """The automatic actions taken for ``found`` (the orphans voided, the stale canceled),
    by reference: (status, the reference sent to the acquirer, what it said)."""
    references = [d.reference for d in found if d.kind in _ACTIONABLE]
    if not references:
        return {}
    columns = (actions.c.reference, actions.c.status, actions.c.action_reference, actions.c.detail)
    async with read(db) as conn:
        rows = await conn.execute(
            select(*columns).where(
                actions.c.acquirer == acquirer, actions.c.reference.in_(references)
            )
        )
        return {ref: (status, sent, detail) for ref, status, sent, detail in rows}


_ACTIONABLE = frozenset({Kind.ORPHANED_AUTHORIZATION, Kind.STALE_AUTHORIZATION})


def _told(
    found: Discrepancy, action: tuple[str, str, str | None] | None, withheld: bool
) -> Discrepancy:
    """``found`` with its remediation saying what became of the automatic action, in words
    that depend on the action's state only (a re-run prints the same document)."""
    if found.kind not in _ACTIONABLE:
        return found
    verb = "voided" if found.kind is Kind.ORPHANED_AUTHORIZATION else "canceled"
    if action is None:
        said = (
            f"Not {verb}: this run would have taken more automatic actions than its cap "
            "(see the remediation_withheld alert)."
            if withheld
            else f"Not {verb} automatically."
        )
    else:
        status, sent, detail = action
        if status == "done":
            said = f"Done: {verb} at the acquirer (reference {sent}); the discrepancy is resolved."
        elif status == "refused":
            why = f" ({detail})" if detail else ""
            said = f"Refused by the acquirer{why}: the discrepancy stays open for a person."
        else:
            said = (
                f"Being {verb} (reference {sent}): the acquirer's answer is not known yet; "
                "the next run finishes it."
            )
    return replace(found, remediation=f"{found.remediation.rstrip('.')}. {said}")


# -- keeping the run ----------------------------------------------------------------------------


async def _keep(
    services: Services, acquirer: str, day: date, outcome: Outcome, now: float, lines: int
) -> Any:
    """The run, its discrepancies and their events, in one transaction."""
    db = services.db
    named = {pid for d in outcome.discrepancies if (pid := named_payment(d))}
    merchants = {pid: owner for pid, (owner, _) in (await merchants_of(db, named)).items()}
    async with write(db) as conn:
        saved = await save_run_in(conn, db, acquirer, day, outcome, now, lines, merchants)
        await emit_many(conn, _opened_events(saved.opened_rows, acquirer, day, merchants))
    return saved


def _opened_events(
    opened: tuple[OpenedDiscrepancy, ...], acquirer: str, day: date, merchants: dict[str, str]
) -> list[tuple[str, str, str, dict[str, Any]]]:
    found = []
    for row in opened:
        pid = named_payment(row.found)
        merchant = merchants.get(pid or "")
        if pid is None or merchant is None:
            continue
        data = {
            "id": row.id,
            "object": "reconciliation.discrepancy",
            "acquirer": acquirer,
            "day": day.isoformat(),
            "status": "open",
            **row.found.as_json(),
            "payment_id": pid,
        }
        found.append((merchant, "reconciliation.discrepancy_opened", pid, data))
    return found
