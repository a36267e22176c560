"""The acquirer journal (the operator's timeline of a payment's attempts): per payment, in
order, bounded per payment and in payments, the least recently attempted forgotten first."""

from __future__ import annotations

import pytest

from oncepay.payments.acquirers import journal


@pytest.fixture(autouse=True)
def empty(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal, "_journal", type(journal._journal)())


def attempt(reference: str, n: int = 0) -> journal.Attempt:
    return journal.Attempt(
        float(n), "primary", "authorize", reference, n > 0, "answered", 0.1, "closed"
    )


def test_attempts_are_kept_per_payment_in_order() -> None:
    first, second, other = attempt("pay_a1b2_a1"), attempt("pay_a1b2_a1", 1), attempt("pay_ff_a1")
    for each in (first, other, second):
        journal.record(each)
    assert journal.attempts_of("pay_a1b2") == [first, second]
    assert journal.attempts_of("pay_ff") == [other]
    assert journal.attempts_of("pay_00") == []


def test_a_reference_without_a_payment_is_not_kept() -> None:
    journal.record(attempt("rf_123"))
    assert len(journal._journal) == 0


def test_a_storm_of_retries_keeps_its_last_attempts() -> None:
    made = [attempt("pay_abc_a1", n) for n in range(journal._PER_PAYMENT + 7)]
    for each in made:
        journal.record(each)
    assert journal.attempts_of("pay_abc") == made[-journal._PER_PAYMENT :]


def test_the_least_recently_attempted_payment_is_forgotten_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(journal, "PAYMENTS", 3)
    for payment in ("pay_01", "pay_02", "pay_03"):
        journal.record(attempt(f"{payment}_a1"))
    journal.record(attempt("pay_01_a1", 1))  # attempted again: the most recent now
    journal.record(attempt("pay_04_a1"))
    assert journal.attempts_of("pay_02") == []  # the oldest untouched one went
    assert [len(journal.attempts_of(p)) for p in ("pay_01", "pay_03", "pay_04")] == [2, 1, 1]
    journal.record(attempt("pay_05_a1"))
    assert journal.attempts_of("pay_03") == []
    assert len(journal._journal) == 3


def test_what_a_caller_is_handed_is_a_copy() -> None:
    journal.record(attempt("pay_0a_a1"))
    journal.attempts_of("pay_0a").clear()
    assert len(journal.attempts_of("pay_0a")) == 1
