"""The matcher as the SPEC's table: every discrepancy kind planted once in a generated report
is found exactly once, and nothing is reported for the clean lines around it."""

from __future__ import annotations

import json
import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oncepay.reconciliation import (
    Authorization,
    FeeSchedule,
    Hold,
    Kind,
    Operation,
    Outcome,
    Payment,
    ReportLine,
    reconcile,
)
from oncepay.reconciliation.matcher import refine
from tests.reconciliation.books import DAY, SCHEDULE, Day, clean_day, line_for


def run(day: Day, *, grace_days: int = 3, as_of: object = DAY, **books: object) -> Outcome:
    return reconcile(
        day.lines,
        day.books(**books),  # type: ignore[arg-type]
        day.authorizations,
        as_of=as_of,  # type: ignore[arg-type]
        grace_days=grace_days,
        fees=SCHEDULE,
    )


def found(outcome: Outcome) -> list[tuple[str, str]]:
    return [(d.kind.value, d.reference) for d in outcome.discrepancies]


def test_a_clean_day_matches_every_line_and_reports_nothing() -> None:
    day = clean_day(300)
    outcome = run(day)
    assert outcome.discrepancies == ()
    assert outcome.matched == len(day.operations) == len(day.lines)


def repriced(line: ReportLine, amount: int) -> ReportLine:
    """``line`` for another amount, its fee and net still by the schedule."""
    fee = SCHEDULE.fee(line.type, amount)
    return line._replace(amount=amount, fee=fee, net=FeeSchedule.net(line.type, amount, fee))


def plant_every_kind(day: Day) -> dict[Kind, str]:
    """One discrepancy of each kind, on distinct clean payments; returns kind -> reference."""
    lines = day.lines
    planted: dict[Kind, str] = {}

    def at(reference: str) -> int:
        return next(i for i, line in enumerate(lines) if line.reference == reference)

    i = at("pay_0000001_capture")
    lines[i] = repriced(lines[i], lines[i].amount + 1)
    planted[Kind.AMOUNT_MISMATCH] = "pay_0000001_capture"
    i = at("pay_0000002_capture")
    lines[i] = lines[i]._replace(currency="GBP")
    planted[Kind.CURRENCY_MISMATCH] = "pay_0000002_capture"
    stranger = Operation("ghost_capture", "pay_ghost", "capture", 500, "EUR", DAY)
    lines.append(line_for(stranger, len(lines) + 2, order_id=""))
    planted[Kind.UNKNOWN_AT_ONCEPAY] = "ghost_capture"
    i = at("pay_0000003_capture")
    del lines[i]
    planted[Kind.MISSING_AT_ACQUIRER] = "pay_0000003_capture"
    lines.append(lines[at("pay_0000004_capture")]._replace(line=len(lines) + 2))
    planted[Kind.DUPLICATE_SETTLEMENT] = "pay_0000004_capture"
    day.authorizations.append(Authorization("auth_orphan", "pay_lost_a1", "pay_lost", 9, "EUR"))
    planted[Kind.ORPHANED_AUTHORIZATION] = "pay_lost_a1"
    i = at("pay_0000005_capture")
    lines[i] = lines[i]._replace(fee=lines[i].fee + 7, net=lines[i].net - 7)
    planted[Kind.FEE_MISMATCH] = "pay_0000005_capture"
    day.holds.append(Hold("pay_held", "pay_held_a1", 900, "EUR", DAY - timedelta(days=7)))
    day.holds.append(Hold("pay_fresh", "pay_fresh_a1", 900, "EUR", DAY - timedelta(days=6)))
    planted[Kind.STALE_AUTHORIZATION] = "pay_held_a1"
    i = at("re_0000010")
    lines[i] = lines[i]._replace(type="capture", net=lines[i].amount - lines[i].fee)
    planted[Kind.TYPE_MISMATCH] = "re_0000010"
    return planted


