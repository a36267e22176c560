"""PostgreSQL's own CPU for a payment's statements: OncePay's two beside the limit reference's.

``bench/e2e/run.py`` shows that on PostgreSQL with one API process the machine's two cores are
busy, and PostgreSQL's backends spend about as much CPU a payment as the API process. This
bench isolates that half: no HTTP, no API, no acquirer — only each system's two statements a
payment (a new key's claim with the payment and its event; then the settlement: the payment
moved, two ledger transactions with six entries, two events, the stored answer completing the
key), sent straight from asyncpg on ``--connections`` connections a variant, each payment's
second statement right after its first. The figure is the CPU of the variant's backends
(``/proc/<pid>/stat``) a payment; the variants run in turn in short bursts (``--seconds``), the
order rotating each round, and each round gives every variant's ratio to the first one's in
the same round (this machine's speed drifts by a third within minutes). Medians over rounds.

Variants (``--variants``, comma-separated; the first is the base of the ratios):

* ``oncepay`` -- ``payments.operations.onestatement``'s statements on the schema the service
  makes (its migrations, its idempotency table and that table's recovery-point index);
* ``lean`` -- the same, without the lists' and the dashboard's indexes (migrations 7 and 9):
  what those indexes cost the write path;
* ``nofanout`` -- the same, without the webhook fan-out (``INSERT … SELECT`` over the
  merchant's endpoints, none here): what it costs when nobody subscribed;
* ``hot`` -- the same, the recovery-point index replaced by one on a stored generated column
  (the point's object id, which completion does not change), so that the record's completion
  can be a heap-only (HOT) update as the toolkit's table (``fillfactor`` 80) intends: what the
  index that blocks it costs;
* ``reference`` -- ``../shared/perf/ref_server.py``'s 2-commit statements (imported from
  there, not copied) on its own schema.

    .venv/bin/python bench/e2e/pgside.py [--rounds 8] [--seconds 2] [--connections 16] \\
        [--variants oncepay,lean,nofanout,hot,reference]

Each variant also prints its tables' updates and how many were heap-only (HOT), and the table
the WAL a payment (``pg_current_wal_insert_lsn()`` around each burst). Writes only the
schemas ``bench_pgside_<variant>`` and drops them at the end; reads /proc, so the server must
run on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.harness.cpu import process_cpu

ROOT = Path(__file__).resolve().parents[2]
PERF = ROOT.parent / "shared" / "perf"
URL = os.environ.get("ONCEPAY_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ACCOUNTS = [
    "card_authorizations",
    "authorized_funds",
    "authorized_funds",
    "card_authorizations",
    "acquirer_receivable",
    "merchant_payable",
]
AMOUNTS = [1250, -1250, 1250, -1250, 1250, -1250]
HEADERS = '[["content-type","application/json"]]'
# A payment as the API shows it (~480 bytes): every event's data and the stored answer.
DOCUMENT = json.dumps(
    {
        "id": "pay_" + "0" * 24,
        "object": "payment",
        "amount": 1250,
        "currency": "EUR",
        "status": "captured",
        "capture_method": "automatic",
        "payment_method": "pm_card_ok",
        "description": None,
        "metadata": {},
        "amount_capturable": 0,
        "amount_captured": 1250,
        "amount_refunded": 0,
        "failure_code": None,
        "failure_message": None,
        "outcome_unknown": False,
        "acquirer": "primary",
        "created": 1765000000,
    },
    separators=(",", ":"),
)
Args = tuple[tuple[Any, ...], tuple[Any, ...]]


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def reference_module() -> Any:
    os.environ.setdefault("REF_DB", URL)  # the module reads its dialect when imported
    sys.path.insert(0, str(PERF))
    import ref_server  # type: ignore[import-not-found]  # ../shared/perf, run from its place

    return ref_server


def oncepay_statements(variant: str) -> tuple[str, str]:
    from oncepay.payments.operations import onestatement

    one, two = onestatement._made("oncepay_idempotency")
    if variant == "nofanout":
        for now, merchant in (("$21", "$10"), ("$6", "$18")):
            fan_out = onestatement._FAN_OUT.format(now=now, events="e", merchant=merchant)
            part = ", d AS (" + fan_out + ") "
            assert (part in one) != (part in two)
            one, two = one.replace(part, " "), two.replace(part, " ")
    return one, two


def oncepay_args(merchant: str) -> Args:
    """The statements' parameters, in onestatement's documented order."""
    now, payment, key = time.time(), new_id("pay"), secrets.token_hex(16)
    fence, scope = int(now * 1000), merchant
    one = (scope, key, "f" * 64, fence, now, now + 60, now + 86400,
           f"payment_created:create:{payment}", payment, merchant, 1250, "EUR",
           "pm_card_ok", "automatic", None, "{}", "processing", "primary", new_id("evt"),
           DOCUMENT, now)  # fmt: skip
    journals = [new_id("txn"), new_id("txn")]
    two = (scope, key, fence, payment, now, now, f"finished:create:{payment}", now + 60,
           201, HEADERS, DOCUMENT.encode(), "captured", "primary", new_id("auth"), 1250, None,
           None, merchant, "EUR", journals, ["authorization", "capture"],
           [journals[0]] * 2 + [journals[1]] * 4, ACCOUNTS, AMOUNTS,
           [new_id("evt"), new_id("evt")], ["payment.authorized", "payment.captured"],
           [DOCUMENT, DOCUMENT])  # fmt: skip
    return one, two


def reference_args(merchant: str) -> Args:
    """ref_server.create_payment's parameters for its 2-commit statements."""
    now, payment, key = time.time(), new_id("pay"), secrets.token_hex(16)
    fence = int(now * 1000)
    one = (merchant, key, "f" * 64, fence, now, now + 60, now + 86400,
           f"payment_created:create:{payment}", payment, 1250, "EUR", "pm_card_ok", "automatic",
           None, "{}", new_id("evt"), DOCUMENT)  # fmt: skip
    journals = [new_id("txn"), new_id("txn")]
    two = (merchant, key, fence, f"finished:create:{payment}", HEADERS,
           DOCUMENT.encode(), payment, "captured", 1250, new_id("auth"), None, None, now,
           journals, ["authorization", "capture"], "EUR", [journals[0]] * 2 + [journals[1]] * 4,
           ACCOUNTS, AMOUNTS, [new_id("evt"), new_id("evt")],
           ["payment.authorized", "payment.captured"], [DOCUMENT, DOCUMENT])  # fmt: skip
    return one, two


