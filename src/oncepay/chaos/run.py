"""``oncepay chaos``: start the stack, run many concurrent clients through the faulty proxy
while faults are injected, let recovery finish, then audit (docs/guarantees.md).

Faults, each counted in the report:

* acquirers: latency, 5xx before acting, timeout after committing, dropped connections (rates
  set on both simulators), and outages of the primary that force failover;
* between clients and API: answers dropped after the server finished (the proxy);
* processes: ``kill -9`` of an API process or of the worker mid-run, then a restart;
* Redis, with ``--redis``: a flush of every key, or a ``kill -9`` of the server and a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import func, select

from oncepay.chaos import amplification as amp
from oncepay.chaos import reconcile as recon
from oncepay.chaos.audit import Evidence, audit, gather, summarise_operations
from oncepay.chaos.stack import ChaosStack
from oncepay.http.client import ATTEMPTS, AsyncClient, RetryPolicy
from oncepay.payments.merchants import create_merchant
from oncepay.payments.storage.migrations import migrate
from oncepay.payments.storage.schema import payments, webhook_deliveries
from oncepay.storage.db import Database, read

__all__ = ["ChaosConfig", "ChaosReport", "run_chaos"]

METHODS = ["pm_card_ok"] * 8 + ["pm_card_declined", "pm_card_insufficient_funds"]
# Clients retry until they get a final answer: a process restart, an outage of the primary
# and a recovery back-off all fit well inside two minutes.
CLIENT_POLICY = RetryPolicy(attempts=200, total=120.0, base=0.05, cap=1.0)
# After the clients are done, recovery and the webhook backlog get this long to finish.
DRAIN_TIMEOUT = 600.0
# How long a count-bounded run's last payments wait for every fault to have struck once.
FAULT_ROUND_TIMEOUT = 300.0


@dataclass
class ChaosConfig:
    payments: int = 300
    concurrency: int = 16
    duration: float | None = None  # seconds; with it, clients go on until it is over
    database_url: str | None = None  # default: SQLite in the work folder
    redis: bool = False
    seed: int = 1
    latency_ms: float = 5.0
    error_rate: float = 0.03
    timeout_after_commit_rate: float = 0.02
    drop_rate: float = 0.02
    proxy_drop_rate: float = 0.05
    kill_interval: float = 4.0  # seconds between process kills (0: none)
    outage_interval: float = 10.0  # seconds between primary outages (0: none)
    outage_seconds: float = 2.0
    redis_interval: float = 5.0  # seconds between Redis faults, with --redis
    # One full outage of the primary (503 to everything, look-ups too) this many seconds long,
    # starting full_outage_after seconds into the run, instead of the short periodic ones.
    full_outage: float = 0.0
    full_outage_after: float = 10.0
    retry_control: str = "adaptive"  # the services' acquirer retry control (or "fixed")
    acquirer_attempts: int = 2
    orphans: int = 3  # orphaned authorizations injected at each acquirer (0: none)
    workdir: Path | None = None


@dataclass
class ChaosReport:
    config: dict[str, Any]
    logical_payments: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    acquirer_operations: dict[str, int] = field(default_factory=dict)
    webhooks_delivered: int = 0
    retry_control: dict[str, Any] = field(default_factory=dict)  # amplification, recovery
    reconciliation: dict[str, int] = field(default_factory=dict)
    violations: dict[str, list[str]] = field(default_factory=dict)

    @property
    def violation_count(self) -> int:
        return sum(len(v) for v in self.violations.values())

    def as_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["violation_count"] = self.violation_count
        document["payments_per_second"] = round(self.logical_payments / self.seconds, 1)
        document["requests_per_second"] = round(self.requests / self.seconds, 1)
        return document


async def run_chaos(config: ChaosConfig, console: Console | None = None) -> ChaosReport:
    console = console or Console(stderr=True)
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="oncepay-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)  # --workdir may name a folder not made yet
    database_url = config.database_url or f"sqlite:///{workdir / 'payments.db'}"
    db = Database.from_url(database_url)
    await migrate(db)
    merchant, api_key = await create_merchant(db, f"chaos {uuid.uuid4().hex[:6]}")
    stack = ChaosStack(
        workdir,
        database_url,
        redis=config.redis,
        proxy_drop_rate=config.proxy_drop_rate,
        seed=config.seed,
        settings={
            "ONCEPAY_ACQUIRER_RETRY_CONTROL": config.retry_control,
            "ONCEPAY_ACQUIRER_ATTEMPTS": str(config.acquirer_attempts),
        },
    )
    stack.build()
    marks: dict[str, Any] = {}  # the full outage's tallies and when it healed
    report = ChaosReport(config={k: str(v) for k, v in asdict(config).items()})
    console.print(f"chaos: starting the stack in {workdir}")
    await asyncio.to_thread(stack.start)
    try:
        async with httpx.AsyncClient(timeout=30) as admin:
            await _prepare(admin, stack, api_key, config)
            faults: Counter[str] = Counter()
            started, started_wall = time.monotonic(), time.time()
            answers, attempts, bodies = await _clients(
                config, stack, api_key, faults, console, marks
            )
            report.seconds = time.monotonic() - started
            await _calm(admin, stack)
            urls = {name: stack.services[name].url for name in recon.ACQUIRERS}
            orphans = await _inject_orphans(urls, config.orphans)
            await _drain(db, console)
            # A client whose retry budget ran out while the faults raged retries once more,
            # as a real one would: it must now get the final answer.
            late = await _final_retries(stack, api_key, answers, bodies)
            faults["clients that needed a retry after the faults"] = late
            # Every day of the run reconciled for both acquirers; then its events delivered.
            days = recon.days_between(started_wall, time.time())
            reconciled = await recon.reconcile_stack(database_url, urls, days)
            await _drain(db, console)
            received = (await admin.get(f"{stack.services['receiver'].url}/stats")).json()
            evidence = Evidence(
                answers,
                await _operations(admin, stack),
                received,
                movements=await _movements(admin, stack, started_wall),
                injected={orphan.order_id for orphan in orphans},
            )
            await gather(db, merchant.id, evidence)
            faults["answers dropped by the proxy"] = (
                await admin.get(f"{stack.services['proxy'].url}/_proxy/stats")
            ).json()["dropped"]
        report.logical_payments = len(answers)
        report.requests = sum(attempts)
        report.retries = report.requests - len(answers)
        report.outcomes = dict(
            Counter((a or {}).get("status", "no answer") for a in answers.values())
        )
        report.faults = dict(faults) | _acquirer_fault_rates(config)
        report.acquirer_operations = summarise_operations(evidence.operations)
        report.retry_control = amp.summary(stack.metrics_dir, marks, evidence.operations)
        report.webhooks_delivered = sum(evidence.received["handled"].values())
        report.violations = audit(evidence) | recon.checks(orphans, reconciled, evidence.operations)
        report.reconciliation = recon.summary(orphans, reconciled)
    finally:
        await asyncio.to_thread(stack.stop)
        await db.aclose()
    return report


async def _prepare(
    admin: httpx.AsyncClient, stack: ChaosStack, api_key: str, config: ChaosConfig
) -> None:
    """Subscribe the receiver to every event, and set the acquirers' fault rates."""
    auth = {"Authorization": f"Bearer {api_key}"}
    endpoint = await admin.post(
        f"{stack.services['api-1'].url}/v1/webhook_endpoints",
        json={"url": f"{stack.services['receiver'].url}/hook"},
        headers={**auth, "Idempotency-Key": "chaos-webhook-endpoint"},
    )
    endpoint.raise_for_status()
    receiver = stack.services["receiver"].url
    (
        await admin.put(f"{receiver}/config", json={"secrets": [endpoint.json()["secret"]]})
    ).raise_for_status()
    for name in ("primary", "secondary"):
        await _set_faults(admin, stack, name, config)


