"""Late retries on ``/metrics`` (SPEC §9 and §11, issue 17): a key that comes back after its
idempotency record expired executes afresh (decision ``executed``) and is counted in
``oncepay_idempotency_late_retries_total{route}``; a replay within the TTL, a new key and a
key released after a failure are not. SQLite and PostgreSQL, through the API; the engine's
clock is moved past the TTL, the record is not purged yet."""

from __future__ import annotations

from oncepay.idempotency.records import ClaimOutcome
from oncepay.payments.metrics import REGISTRY
from tests.payments.stack import Stack

PAYMENTS = "POST /v1/payments"
TTL = 24 * 3600.0  # Settings.key_ttl's default, which the stack keeps


def _late(route: str = PAYMENTS) -> float:
    labels = {"route": route}
    return REGISTRY.get_sample_value("oncepay_idempotency_late_retries_total", labels) or 0.0


def _executed() -> float:
    labels = {"decision": "executed", "route": PAYMENTS}
    return REGISTRY.get_sample_value("oncepay_idempotency_route_decisions_total", labels) or 0.0


async def test_a_key_back_after_its_record_expired_is_a_late_retry(stack: Stack) -> None:
    late, executed = _late(), _executed()
    first = await stack.pay(key="late-1")
    assert first.status_code == 201, first.text
    replay = await stack.pay(key="late-1")
    assert replay.headers["idempotent-replayed"] == "true"
    assert _late() == late  # a first execution and a replay: no late retry

    stack.clock.advance(TTL + 1)  # the record expired; nothing purged it
    again = await stack.pay(key="late-1")
    assert again.status_code == 201, again.text
    assert "idempotent-replayed" not in again.headers
    assert again.json()["id"] != first.json()["id"]  # executed afresh: a second payment
    assert _late() == late + 1
    assert _executed() == executed + 2  # a late retry is still an "executed" decision

    assert (await stack.pay(key="late-1")).headers["idempotent-replayed"] == "true"
    assert (await stack.pay(key="late-2")).status_code == 201  # a new key
    assert _late() == late + 1

    exposed = (await stack.client.get("/metrics")).text
    assert 'oncepay_idempotency_late_retries_total{route="POST /v1/payments"}' in exposed


async def test_the_store_tells_an_expired_record_from_a_new_or_released_key(
    stack: Stack,
) -> None:
    """The claim itself says so (one round trip, as before): ``Claim.late`` only for a key
    whose own record had expired; a released key is as if never used (SPEC §2)."""
    store, engine, scope = stack.services.engine.store, stack.services.engine, "late-scope"

    async def claim(key: str) -> tuple[ClaimOutcome, bool]:
        made = await store.claim(
            scope, key, "fp", now=engine.clock(), lease=engine.lease, ttl=engine.ttl
        )
        return made.outcome, made.late

    assert await claim("new") == (ClaimOutcome.CREATED, False)
    released = await claim("released")
    record = await store.get(scope, "released")
    assert record is not None
    await store.release(scope, "released", record.fence, now=engine.clock())
    assert released == (ClaimOutcome.CREATED, False)
    assert await claim("released") == (ClaimOutcome.CREATED, False)
    stack.clock.advance(engine.ttl + 1)
    assert await claim("new") == (ClaimOutcome.CREATED, True)  # its executing record expired
    assert await claim("new") == (ClaimOutcome.EXISTING, False)  # the fresh record stands