async def oncepay_schema(schema: str, variant: str) -> str:
    """The service's schema (its migrations, its idempotency store's table and index); a
    merchant."""
    from oncepay.idempotency.stores.postgres import PostgresStore

    env = {**os.environ, "ONCEPAY_DATABASE_URL": f"{URL}?schema={schema}"}
    made = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "oncepay", "merchants", "create", "bench"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    merchant: str = json.loads(made.stdout)["id"]
    store = PostgresStore(URL, table=f"{schema}.oncepay_idempotency")
    try:
        await store.get("bench", "set-up")  # creates the table
    finally:
        await store.aclose()
    from oncepay.payments.storage.migrations import _V7_INDEXES, _V9_INDEXES

    table = f'"{schema}".oncepay_idempotency'
    conn = await asyncpg.connect(URL)
    try:
        if variant == "hot":
            await conn.execute(
                f"ALTER TABLE {table} ADD COLUMN recovery_object text "
                "GENERATED ALWAYS AS (split_part(recovery_point, ':', 3)) STORED"
            )
            await conn.execute(f"CREATE INDEX ON {table} (recovery_object)")
        else:  # as payments.storage.idempotency makes it when the service starts
            await conn.execute(f"CREATE INDEX ON {table} (recovery_point)")
        if variant == "lean":  # what migrations 7 and 9 add: the lists' and dashboard's indexes
            for index in [*_V7_INDEXES, *_V9_INDEXES]:
                await conn.execute(f'DROP INDEX IF EXISTS "{schema}"."{index}"')
    finally:
        await conn.close()
    return merchant


async def reference_schema(schema: str) -> str:
    ref = reference_module()
    merchant = new_id("mer")
    conn = await asyncpg.connect(URL, server_settings={"search_path": schema})
    try:
        await conn.execute(ref.SCHEMA)
        await conn.execute("INSERT INTO merchants VALUES ($1, 'bench', $2)", merchant, time.time())
    finally:
        await conn.close()
    return merchant