async def _set_faults(
    admin: httpx.AsyncClient, stack: ChaosStack, name: str, config: ChaosConfig | None, **extra: Any
) -> None:
    faults: dict[str, Any] = {}
    if config is not None:
        faults = {
            "latency_ms": config.latency_ms,
            "error_rate": config.error_rate,
            "timeout_after_commit_rate": config.timeout_after_commit_rate,
            "stall_seconds": 3.0,
            "drop_rate": config.drop_rate,
        }
    response = await admin.put(f"{stack.services[name].url}/admin/faults", json={**faults, **extra})
    response.raise_for_status()


async def _inject_orphans(urls: dict[str, str], per_acquirer: int) -> list[recon.Injected]:
    clients = {name: httpx.AsyncClient(base_url=url, timeout=10) for name, url in urls.items()}
    try:
        return await recon.inject_orphans(clients, per_acquirer)
    finally:
        for client in clients.values():
            await client.aclose()


def _acquirer_fault_rates(config: ChaosConfig) -> dict[str, int]:
    return {
        "acquirer latency (ms, every call)": int(config.latency_ms),
        "acquirer 5xx rate (%)": round(config.error_rate * 100),
        "acquirer timeout-after-commit rate (%)": round(config.timeout_after_commit_rate * 100),
        "acquirer dropped-connection rate (%)": round(config.drop_rate * 100),
    }


