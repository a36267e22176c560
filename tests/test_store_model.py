"""Property-based: every store behaves like a small reference model under any sequence of
claims, completions, releases, checkpoints, purges and clock moves.

The model below is written from SPEC §2 independently of ``resolve_claim``, so it checks the
memory store too, not only the networked ones against it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from oncepay.errors import LeaseLost
from oncepay.idempotency.records import ClaimOutcome, RecordState, StoredResponse
from oncepay.idempotency.stores import Store
from tests.conftest import StoreSpec

LEASE = 30.0
TTL = 600.0
SCOPES = st.sampled_from(["s1", "s1", "s2"])
KEYS = st.sampled_from(["k1", "k1", "k1", "k2"])  # mostly one key: collisions are the point
FPS = st.sampled_from(["fp-a", "fp-a", "fp-b"])
HEADERS = st.lists(
    st.tuples(st.sampled_from(["x-a", "x-b"]), st.text("ab", max_size=3)), max_size=3
)
RESPONSES = st.builds(
    StoredResponse,
    status=st.sampled_from([200, 201, 402, 422]),
    headers=HEADERS.map(tuple),
    body=st.binary(max_size=40),
)


@dataclass
class ModelRecord:
    fingerprint: str
    state: RecordState
    fence: int
    lease_until: float
    expires_at: float
    recovery_point: str | None = None
    response: StoredResponse | None = None


@dataclass
class Model:
    now: float = 1_800_000_000.0
    records: dict[tuple[str, str], ModelRecord] = field(default_factory=dict)

    def live(self, rid: tuple[str, str]) -> ModelRecord | None:
        record = self.records.get(rid)
        return record if record and self.now < record.expires_at else None

    def claim(self, rid: tuple[str, str], fp: str) -> ClaimOutcome:
        current = self.records.get(rid)
        live = self.live(rid)
        if live is None or live.state is RecordState.RELEASED:
            fence = max((current.fence if current else 0) + 1, int(self.now * 1000))
            self.records[rid] = ModelRecord(
                fp, RecordState.EXECUTING, fence, self.now + LEASE, self.now + TTL
            )
            return ClaimOutcome.CREATED
        if live.fingerprint != fp or live.state is RecordState.COMPLETED:
            return ClaimOutcome.EXISTING
        if self.now < live.lease_until:
            return ClaimOutcome.EXISTING
        live.fence += 1
        live.lease_until = self.now + LEASE
        return ClaimOutcome.TAKEN_OVER

    def holder(self, rid: tuple[str, str], fence: int) -> ModelRecord | None:
        record = self.records.get(rid)
        ok = record and record.state is RecordState.EXECUTING and record.fence == fence
        return record if ok else None


def fresh(spec: StoreSpec) -> StoreSpec:
    """The same backend in a namespace of its own, so every example starts empty."""
    tag = uuid.uuid4().hex[:10]
    options: dict[str, Any] = dict(spec.options)
    if "table" in options:
        options["table"] = f"{options['table']}_{tag}"
    if "prefix" in options:
        options["prefix"] = f"{options['prefix']}{tag}:"
    url = spec.url.replace("keys.db", f"keys-{tag}.db") if spec.backend == "sqlite" else spec.url
    return dataclasses.replace(spec, url=url, options=options)


def machine_for(spec: StoreSpec) -> type[RuleBasedStateMachine]:
    class StoreMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = asyncio.new_event_loop()
            self.store: Store = fresh(spec).build()
            self.model = Model()
            self.fences: list[tuple[tuple[str, str], int]] = []
            self.claimed: list[tuple[str, str, str]] = []

        def run(self, coro: Any) -> Any:
            return self.loop.run_until_complete(coro)

        @initialize()
        def warm(self) -> None:
            assert self.run(self.store.get("none", "none")) is None

        @rule(scope=SCOPES, key=KEYS, fp=FPS)
        def claim(self, scope: str, key: str, fp: str) -> None:
            expected = self.model.claim((scope, key), fp)
            claim = self.run(
                self.store.claim(scope, key, fp, now=self.model.now, lease=LEASE, ttl=TTL)
            )
            assert claim.outcome is expected
            model = self.model.records[scope, key]
            assert claim.record.fence == model.fence
            assert claim.record.state is model.state
            assert claim.record.fingerprint == model.fingerprint
            assert claim.record.recovery_point == model.recovery_point
            assert claim.record.response == model.response
            if claim.claimed:
                self.fences.append(((scope, key), claim.record.fence))
                self.claimed.append((scope, key, fp))

        @rule(pick=st.integers(0, 50))
        def retry_after_the_lease_lapses(self, pick: int) -> None:
            # Takeovers need 'claim, lapse, same claim again'; random programs rarely line
            # that up, so this rule does it on purpose.
            if self.claimed:
                self.advance(LEASE + 1)
                self.claim(*self.claimed[pick % len(self.claimed)])

        @rule(
            pick=st.integers(0, 50),
            op=st.sampled_from(["complete", "release", "checkpoint"]),
            response=RESPONSES,
            point=st.sampled_from(["payment_created", "acquirer_called"]),
        )
        def finish(self, pick: int, op: str, response: StoredResponse, point: str) -> None:
            # One rule for the three fenced writes, so they do not crowd out claims and
            # lease lapses (which takeovers need) in the generated programs.
            self._fenced(pick, op, response if op == "complete" else point)

        def _fenced(self, pick: int, op: str, arg: Any) -> None:
            if not self.fences:
                return
            (scope, key), fence = self.fences[pick % len(self.fences)]
            holder = self.model.holder((scope, key), fence)
            now = self.model.now
            calls = {
                "complete": lambda: self.store.complete(scope, key, fence, arg, now=now),
                "release": lambda: self.store.release(scope, key, fence, now=now),
                "checkpoint": lambda: self.store.checkpoint(
                    scope, key, fence, arg, now=now, lease=LEASE
                ),
            }
            try:
                self.run(calls[op]())
            except LeaseLost:
                assert holder is None, f"{op} with the current token was refused"
                return
            assert holder is not None, f"{op} with a stale token was accepted"
            if op == "complete":
                holder.state, holder.response = RecordState.COMPLETED, arg
            elif op == "release":
                holder.state = RecordState.RELEASED
            else:
                holder.recovery_point, holder.lease_until = arg, now + LEASE

        @rule(seconds=st.sampled_from([0.5, 29.0, 31.0, 31.0, 31.0, 300.0, 601.0]))
        def advance(self, seconds: float) -> None:
            self.model.now += seconds

        @rule()
        def purge(self) -> None:
            purged = self.run(self.store.purge_expired(now=self.model.now, limit=10))
            expired = [rid for rid in self.model.records if not self.model.live(rid)]
            assert purged in (0, len(expired))  # 0: the store expires records by itself
            if purged:
                for rid in expired:
                    del self.model.records[rid]

        @invariant()
        def live_records_agree(self) -> None:
            for rid, model in self.model.records.items():
                if self.model.live(rid) is None:
                    continue
                record = self.run(self.store.get(*rid))
                assert record is not None
                assert (record.state, record.fence, record.fingerprint) == (
                    model.state,
                    model.fence,
                    model.fingerprint,
                )
                assert record.recovery_point == model.recovery_point
                assert record.response == model.response

        def teardown(self) -> None:
            self.run(self.store.aclose())
            self.loop.close()

    return StoreMachine


def test_store_behaves_like_the_reference_model(store_spec: StoreSpec) -> None:
    run_state_machine_as_test(
        machine_for(store_spec),
        settings=settings(
            max_examples=60 if store_spec.backend == "memory" else 15,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
