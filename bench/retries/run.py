"""Retry control under a full outage of the primary acquirer: adaptive vs fixed, side by side.

    .venv/bin/python -m bench.retries.run [--outage 15] [--concurrency 16] [--markdown]

All in this process: the payments service on SQLite with two embedded simulated acquirers,
each behind a counter of the HTTP requests that reach it, and ``concurrency`` clients paying
in a loop (one request each, no client retries: a 503 is an answer). For each policy, one run
of three phases:

1. warm: the primary healthy, ``warm`` seconds;
2. outage: the primary answers 503 to everything (look-ups too) for ``outage`` seconds;
3. healed: until the primary takes nine payments in ten again (or ``heal_limit`` seconds).

Policies, with the same three retries (four attempts) and the same circuit breaker (five
failures in a row or half of twenty; 30 s before a probe):

* ``fixed``: every attempt made, backoff from the base alone — what shipped before;
* ``adaptive``: the default retry control (budget, throttling, health, stretched backoff);
* ``…, no breaker``: the same with a breaker that never trips, to see the retry policy alone
  (fixed: the textbook 4x).

Reported per policy: retry amplification during the outage (HTTP requests reaching the
acquirers ÷ logical operations asked of them), the same into the primary alone, the answers
(201 / 503) and failovers, and after the heal the seconds until the primary authorized a payment
again and until it took nine payments in ten.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness.environment import git_state, loadavg, machine
from bench.harness.report import print_table
from oncepay.payments.acquirers.breaker import CircuitBreaker, breaker_for, consecutive_failures
from oncepay.payments.acquirers.control import RetryControl
from oncepay.payments.acquirers.http import HttpAcquirer
from oncepay.payments.acquirers.pool import AcquirerPool
from oncepay.payments.api.app import create_app
from oncepay.payments.bootstrap import start
from oncepay.payments.merchants import create_merchant
from oncepay.payments.metrics import REGISTRY
from oncepay.payments.settings import Settings
from oncepay.simulator import create_app as create_simulator

HERE = Path(__file__).parent
ATTEMPTS = 4  # three retries
TIMEOUT = 1.0  # an in-process acquirer answers in milliseconds; a second means it will not
POLICIES = ("fixed", "adaptive", "fixed, no breaker", "adaptive, no breaker")


class Counting:
    """An ASGI app that counts the HTTP requests reaching it."""

    def __init__(self, app: Any) -> None:
        self.app, self.state, self.requests = app, app.state, 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


def logical() -> float:
    """Logical operations asked of both acquirers so far (final outcomes, not failures)."""
    total = 0.0
    for family in REGISTRY.collect():
        if family.name == "oncepay_acquirer_calls":
            total += sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total") and s.labels["outcome"] != "error"
            )
    return total


def primary_logical() -> float:
    for family in REGISTRY.collect():
        if family.name == "oncepay_acquirer_calls":
            return sum(
                s.value
                for s in family.samples
                if s.name.endswith("_total")
                and s.labels["outcome"] != "error"
                and s.labels["acquirer"] == "primary"
            )
    return 0.0


@dataclass
class Phase:
    """What the clients saw while a phase lasted."""

    answers: dict[int, int] = field(default_factory=dict)
    acquirers: list[tuple[float, str]] = field(default_factory=list)  # (when, who) per 201


def acquirer(name: str, app: Counting, policy: str) -> HttpAcquirer:
    control = RetryControl(mode="adaptive" if policy.startswith("adaptive") else "fixed")
    breaker: CircuitBreaker = breaker_for(name)
    if policy.endswith("no breaker"):
        breaker = CircuitBreaker(name, trip=consecutive_failures(10**9))
    return HttpAcquirer(
        name, app=app, timeout=TIMEOUT, attempts=ATTEMPTS, breaker=breaker, control=control
    )


async def one_policy(policy: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    sims = {
        name: Counting(create_simulator(f"sqlite:///{folder / f'{name}.db'}", seed=1))
        for name in ("primary", "secondary")
    }
    pool = AcquirerPool([acquirer(name, app, policy) for name, app in sims.items()])
    settings = Settings(database_url=f"sqlite:///{folder / 'payments.db'}", run_worker=False)
    services = await start(settings, pool)
    _, key = await create_merchant(services.db, "bench")
    transport = httpx.ASGITransport(app=create_app(settings, services=services))
    admin = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=sims["primary"].app), base_url="http://a"
    )
    phase = Phase()
    async with httpx.AsyncClient(
        transport=transport, base_url="http://p", headers={"Authorization": f"Bearer {key}"}
    ) as client:
        stop = asyncio.Event()

        async def pay() -> None:
            while not stop.is_set():
                response = await client.post(
                    "/v1/payments",
                    json={"amount": 1000, "currency": "EUR", "payment_method": "pm_card_ok"},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                phase.answers[response.status_code] = phase.answers.get(response.status_code, 0) + 1
                if response.status_code == 201:
                    phase.acquirers.append((time.monotonic(), response.json()["acquirer"]))

        def tally() -> tuple[int, int, float, float]:
            sent = sum(app.requests for app in sims.values())
            return sent, sims["primary"].requests, logical(), primary_logical()

        clients = [asyncio.create_task(pay()) for _ in range(args.concurrency)]
        await asyncio.sleep(args.warm)
        (await admin.put("/admin/faults", json={"outage": True})).raise_for_status()
        before, phase = tally(), Phase()
        await asyncio.sleep(args.outage)
        after, outage = tally(), phase
        (await admin.put("/admin/faults", json={})).raise_for_status()
        healed, phase = time.monotonic(), Phase()
        returned = await _returned(lambda: phase, healed, args.heal_limit)
        stop.set()
        await asyncio.gather(*clients)
    await admin.aclose()
    await services.aclose()
    sent, into_primary = after[0] - before[0], after[1] - before[1]
    asked, asked_primary = after[2] - before[2], after[3] - before[3]
    return {
        "policy": policy,
        "outage_seconds": args.outage,
        "amplification": round(sent / asked, 2) if asked else None,
        "amplification_primary": round(into_primary / asked_primary, 2) if asked_primary else None,
        "requests_into_primary": into_primary,
        "logical_operations": int(asked),
        "answers_during_outage": outage.answers,
        "failed_over": sum(1 for _, name in outage.acquirers if name == "secondary"),
        "first_primary_after_heal_s": returned[0],
        "primary_back_to_90pct_s": returned[1],
    }


async def _returned(
    current: Callable[[], Phase], healed: float, limit: float
) -> tuple[float | None, float | None]:
    """Seconds from the heal to the primary's first payment, and to a second in which it took
    nine payments in ten; None when not within ``limit``."""
    first = majority = None
    while time.monotonic() - healed < limit and majority is None:
        await asyncio.sleep(0.25)  # sampling the clients' answers, not waiting on a race
        seen = current().acquirers
        primary = [when for when, name in seen if name == "primary"]
        if first is None and primary:
            first = round(primary[0] - healed, 1)
        now = time.monotonic()
        recent = [name for when, name in seen if when > now - 1.0]
        if len(recent) >= 10 and recent.count("primary") >= 0.9 * len(recent):
            majority = round(now - healed, 1)
    return first, majority


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warm", type=float, default=5.0)
    parser.add_argument("--outage", type=float, default=15.0)
    parser.add_argument("--heal-limit", type=float, default=60.0)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES))
    parser.add_argument("--json", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = []
    for policy in args.policies:
        with tempfile.TemporaryDirectory(prefix="oncepay-retries-") as folder:
            rows.append(asyncio.run(one_policy(policy, args, Path(folder))))
            print(json.dumps(rows[-1]), flush=True)
    document = {"machine": machine(), "git": git_state(), "loadavg": loadavg(), "runs": rows}
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    headers = (
        "policy",
        "amplification",
        "into primary",
        "requests into primary",
        "201 / 503 in the outage",
        "failed over",
        "primary back (first, 90 %) s",
    )
    table = [
        (
            r["policy"],
            f"{r['amplification']}x",
            f"{r['amplification_primary']}x",
            str(r["requests_into_primary"]),
            f"{r['answers_during_outage'].get(201, 0)} / {r['answers_during_outage'].get(503, 0)}",
            str(r["failed_over"]),
            f"{r['first_primary_after_heal_s']}, {r['primary_back_to_90pct_s']}",
        )
        for r in rows
    ]
    title = "Retry control, full primary outage"
    print_table(title, headers, table, right={1, 2, 3, 5}, use_markdown=args.markdown)


if __name__ == "__main__":
    main()