def test_every_planted_kind_is_found_exactly_once_and_nothing_else() -> None:
    day = clean_day(200)
    planted = plant_every_kind(day)
    outcome = run(day, grace_days=0)
    assert sorted(found(outcome)) == sorted((k.value, ref) for k, ref in planted.items())
    # the two kinds the pipeline adds (refine, the remediation cap): test_pipeline.py
    beyond = {Kind.SETTLED_ON_CANCELED_PAYMENT, Kind.REMEDIATION_WITHHELD}
    assert {k.value for k in set(Kind) - beyond} == {kind for kind, _ in found(outcome)}
    # captures that differ in amount/currency/type do not settle; a fee difference does
    assert outcome.matched == len(day.operations) - 4


def test_the_json_document_is_the_spec_shape() -> None:
    day = clean_day(20)
    planted = plant_every_kind(day)
    document = run(day, grace_days=0).as_json()
    assert set(document) == {"matched", "discrepancies"}
    first = document["discrepancies"][0]  # type: ignore[index]
    assert set(first) == {"kind", "reference", "payment_id", "detail", "remediation"}
    assert len(document["discrepancies"]) == len(planted)  # type: ignore[arg-type]


def test_same_inputs_give_byte_identical_output_whatever_the_order_of_the_books() -> None:
    day = clean_day(500)
    plant_every_kind(day)
    first = json.dumps(run(day, grace_days=0).as_json())
    random.Random(7).shuffle(day.operations)
    random.Random(8).shuffle(day.authorizations)
    assert json.dumps(run(day, grace_days=0).as_json()) == first


def test_missing_waits_for_the_grace_days() -> None:
    day = clean_day(10)
    del day.lines[0]  # pay_0000000_capture, captured on DAY
    for days, reported in [(0, 1), (1, 0), (2, 0), (3, 1)]:
        outcome = run(day, grace_days=3 if days else 0, as_of=DAY + timedelta(days=days))
        assert [k for k, _ in found(outcome)] == ["missing_at_acquirer"] * reported


def test_a_reference_settled_by_an_earlier_report_is_a_duplicate_not_a_match() -> None:
    day = clean_day(10)
    outcome = run(day, settled_before=frozenset({"pay_0000002_capture"}))
    assert found(outcome) == [("duplicate_settlement", "pay_0000002_capture")]


def test_the_residual_joins_a_foreign_reference_by_payment_type_and_amount() -> None:
    day = clean_day(10)
    day.lines[0] = day.lines[0]._replace(reference="psp_8812")  # the acquirer's own reference
    outcome = run(day)
    assert outcome.discrepancies == ()
    assert outcome.matched == len(day.operations)


def test_the_residual_does_not_match_a_different_amount() -> None:
    day = clean_day(10)
    line = day.lines[0]
    day.lines[0] = line._replace(reference="psp_8812", amount=line.amount + 1, net=line.net + 1)
    assert sorted(found(run(day, grace_days=0))) == [
        ("missing_at_acquirer", "pay_0000000_capture"),
        ("unknown_at_oncepay", "psp_8812"),
    ]


def test_an_authorization_is_orphaned_on_a_failed_canceled_or_other_payment() -> None:
    day = clean_day(4)
    day.payments["pay_0000001"] = Payment("pay_0000001", "failed", None)
    day.payments["pay_0000002"] = Payment("pay_0000002", "canceled", "auth_0000002")
    day.payments["pay_0000003"] = Payment("pay_0000003", "captured", "auth_other")
    assert found(run(day)) == [
        ("orphaned_authorization", "pay_0000001_a1"),
        ("orphaned_authorization", "pay_0000002_a1"),
        ("orphaned_authorization", "pay_0000003_a1"),
    ]


def test_a_payment_still_processing_does_not_orphan_its_authorization() -> None:
    day = clean_day(2)
    day.payments["pay_0000001"] = Payment("pay_0000001", "processing", None)
    assert found(run(day)) == []