# -- the clients ---------------------------------------------------------------------------------


Answers = dict[str, dict[str, Any] | None]


async def _clients(
    config: ChaosConfig,
    stack: ChaosStack,
    api_key: str,
    faults: Counter[str],
    console: Console,
    marks: dict[str, Any],
) -> tuple[Answers, list[int], dict[str, dict[str, Any]]]:
    dice = random.Random(config.seed)  # noqa: S311 - workload dice
    answers: Answers = {}
    bodies: dict[str, dict[str, Any]] = {}
    attempts: list[int] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(config.payments):
        queue.put_nowait(n)
    deadline = time.monotonic() + config.duration if config.duration else None
    limits = httpx.Limits(max_connections=config.concurrency * 2)
    async with AsyncClient(
        base_url=stack.services["proxy"].url,
        retry=CLIENT_POLICY,
        limits=limits,
        timeout=30.0,
        headers={"Authorization": f"Bearer {api_key}"},
    ) as client:
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        with progress:
            task = progress.add_task("payments", total=None if deadline else config.payments)

            # A run bounded by a count must not end before every fault has struck once (a
            # fast machine could pay for everything between two kills): its last tenth is
            # paced, one payment a second a client, and its last payments wait for the round.
            struck = asyncio.Event()
            paced, held = max(config.payments // 10, config.concurrency), config.concurrency

            async def one_client() -> None:
                while True:
                    if deadline is not None:
                        if time.monotonic() > deadline:
                            return
                    elif queue.empty():
                        return
                    else:
                        left = config.payments - queue.get_nowait()
                        if left <= paced and not struck.is_set():
                            wait = FAULT_ROUND_TIMEOUT if left <= held else 1.0
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(struck.wait(), wait)
                    await _pay(client, dice, answers, attempts, bodies)
                    progress.advance(task)

            chaos = asyncio.create_task(_inject(config, stack, faults, marks, struck))
            try:
                await asyncio.gather(*(one_client() for _ in range(config.concurrency)))
            finally:
                if chaos.done() and not chaos.cancelled() and chaos.exception() is not None:
                    raise RuntimeError("the fault injector failed") from chaos.exception()
                chaos.cancel()
                await asyncio.gather(chaos, return_exceptions=True)
    return answers, attempts, bodies


async def _pay(
    client: AsyncClient,
    dice: random.Random,
    answers: Answers,
    attempts: list[int],
    bodies: dict[str, dict[str, Any]],
    key: str | None = None,
) -> None:
    key = key or f"chaos-{uuid.uuid4().hex}"
    body = bodies.get(key) or {
        "amount": dice.randint(100, 50_000),
        "currency": dice.choice(["USD", "EUR", "GBP"]),
        "payment_method": dice.choice(METHODS),
    }
    answers[key], bodies[key] = None, body
    try:
        response = await client.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    except httpx.HTTPError:
        attempts.append(CLIENT_POLICY.attempts)
        return
    attempts.append(int(response.extensions.get(ATTEMPTS, 1)))
    if response.status_code == 201:
        answers[key] = response.json()


# -- the faults ----------------------------------------------------------------------------------


async def _inject(
    config: ChaosConfig,
    stack: ChaosStack,
    faults: Counter[str],
    marks: dict[str, Any],
    struck: asyncio.Event,
) -> None:
    """Kill processes, black out the primary and break Redis, on a seeded schedule; ``struck``
    is set once every kind of fault has been injected at least once."""
    dice = random.Random(config.seed + 1)  # noqa: S311 - fault dice
    kinds: set[str] = set()
    if config.kill_interval:
        kinds |= {"kill -9 API process", "kill -9 worker"}
    if config.full_outage or config.outage_interval:
        kinds.add("primary acquirer outages")
    if config.redis:
        kinds |= {"Redis flushes", "Redis kill -9 and restart"}
    faults = _Tally(faults, kinds, struck)
    loops = [_kills(config, stack, faults, dice)] if config.kill_interval else []
    if config.full_outage:
        loops.append(_full_outage(config, stack, faults, marks))
    elif config.outage_interval:
        loops.append(_outages(config, stack, faults))
    if config.redis:
        loops.append(_redis_faults(config, stack, faults, dice))
    await asyncio.gather(*loops)


class _Tally(Counter[str]):
    """The run's fault counts, written through to ``counts``; sets ``struck`` when every one
    of ``kinds`` has been counted (at once when there are none)."""

    def __init__(self, counts: Counter[str], kinds: set[str], struck: asyncio.Event) -> None:
        super().__init__()
        self._counts, self._waiting, self._struck = counts, set(kinds), struck
        if not self._waiting:
            struck.set()

    def __setitem__(self, kind: str, count: int) -> None:
        super().__setitem__(kind, count)
        self._counts[kind] = count
        self._waiting.discard(kind)
        if not self._waiting:
            self._struck.set()


async def _kills(
    config: ChaosConfig, stack: ChaosStack, faults: Counter[str], dice: random.Random
) -> None:
    victims = itertools.cycle(["api-1", "worker", "api-2"])  # every kind, in turn
    while True:
        await asyncio.sleep(config.kill_interval * dice.uniform(0.5, 1.5))
        victim = next(victims)
        stack.services[victim].kill9()
        faults[f"kill -9 {'API process' if victim != 'worker' else 'worker'}"] += 1
        await asyncio.sleep(0.5)
        await asyncio.to_thread(stack.restart, victim)


async def _outages(config: ChaosConfig, stack: ChaosStack, faults: Counter[str]) -> None:
    async with httpx.AsyncClient(timeout=10) as admin:
        while True:
            await asyncio.sleep(config.outage_interval)
            await _set_faults(admin, stack, "primary", config, outage=True)
            faults["primary acquirer outages"] += 1
            await asyncio.sleep(config.outage_seconds)
            await _set_faults(admin, stack, "primary", config)


async def _full_outage(
    config: ChaosConfig, stack: ChaosStack, faults: Counter[str], marks: dict[str, Any]
) -> None:
    """One long outage of the primary, its retry amplification tallied from before it began
    to its end (chaos/amplification.py)."""
    async with httpx.AsyncClient(timeout=10) as admin:
        await asyncio.sleep(config.full_outage_after)
        marks["before"] = amp.read_tally(stack.metrics_dir)
        await _set_faults(admin, stack, "primary", config, outage=True)
        faults["primary acquirer outages"] += 1
        await asyncio.sleep(config.full_outage)
        marks["during"] = amp.read_tally(stack.metrics_dir)
        await _set_faults(admin, stack, "primary", config)
        marks["healed_at"] = time.time()


async def _redis_faults(
    config: ChaosConfig, stack: ChaosStack, faults: Counter[str], dice: random.Random
) -> None:
    import redis.asyncio as aioredis

    flush = itertools.cycle([True, False])  # a flush, then a kill -9, and so on
    while True:
        await asyncio.sleep(config.redis_interval * dice.uniform(0.5, 1.5))
        service = stack.services["redis"]
        if next(flush):
            client = aioredis.Redis(host="127.0.0.1", port=service.port or 0)
            await client.flushall()
            await client.aclose()
            faults["Redis flushes"] += 1
        else:
            service.kill9()
            faults["Redis kill -9 and restart"] += 1
            await asyncio.sleep(0.5)
            await asyncio.to_thread(stack.restart, "redis")


# -- afterwards ----------------------------------------------------------------------------------


async def _final_retries(
    stack: ChaosStack, api_key: str, answers: Answers, bodies: dict[str, dict[str, Any]]
) -> int:
    late = [key for key, answer in answers.items() if answer is None]
    attempts: list[int] = []
    async with AsyncClient(
        base_url=stack.services["api-1"].url,
        retry=CLIENT_POLICY,
        headers={"Authorization": f"Bearer {api_key}"},
    ) as client:
        for key in late:
            await _pay(client, random.Random(), answers, attempts, bodies, key)  # noqa: S311
    return len(late)


async def _calm(admin: httpx.AsyncClient, stack: ChaosStack) -> None:
    """Faults off and every process up, so recovery can finish what the faults left."""
    for name in ("primary", "secondary"):
        await _set_faults(admin, stack, name, None)
    for name in stack.services:
        await asyncio.to_thread(stack.restart, name)


async def _drain(db: Database, console: Console) -> None:
    """Wait until no payment is processing and no webhook delivery is waiting."""
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        async with read(db) as conn:
            processing = (
                await conn.execute(
                    select(func.count())
                    .select_from(payments)
                    .where(payments.c.status == "processing")
                )
            ).scalar_one()
            waiting = (
                await conn.execute(
                    select(func.count())
                    .select_from(webhook_deliveries)
                    .where(webhook_deliveries.c.status.in_(["pending", "delivering"]))
                )
            ).scalar_one()
        if processing == 0 and waiting == 0:
            return
        await asyncio.sleep(0.25)  # polling a condition with a deadline
    console.print(f"chaos: recovery did not finish in {DRAIN_TIMEOUT:.0f} s")


async def _movements(
    admin: httpx.AsyncClient, stack: ChaosStack, since: float
) -> list[dict[str, Any]]:
    """Every capture and refund since the run began, from both acquirers' settlement reports
    (one report per UTC day the run touched)."""
    days, day = [], since - since % 86400
    while day <= time.time():
        days.append(time.strftime("%Y-%m-%d", time.gmtime(day)))
        day += 86400
    found: list[dict[str, Any]] = []
    for name in ("primary", "secondary"):
        for date in days:
            response = await admin.get(
                f"{stack.services[name].url}/v1/settlements",
                params={"date": date, "format": "json"},
            )
            response.raise_for_status()
            found += response.json()["entries"]
    return found


async def _operations(admin: httpx.AsyncClient, stack: ChaosStack) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for name in ("primary", "secondary"):
        response = await admin.get(f"{stack.services[name].url}/admin/operations")
        found += [{**op, "acquirer": name} for op in response.json()["operations"]]
    return found


def render(report: ChaosReport, console: Console) -> None:
    table = Table(title="OncePay chaos audit", show_header=False)
    table.add_row("logical payments", str(report.logical_payments))
    table.add_row("requests (attempts)", str(report.requests))
    table.add_row("retries", str(report.retries))
    table.add_row("seconds", f"{report.seconds:.1f}")
    table.add_row("payments / s", f"{report.logical_payments / report.seconds:.1f}")
    for outcome, n in sorted(report.outcomes.items()):
        table.add_row(f"final answer: {outcome}", str(n))
    for figure, value in report.retry_control.items():
        table.add_row(f"retry control: {figure.replace('_', ' ')}", str(value))
    for fault, n in sorted(report.faults.items()):
        table.add_row(f"fault: {fault}", str(n))
    table.add_row("webhooks handled", str(report.webhooks_delivered))
    for figure, n in report.reconciliation.items():
        table.add_row(f"reconciliation: {figure}", str(n))
    for check, found in report.violations.items():
        mark = "[green]ok[/green]" if not found else f"[red]{len(found)} violations[/red]"
        table.add_row(f"check: {check}", mark)
    console.print(table)
    for check, found in report.violations.items():
        for violation in found[:10]:
            console.print(f"[red]violation[/red] {check}: {violation}", soft_wrap=True)
