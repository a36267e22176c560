"""The pipeline's poster: on PostgreSQL two batches in flight at once, never two that share a
payment or a reference (their transactions could deadlock on the payment rows, or wait on
the guard); on SQLite one at a time. Batches start in report order, and a failed batch is
raised once the others in flight have finished."""

from __future__ import annotations

import asyncio
import gc
from datetime import date
from typing import Any

import pytest

from oncepay.reconciliation import pipeline
from oncepay.reconciliation.records import Operation, ReportLine
from oncepay.reconciliation.settlement import Posted

Pair = tuple[ReportLine, Operation]


def pair(payment: str, reference: str) -> Pair:
    line = ReportLine(1, reference, "capture", 100, "EUR", 1, 99, "2026-12-01", "po")
    op = Operation(reference, payment, "capture", 100, "EUR", date(2026, 12, 1), "mer_1")
    return line, op


class FakeDb:
    def __init__(self, sqlite: bool) -> None:
        self.is_sqlite = sqlite


class Recorder:
    """Stands in for post_settlements: each batch waits until released, and the batches in
    flight together are recorded."""

    def __init__(self) -> None:
        self.flying: list[str] = []
        self.together: list[tuple[str, ...]] = []
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.fail: set[str] = set()

    async def __call__(
        self, db: Any, acquirer: str, batch: list[Pair], *, now: float, posted: Posted
    ) -> Posted:
        name = batch[0][1].reference
        self.started.append(name)
        self.flying.append(name)
        self.together.append(tuple(self.flying))
        await self.release.setdefault(name, asyncio.Event()).wait()
        self.flying.remove(name)
        if name in self.fail:
            raise RuntimeError(name)
        posted.lines += len(batch)
        return posted

    def let_go(self, name: str) -> None:
        self.release.setdefault(name, asyncio.Event()).set()


async def settle_soon(recorder: Recorder, names: list[str]) -> None:
    for name in names:
        await asyncio.sleep(0.01)
        recorder.let_go(name)


async def test_postgres_posts_two_disjoint_batches_at_once_never_three(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(pipeline, "post_settlements", recorder)
    poster = pipeline._Poster(FakeDb(sqlite=False), "primary", 0.0)  # type: ignore[arg-type]
    releasing = asyncio.ensure_future(settle_soon(recorder, ["r1", "r2", "r3"]))
    for n in (1, 2, 3):
        await poster.post([pair(f"p{n}", f"r{n}")])
    posted = await poster.done()
    await releasing
    assert posted.lines == 3
    assert recorder.started == ["r1", "r2", "r3"]
    assert ("r1", "r2") in recorder.together
    assert max(len(t) for t in recorder.together) == 2


async def test_postgres_waits_for_the_batch_that_shares_a_payment_or_a_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(pipeline, "post_settlements", recorder)
    poster = pipeline._Poster(FakeDb(sqlite=False), "primary", 0.0)  # type: ignore[arg-type]
    releasing = asyncio.ensure_future(settle_soon(recorder, ["r1", "r2", "r3"]))
    await poster.post([pair("p1", "r1")])
    await poster.post([pair("p1", "r2")])  # the same payment (a capture and a refund)
    await poster.post([pair("p3", "r3"), pair("p4", "r2")])  # the same reference as r2's
    await poster.done()
    await releasing
    assert recorder.started == ["r1", "r2", "r3"]
    assert all(len(t) == 1 for t in recorder.together), recorder.together


async def test_sqlite_posts_two_batches_at_once_whatever_they_share_never_three(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second is staged while the first writes; SQLite's one writer (taken in order) keeps
    them from writing at once, so sharing a payment is no deadlock."""
    recorder = Recorder()
    monkeypatch.setattr(pipeline, "post_settlements", recorder)
    poster = pipeline._Poster(FakeDb(sqlite=True), "primary", 0.0)  # type: ignore[arg-type]
    releasing = asyncio.ensure_future(settle_soon(recorder, ["r1", "r2", "r3"]))
    await poster.post([pair("p1", "r1")])
    await poster.post([pair("p1", "r2")])  # the same payment
    await poster.post([pair("p3", "r3")])
    posted = await poster.done()
    await releasing
    assert posted.lines == 3
    assert recorder.started == ["r1", "r2", "r3"]
    assert ("r1", "r2") in recorder.together
    assert max(len(t) for t in recorder.together) == 2


async def test_a_failed_batch_is_raised_after_the_other_in_flight_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    recorder.fail.add("r1")
    monkeypatch.setattr(pipeline, "post_settlements", recorder)
    poster = pipeline._Poster(FakeDb(sqlite=False), "primary", 0.0)  # type: ignore[arg-type]
    await poster.post([pair("p1", "r1")])
    await poster.post([pair("p2", "r2")])
    recorder.let_go("r1")
    with pytest.raises(RuntimeError, match="r1"):
        await poster.post([pair("p3", "r3")])
    recorder.let_go("r2")
    await poster.abandon()
    assert recorder.started == ["r1", "r2"]
    assert recorder.flying == []


def test_a_run_hands_what_it_froze_back_to_the_collector_even_when_it_fails() -> None:
    """The books are kept out of the collector's full collections while a run lasts (see
    pipeline._long_lived), and handed back when it ends, whatever ended it."""
    assert gc.get_freeze_count() == 0
    with pipeline._long_lived():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        books = [[n] for n in range(1000)]  # tracked by the collector, as the books are
        gc.freeze()
        assert gc.get_freeze_count() >= frozen + len(books)
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), pipeline._long_lived():
        raise RuntimeError("the report could not be read")
    assert gc.get_freeze_count() == 0