def backend_cpu(pids: list[int]) -> float:
    """User+sys CPU seconds of the server processes ``pids``."""
    return sum(process_cpu(pid) for pid in pids)


class Variant:
    def __init__(self, name: str) -> None:
        self.name = name
        self.schema = f"bench_pgside_{name}"
        self.conns: list[asyncpg.Connection] = []
        self.runs: list[float] = []
        self.wal: list[float] = []  # WAL bytes a payment, a burst each

    async def open(self, connections: int) -> None:
        admin = await asyncpg.connect(URL)
        try:
            await admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
            await admin.execute(f'CREATE SCHEMA "{self.schema}"')
        finally:
            await admin.close()
        if self.name == "reference":
            self.merchant = await reference_schema(self.schema)
            ref = reference_module()
            self.sql = (ref.PG_START2, ref.PG_FINISH.format(k=ref.PG_K_DONE))
            self.args = reference_args
        else:
            self.merchant = await oncepay_schema(self.schema, self.name)
            self.sql = oncepay_statements(self.name)
            self.args = oncepay_args
        settings = {"search_path": self.schema}
        for _ in range(connections):
            self.conns.append(await asyncpg.connect(URL, server_settings=settings))
        self.pids = [conn.get_server_pid() for conn in self.conns]

    async def burst(self, seconds: float) -> float:
        """Backend CPU microseconds a payment over ``seconds`` of payments."""
        stop, count = time.monotonic() + seconds, 0

        async def payments(conn: asyncpg.Connection) -> None:
            nonlocal count
            while time.monotonic() < stop:
                one, two = self.args(self.merchant)
                if len(await conn.fetch(self.sql[0], *one)) != 1:
                    raise AssertionError(f"{self.name}: the first statement wrote nothing")
                if len(await conn.fetch(self.sql[1], *two)) != 1:
                    raise AssertionError(f"{self.name}: the second statement wrote nothing")
                count += 1

        lsn = "SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"
        wal_before = await self.conns[0].fetchval(lsn)
        before = backend_cpu(self.pids)
        await asyncio.gather(*(payments(conn) for conn in self.conns))
        cpu = backend_cpu(self.pids) - before
        self.wal.append(float(await self.conns[0].fetchval(lsn) - wal_before) / count)
        return cpu / count * 1e6

    async def close(self) -> None:
        for conn in self.conns:
            await conn.close()
        admin = await asyncpg.connect(URL)
        try:
            if self.conns:  # a backend's counters reach the view by the time it has exited
                updated = await admin.fetch(
                    "SELECT relname, n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE schemaname = $1 AND n_tup_upd > 0 ORDER BY relname",
                    self.schema,
                )
                hot = ", ".join(f"{r[0]} {r[2]}/{r[1]}" for r in updated)
                print(f"{self.name}: heap-only updates {hot or 'none'}")
            await admin.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        finally:
            await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--variants", default="oncepay,lean,nofanout,reference")
    args = parser.parse_args()
    variants = [Variant(name) for name in args.variants.split(",")]
    try:
        for variant in variants:
            await variant.open(args.connections)
            await variant.burst(1.0)  # every connection prepares its statements
        for round_ in range(args.rounds):
            turn = round_ % len(variants)
            for variant in variants[turn:] + variants[:turn]:
                variant.runs.append(await variant.burst(args.seconds))
            line = ", ".join(f"{v.name} {v.runs[-1]:.0f}" for v in variants)
            print(f"round {round_ + 1}: {line} us a payment", flush=True)
    finally:
        for variant in variants:
            await variant.close()
    base = variants[0]
    print(f"\n| variant | backend CPU us a payment | x {base.name}, paired | WAL bytes a payment |")
    print("|---|---:|---:|---:|")
    for variant in variants:
        ratios = [mine / theirs for mine, theirs in zip(variant.runs, base.runs, strict=True)]
        print(
            f"| {variant.name} | {statistics.median(variant.runs):.0f} "
            f"| {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) "
            f"| {statistics.median(variant.wal[1:]):,.0f} |"  # the warm-up burst left out
        )


if __name__ == "__main__":
    asyncio.run(main())