def test_without_a_schedule_only_the_arithmetic_of_the_fee_is_checked() -> None:
    day = clean_day(3)
    day.lines[0] = day.lines[0]._replace(fee=1, net=day.lines[0].amount - 1)
    outcome = reconcile(day.lines, day.books(), as_of=DAY)
    assert outcome.discrepancies == ()
    day.lines[1] = day.lines[1]._replace(net=day.lines[1].net + 1)
    assert found(reconcile(day.lines, day.books(), as_of=DAY)) == [("fee_mismatch", "re_0000000")]


def test_a_negative_capture_fee_is_a_fee_mismatch_even_without_a_schedule() -> None:
    """A black-box review: ``fee -50, net 1050`` on a capture of 1000 matched silently (the
    acquirer paid out more than the customer was charged)."""
    day = clean_day(3)
    first = day.lines[0]
    assert first.type == "capture"
    day.lines[0] = first._replace(fee=-50, net=first.amount + 50)
    outcome = reconcile(day.lines, day.books(), as_of=DAY)
    assert found(outcome) == [("fee_mismatch", first.reference)]
    assert "is negative" in outcome.discrepancies[0].detail
    assert outcome.matched == len(day.lines)  # it settles, as a fee off the schedule does


def test_a_line_of_the_wrong_amount_is_one_amount_mismatch_whatever_its_fee() -> None:
    """One discrepancy a line, as a labelled check counts them: a line whose amount was changed
    and nothing else (its fee and net as they were) was an ``amount_mismatch`` and a
    ``fee_mismatch`` (its net no longer amount less fee; its fee off the schedule for the new
    amount). The fee of a line of the wrong amount means nothing of its own; the detail says
    the net is off too."""
    day = clean_day(3)
    first = day.lines[0]
    day.lines[0] = first._replace(amount=first.amount + 700)  # fee and net as they were
    day.lines[1] = repriced(day.lines[1], day.lines[1].amount + 5)  # a coherent line
    for fees in (SCHEDULE, None):
        outcome = reconcile(day.lines, day.books(), as_of=DAY, fees=fees)
        assert found(outcome) == [
            ("amount_mismatch", first.reference),
            ("amount_mismatch", day.lines[1].reference),
        ]
        assert f"and its net {first.net} is not amount less fee" in outcome.discrepancies[0].detail
        assert "net" not in outcome.discrepancies[1].detail


def test_settled_pairs_go_to_the_sink_when_one_is_given() -> None:
    day = clean_day(10)
    taken: list[str] = []
    outcome = reconcile(
        day.lines, day.books(), as_of=DAY, settle=lambda line, op: taken.append(op.reference)
    )
    assert taken == [line.reference for line in day.lines]
    assert (outcome.matched, outcome.settled) == (len(taken), ())
    assert [op.reference for _, op in run(day).settled] == taken


def plant_at_random(day: Day, rng: random.Random) -> list[tuple[str, str]]:
    """Each kind on a payment drawn at random (distinct payments), the report then shuffled."""
    lines = day.lines
    payments = rng.sample(range(1, 200), 6)  # pay_0000000 keeps its refund for type_mismatch
    planted: list[tuple[str, str]] = []

    def at(reference: str) -> int:
        return next(i for i, line in enumerate(lines) if line.reference == reference)

    ref = f"pay_{payments[0]:07d}_capture"
    lines[at(ref)] = repriced(lines[at(ref)], lines[at(ref)].amount + rng.randint(1, 99))
    planted.append(("amount_mismatch", ref))
    ref = f"pay_{payments[1]:07d}_capture"
    lines[at(ref)] = lines[at(ref)]._replace(currency="CHF")
    planted.append(("currency_mismatch", ref))
    ref = f"pay_{payments[2]:07d}_capture"
    del lines[at(ref)]
    planted.append(("missing_at_acquirer", ref))
    ref = f"pay_{payments[3]:07d}_capture"
    lines.append(lines[at(ref)]._replace(line=999))
    planted.append(("duplicate_settlement", ref))
    ref = f"pay_{payments[4]:07d}_capture"
    lines[at(ref)] = lines[at(ref)]._replace(fee=lines[at(ref)].fee + 1, net=lines[at(ref)].net - 1)
    planted.append(("fee_mismatch", ref))
    pid = f"pay_{payments[5]:07d}"
    day.payments[pid] = Payment(pid, rng.choice(["failed", "canceled"]), None)
    planted.append(("orphaned_authorization", f"{pid}_a1"))
    stranger = Operation(f"ghost_{rng.randint(0, 10**6)}", "x", "capture", 700, "EUR", DAY)
    lines.append(line_for(stranger, 1000, order_id=""))
    planted.append(("unknown_at_oncepay", stranger.reference))
    rng.shuffle(lines)
    return planted


