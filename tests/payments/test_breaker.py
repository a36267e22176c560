"""The circuit breaker's states and transitions, on a clock the test moves by hand."""

from __future__ import annotations

import uuid

import pytest

from oncepay.payments.acquirers.breaker import (
    CircuitBreaker,
    consecutive_failures,
    failure_rate,
)
from oncepay.payments.metrics import REGISTRY
from tests.clock import FakeClock

RESET = 30.0


def breaker(clock: FakeClock, failures: int = 3) -> CircuitBreaker:
    name = f"test-{uuid.uuid4().hex[:8]}"  # metrics of this breaker alone
    return CircuitBreaker(
        name, trip=consecutive_failures(failures), reset_timeout=RESET, clock=clock
    )


def fail(b: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert b.allow()
        b.record_failure()


def transitions(b: CircuitBreaker, state: str) -> float:
    labels = {"acquirer": b.name, "state": state}
    return REGISTRY.get_sample_value("oncepay_acquirer_breaker_transitions_total", labels) or 0.0


def test_a_new_breaker_is_closed_and_lets_calls_through(clock: FakeClock) -> None:
    b = breaker(clock)
    assert b.state == "closed"
    assert b.available()
    assert b.allow()


def test_it_opens_after_n_consecutive_failures(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 2)
    assert b.state == "closed"
    fail(b, 1)
    assert b.state == "open"
    assert not b.available()
    assert not b.allow(), "an open breaker refuses without sending"
    assert transitions(b, "open") == 1


def test_a_success_resets_the_count(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 2)
    b.record_success()
    fail(b, 2)
    assert b.state == "closed"


def test_after_the_reset_timeout_one_probe_goes_through(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(RESET - 0.001)
    assert not b.allow()
    clock.advance(0.001)
    assert b.available()
    assert b.allow(), "the probe"
    assert b.state == "half_open"
    assert not b.allow(), "only one probe at a time"
    assert not b.available()
    assert transitions(b, "half_open") == 1


def test_a_successful_probe_closes_it(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(RESET)
    assert b.allow()
    b.record_success()
    assert b.state == "closed"
    assert b.allow()
    fail(b, 2)
    assert b.state == "closed", "closing starts the count afresh"
    assert transitions(b, "closed") == 1


def test_a_failed_probe_opens_it_again_for_a_full_timeout(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(RESET)
    assert b.allow()
    clock.advance(5)
    b.record_failure()
    assert b.state == "open"
    clock.advance(RESET - 1)
    assert not b.allow(), "the timeout counts from the failed probe"
    clock.advance(1)
    assert b.allow()
    assert transitions(b, "open") == 2


def test_a_probe_that_never_reports_is_replaced_after_the_timeout(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    clock.advance(RESET)
    assert b.allow()  # its caller is cancelled and never reports
    clock.advance(RESET)
    assert b.allow(), "another probe"
    b.record_success()
    assert b.state == "closed"


def test_results_while_open_change_nothing(clock: FakeClock) -> None:
    b = breaker(clock)
    fail(b, 3)
    b.record_success()  # a straggler from before it opened
    assert b.state == "open"
    clock.advance(RESET / 2)
    b.record_failure()
    clock.advance(RESET / 2)
    assert b.allow(), "a straggler's failure does not extend the open time"


def test_a_failure_rate_policy(clock: FakeClock) -> None:
    b = CircuitBreaker(
        "rate", trip=failure_rate(0.5, window=10, minimum=4), reset_timeout=RESET, clock=clock
    )
    fail(b, 1)
    b.record_success()
    fail(b, 1)
    assert b.state == "closed", "too few results to judge"
    b.record_success()
    b.record_failure()
    assert b.state == "open", "3 of 5 failed"


def test_policies_compose_with_or(clock: FakeClock) -> None:
    trip = consecutive_failures(3) | failure_rate(0.9, window=10, minimum=10)
    b = CircuitBreaker("any", trip=trip, reset_timeout=RESET, clock=clock)
    fail(b, 3)
    assert b.state == "open"


@pytest.mark.parametrize(
    "build",
    [
        lambda: consecutive_failures(0),
        lambda: failure_rate(0),
        lambda: failure_rate(0.5, window=5, minimum=6),
        lambda: CircuitBreaker("x", reset_timeout=0),
    ],
)
def test_impossible_settings_are_refused(build: object) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        build()  # type: ignore[operator]