@pytest.mark.parametrize("seed", range(20))
def test_kinds_planted_at_random_are_each_found_once(seed: int) -> None:
    day = clean_day(200)
    planted = plant_at_random(day, random.Random(seed))
    assert sorted(found(run(day, grace_days=0))) == sorted(planted)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 39),  # which clean line
            st.sampled_from(["keep", "drop", "twice", "amount", "currency", "stranger"]),
        ),
        max_size=60,
    )
)
def test_every_line_is_accounted_for_exactly_once(edits: list[tuple[int, str]]) -> None:
    """Whatever is done to a report, each line ends matched or in exactly one line-level
    discrepancy (a fee difference rides along with a match), and each operation is settled,
    mismatched, or missing: never two of them, never none."""
    day = clean_day(40)
    clean = list(day.lines)
    lines: list[ReportLine] = []
    for index, edit in edits:
        line = clean[index % len(clean)]
        if edit == "drop":
            continue
        if edit == "twice":
            lines.append(line._replace(line=len(lines) + 2))
        if edit == "amount":
            line = repriced(line, line.amount + 1)
        if edit == "currency":
            line = line._replace(currency="CHF")
        if edit == "stranger":
            line = line._replace(reference=f"x{len(lines)}", order_id="")
        lines.append(line._replace(line=len(lines) + 2))
    outcome = reconcile(lines, day.books(), as_of=DAY, grace_days=0, fees=SCHEDULE)
    per_line = [d for d in outcome.discrepancies if d.kind is not Kind.MISSING_AT_ACQUIRER]
    mismatched_refs = {d.reference for d in per_line if d.kind is not Kind.FEE_MISMATCH}
    line_level = {
        (d.reference, d.detail.partition(":")[0])
        for d in per_line
        if d.kind is not Kind.FEE_MISMATCH
    }
    assert outcome.matched + len(line_level) == len(lines)
    missing = {d.reference for d in outcome.discrepancies if d.kind is Kind.MISSING_AT_ACQUIRER}
    settled = {op.reference for _, op in outcome.settled}
    assert not missing & settled
    assert not missing & mismatched_refs
    assert missing | settled | mismatched_refs >= {op.reference for op in day.operations}


def test_money_settled_on_a_failed_or_canceled_payment_is_its_own_kind() -> None:
    day = clean_day(3)
    canceled, failed, alive = "pay_" + "c" * 24, "pay_" + "f" * 24, "pay_" + "a" * 24
    for n, pid in enumerate((canceled, failed, alive)):
        stranger = Operation(f"{pid}_a1", pid, "capture", 700 + n, "EUR", DAY)
        day.lines.append(line_for(stranger, len(day.lines) + 2, order_id=""))
    outcome = run(day)
    assert [d.payment_id for d in outcome.discrepancies] == [None, None, None]
    payments = {
        canceled: Payment(canceled, "canceled", "auth_c"),
        failed: Payment(failed, "failed", None),
        alive: Payment(alive, "captured", "auth_a"),
    }
    refined = refine(outcome, payments)
    assert [(d.kind.value, d.payment_id) for d in refined.discrepancies] == [
        ("unknown_at_oncepay", alive),
        ("settled_on_canceled_payment", canceled),
        ("settled_on_canceled_payment", failed),
    ]
    assert refine(outcome, payments) == refined  # deterministic
