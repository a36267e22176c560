"""OncePay driver benchmark: async Redis and PostgreSQL clients, in one process.

    python bench/drivers/run.py            # full run (~100 s)
    python bench/drivers/run.py --quick    # smoke run (~20 s)
    python bench/drivers/run.py --only redis --driver proto --json out.json

What is measured.  A *cell* is (driver, operation, concurrency).  Every driver is
opened up front; each cell is calibrated (warm-up), then run for ``--rounds``
rounds, and in every round each cell runs one chunk of N/rounds operations, the
cells taking turns (rotated order).  Interleaving makes all drivers see the same
machine conditions: on a small VM the CPU cost of one loopback round trip moves
a lot with CPU placement and background load, and a driver measured alone in a
quiet minute would look better than one measured in a busy one.

Per cell we report, over all N operations (N sized for ``--seconds`` of wall time):

* CPU us/op: ``time.process_time()`` delta / N -- user+sys CPU of the whole
  process, including helper threads (valkey-glide's Rust runtime);
* user / sys: the same split via ``getrusage``;
* ops/s: N / wall time (one asyncio event loop, default loop, no uvloop);
* spread: (max - min) / median of the per-round CPU us/op, a noise indicator;
* conns: server connections the driver opened (CLIENT LIST / pg_stat_activity).

Servers: Redis 127.0.0.1:6379 and PostgreSQL 127.0.0.1:5432 (user postgres,
database postgres); see --redis-host/--redis-port/--pg-dsn.  The benchmark only
writes keys prefixed ``oncepay:bench:drivers:`` and the schema ``bench_drivers``,
and removes both at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import platform
import socket
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: bench imports

from bench.drivers import resp_prototype
from bench.harness.cells import rotated, spread
from bench.harness.cpu import Usage
from bench.harness.environment import packages
from bench.harness.report import print_table
from bench.harness.stores import redis_delete

Op = Callable[[], Awaitable[Any]]
OpFactory = Callable[[], Op]  # called once per concurrent task

# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------
KEY_PREFIX = "oncepay:bench:drivers:"
CLIENT_NAME = "oncepay-bench-drivers"  # CLIENT SETNAME / application_name prefix
N_KEYS = 1000
BODY = (
    b'{"id":"pay_0123456789","status":"succeeded","amount":4200,"currency":"eur",'
    b'"customer":"cus_ABCDEFGHIJ","created":1700000000,"livemode":false,"metadata":'
    b'{"order":"ord_42"},"receipt":"rcpt_0123456789abcdef"}'
).ljust(200, b" ")[:200]

# Representative OncePay "claim": one key holding a hash of 8 fields.  Read all the
# fields; if the record is absent, create it (HSET of 8 fields) with a lease TTL
# (PEXPIRE); otherwise return the stored record (replay).  Always returns 8 values.
# The pre-seeded keys hold a completed record, so the benchmark runs the replay
# path, whose reply carries the ~200-byte body (the largest reply shape).
CLAIM_LUA = """
local f = redis.call('HMGET', KEYS[1], 'state', 'fp', 'owner', 'status', 'headers', 'body',
                     'created', 'expires')
if not f[1] then
  redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[1], 'owner', ARGV[2], 'status', '',
             'headers', '', 'body', '', 'created', ARGV[4], 'expires', ARGV[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {'claimed', ARGV[1], ARGV[2], '', '', '', ARGV[4], ARGV[3]}
end
if f[2] ~= ARGV[1] then
  return {'mismatch', f[2], f[3] or '', '', '', '', f[7] or '', f[8] or ''}
end
return {f[1], f[2], f[3] or '', f[4] or '', f[5] or '', f[6] or '', f[7] or '', f[8] or ''}
"""
FP = b"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
OWNER = b"worker-7f3c2a"
CLAIM_ARGS = [FP, OWNER, b"30000", b"1700000000000"]
SEED_HASH = {
    b"state": b"completed",
    b"fp": FP,
    b"owner": OWNER,
    b"status": b"201",
    b"headers": b'{"content-type":"application/json"}',
    b"body": BODY,
    b"created": b"1700000000000",
    b"expires": b"30000",
}


def claim_keys() -> Iterator[bytes]:
    return itertools.cycle([f"{KEY_PREFIX}claim:{i}".encode() for i in range(N_KEYS)])


def get_keys() -> Iterator[bytes]:
    return itertools.cycle([f"{KEY_PREFIX}get:{i}".encode() for i in range(N_KEYS)])


def redis_ops(
    claim: Callable[[bytes], Awaitable[Any]], get: Callable[[bytes], Awaitable[Any]]
) -> dict[str, OpFactory]:
    """The two Redis operations, each task cycling through its own copy of the keys."""

    def claims() -> Op:
        keys = claim_keys()
        return lambda: claim(next(keys))

    def gets() -> Op:
        keys = get_keys()
        return lambda: get(next(keys))

    return {"claim": claims, "get": gets}


def check_claim_reply(reply: Any) -> None:
    vals = [v.encode() if isinstance(v, str) else v for v in reply]
    if len(vals) != 8 or vals[0] != b"completed" or vals[5] != BODY:
        raise AssertionError(f"unexpected claim reply: {reply!r}")


# PostgreSQL: a plpgsql claim() returning one row of 10 columns (text, bytea, uuid,
# int4, timestamptz).  Seeded rows are completed records: the call is a replay.
PG_SETUP = """
DROP SCHEMA IF EXISTS bench_drivers CASCADE;
CREATE SCHEMA bench_drivers;
CREATE TABLE bench_drivers.idem (
    key          text PRIMARY KEY,
    state        text        NOT NULL,
    fingerprint  bytea       NOT NULL,
    owner        uuid        NOT NULL,
    status_code  int4,
    headers      text,
    body         bytea,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz NOT NULL,
    attempts     int4        NOT NULL DEFAULT 1
);
CREATE FUNCTION bench_drivers.claim(p_key text, p_fp bytea, p_owner uuid, p_lease_ms int4)
RETURNS TABLE (key text, state text, fingerprint bytea, owner uuid, status_code int4,
               headers text, body bytea, created_at timestamptz, expires_at timestamptz,
               attempts int4)
LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT i.* FROM bench_drivers.idem i WHERE i.key = p_key;
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO bench_drivers.idem AS i (key, state, fingerprint, owner, created_at, expires_at)
    VALUES (p_key, 'pending', p_fp, p_owner, now(),
            now() + make_interval(secs => p_lease_ms / 1000.0))
    ON CONFLICT DO NOTHING
    RETURNING i.*;
END
$$;
INSERT INTO bench_drivers.idem (key, state, fingerprint, owner, status_code, headers, body,
                                created_at, expires_at)
SELECT 'k' || g, 'completed', decode(repeat('ab', 32), 'hex'),
       '6f1c2d3e-4b5a-4c6d-8e7f-0123456789ab', 201, '{"content-type":"application/json"}',
       convert_to(rpad('{"id":"pay_' || g || '","status":"succeeded"}', 200), 'UTF8'),
       now(), now() + interval '1 day'
FROM generate_series(0, 999) g;
ANALYZE bench_drivers.idem;
"""
PG_QUERY = "SELECT * FROM bench_drivers.claim($1, $2, $3, $4)"
PG_QUERY_PSYCOPG = "SELECT * FROM bench_drivers.claim(%s, %s, %s, %s)"
PG_FP = bytes.fromhex("ab" * 32)
PG_OWNER = uuid.UUID("6f1c2d3e-4b5a-4c6d-8e7f-0123456789ab")


def pg_params() -> Iterator[tuple[str, bytes, uuid.UUID, int]]:
    return itertools.cycle([(f"k{i}", PG_FP, PG_OWNER, 30000) for i in range(N_KEYS)])


def check_pg_row(row: Any) -> None:
    vals = list(row.values()) if hasattr(row, "values") else list(row)
    if len(vals) != 10 or vals[1] != "completed" or len(vals[6]) != 200 or vals[3] != PG_OWNER:
        raise AssertionError(f"unexpected row: {row!r}")


# --------------------------------------------------------------------------
# Driver adapters: open() returns {op name: OpFactory}; concs() says which
# concurrency levels make sense for the driver.
# --------------------------------------------------------------------------
class Adapter:
    group = ""
    name = ""
    tag = ""  # short id, used in the connection name
    needs = ""  # module that must import
    single_connection = False  # True: cannot run concurrent ops (c=1 only)

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.note = ""

    @property
    def conn_name(self) -> str:
        return f"{CLIENT_NAME}:{self.tag}"

    def concs(self) -> list[int]:
        return [1] if self.single_connection else list(self.args.concurrency)

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        raise NotImplementedError


class NoopFloor(Adapter):
    group, name, tag = "floor", "await no-op coroutine", "noop"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        async def noop() -> None:
            return None

        self.note = "harness overhead per op"
        return {"noop": lambda: noop}


class SocketFloor(Adapter):
    """One RESP GET over a blocking socket, no event loop: the kernel/loopback floor."""

    group, name, tag = "floor", "blocking socket, no asyncio", "sock"
    single_connection = True

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        sock = socket.create_connection((self.args.redis_host, self.args.redis_port))
        stack.callback(sock.close)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = resp_prototype.encode_command(("GET", f"{KEY_PREFIX}get:0"))
        expect = len(BODY) + len(b"$200\r\n\r\n")
        self.note = "kernel+loopback CPU of one round trip"

        async def rtt() -> None:
            sock.sendall(req)
            got = len(sock.recv(4096))
            while got < expect:
                got += len(sock.recv(4096))

        return {"get": lambda: rtt}


class RedisPy(Adapter):
    group, name, tag, needs = "redis", "redis-py asyncio + hiredis", "redispy", "redis"

    def __init__(self, args: argparse.Namespace, pure_python: bool = False) -> None:
        super().__init__(args)
        self.pure_python = pure_python
        if pure_python:
            self.name, self.tag = "redis-py asyncio, pure-Python parser", "redispy-pure"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import redis.asyncio as aioredis
        from redis.asyncio.connection import (  # type: ignore[attr-defined]
            ConnectionPool,
            _AsyncRESP3Parser,
        )

        kw: dict[str, Any] = {"parser_class": _AsyncRESP3Parser} if self.pure_python else {}
        pool = ConnectionPool(
            host=self.args.redis_host, port=self.args.redis_port, client_name=self.conn_name, **kw
        )
        r = aioredis.Redis.from_pool(pool)  # the client owns (and closes) the pool
        stack.push_async_callback(r.aclose)
        await r.ping()
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        self.note = f"{type(conn._parser).__name__}, RESP{conn.protocol}, 1 conn per in-flight cmd"
        await pool.release(conn)
        script = r.register_script(CLAIM_LUA)  # EVALSHA, NOSCRIPT -> SCRIPT LOAD + retry
        return redis_ops(lambda key: script(keys=[key], args=CLAIM_ARGS), r.get)


class Coredis(Adapter):
    group, name, tag, needs = "redis", "coredis", "coredis", "coredis"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import coredis

        r = await stack.enter_async_context(
            coredis.Redis(self.args.redis_host, self.args.redis_port, client_name=self.conn_name)
        )
        await r.ping()
        self.note = "RESP3, own mypyc parser (hiredis unused), pooled"
        script = r.register_script(CLAIM_LUA)
        return redis_ops(lambda key: script(keys=[key], args=CLAIM_ARGS), r.get)


class Glide(Adapter):
    group, name, tag, needs = "redis", "valkey-glide", "glide", "glide"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        from glide import GlideClient, GlideClientConfiguration, NodeAddress, Script

        cfg = GlideClientConfiguration(
            [NodeAddress(self.args.redis_host, self.args.redis_port)],
            request_timeout=5000,
            client_name=self.conn_name,
        )
        c = await GlideClient.create(cfg)
        stack.push_async_callback(c.close)
        await c.ping()
        self.note = "Rust core on own threads (counted), multiplexed, RESP3"
        script = Script(CLAIM_LUA)
        return redis_ops(lambda key: c.invoke_script(script, keys=[key], args=CLAIM_ARGS), c.get)


class Prototype(Adapter):
    group, name, tag, needs = "redis", "resp_prototype (Protocol+hiredis)", "proto", "hiredis"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        c = await resp_prototype.RespClient.connect(self.args.redis_host, self.args.redis_port)
        stack.push_async_callback(c.close)
        await c.execute("CLIENT", "SETNAME", self.conn_name)
        self.note = "RESP2, 1 shared conn, FIFO futures, coalesced writes"
        script = resp_prototype.Script(CLAIM_LUA)
        return redis_ops(lambda key: c.evalsha(script, (key,), CLAIM_ARGS), c.get)


class AsyncpgConn(Adapter):
    group, name, tag, needs = "pg", "asyncpg Connection", "asyncpg", "asyncpg"
    single_connection = True  # a Connection refuses concurrent queries

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import asyncpg

        con = await asyncpg.connect(
            self.args.pg_dsn, server_settings={"application_name": self.conn_name}
        )
        stack.push_async_callback(con.close)
        self.note = "binary, statement cache (prepared), fetchrow"

        def make() -> Op:
            params = pg_params()
            return lambda: con.fetchrow(PG_QUERY, *next(params))

        check_pg_row(await make()())
        return {"claim()": make}


class PsycopgConn(Adapter):
    group, name, tag, needs = "pg", "psycopg AsyncConnection", "psycopg", "psycopg"
    single_connection = True  # concurrent use just queues on the connection lock

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import psycopg

        con = await psycopg.AsyncConnection.connect(
            self.args.pg_dsn, autocommit=True, prepare_threshold=0, application_name=self.conn_name
        )
        stack.push_async_callback(con.close)
        self.note = f"binary, prepare=True, autocommit, libpq wrapper={psycopg.pq.__impl__}"

        def make() -> Op:
            params = pg_params()

            async def op() -> Any:
                cur = await con.execute(PG_QUERY_PSYCOPG, next(params), prepare=True, binary=True)
                return await cur.fetchone()

            return op

        check_pg_row(await make()())
        return {"claim()": make}


class AsyncpgPool(Adapter):
    group, name, tag, needs = "pg", "asyncpg Pool", "asyncpg-pool", "asyncpg"

    def __init__(self, args: argparse.Namespace, noop_reset: bool = False) -> None:
        super().__init__(args)
        self.noop_reset = noop_reset
        if noop_reset:
            self.name, self.tag = "asyncpg Pool (reset=no-op)", "asyncpg-pool-noreset"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import asyncpg

        async def no_reset(con: Any) -> None:
            return None

        size = self.args.pg_pool_size
        pool = await asyncpg.create_pool(
            self.args.pg_dsn,
            min_size=size,
            max_size=size,
            server_settings={"application_name": self.conn_name},
            reset=no_reset if self.noop_reset else None,
        )
        stack.push_async_callback(pool.close)
        self.note = f"size={size}, pool.fetchrow" + (
            "" if self.noop_reset else "; release runs the reset query (+1 round trip)"
        )

        def make() -> Op:
            params = pg_params()
            return lambda: pool.fetchrow(PG_QUERY, *next(params))

        check_pg_row(await make()())
        return {"claim()": make}


class DequePool:
    """Bench-only minimal pool: idle deque + FIFO waiters, no reset, no shield().

    Shows what asyncpg costs without Pool's per-call overhead (asyncpg's Pool.release
    wraps every release in asyncio.shield(), i.e. a new Task, and runs a reset query).
    """

    def __init__(self, conns: list[Any]) -> None:
        self._idle: deque[Any] = deque(conns)
        self._waiters: deque[asyncio.Future[Any]] = deque()

    async def fetchrow(self, query: str, *args: Any) -> Any:
        if self._idle:
            con = self._idle.popleft()
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            con = await fut
        try:
            return await con.fetchrow(query, *args)
        finally:
            while self._waiters:
                w = self._waiters.popleft()
                if not w.done():
                    w.set_result(con)
                    break
            else:
                self._idle.append(con)


class AsyncpgDequePool(Adapter):
    group, name, tag, needs = "pg", "asyncpg + minimal deque pool", "asyncpg-deque", "asyncpg"

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        import asyncpg

        size = self.args.pg_pool_size
        conns = [
            await asyncpg.connect(
                self.args.pg_dsn, server_settings={"application_name": self.conn_name}
            )
            for _ in range(size)
        ]
        for con in conns:
            stack.push_async_callback(con.close)
        pool = DequePool(conns)
        self.note = f"size={size}, bench-only DequePool in run.py (~25 lines)"

        def make() -> Op:
            params = pg_params()
            return lambda: pool.fetchrow(PG_QUERY, *next(params))

        check_pg_row(await make()())
        return {"claim()": make}


class PsycopgPool(Adapter):
    group, name, tag, needs = (
        "pg",
        "psycopg_pool AsyncConnectionPool",
        "psycopg-pool",
        "psycopg_pool",
    )

    async def open(self, stack: AsyncExitStack) -> dict[str, OpFactory]:
        from psycopg_pool import AsyncConnectionPool

        size = self.args.pg_pool_size
        pool = AsyncConnectionPool(
            self.args.pg_dsn,
            min_size=size,
            max_size=size,
            open=False,
            kwargs={
                "autocommit": True,
                "prepare_threshold": 0,
                "application_name": self.conn_name,
            },
        )
        await pool.open(wait=True)
        stack.push_async_callback(pool.close)
        self.note = f"size={size}, binary, prepare=True, autocommit"

        def make() -> Op:
            params = pg_params()

            async def op() -> Any:
                async with pool.connection() as con:
                    cur = await con.execute(
                        PG_QUERY_PSYCOPG, next(params), prepare=True, binary=True
                    )
                    return await cur.fetchone()

            return op

        check_pg_row(await make()())
        return {"claim()": make}


def all_adapters(args: argparse.Namespace) -> list[Adapter]:
    return [
        NoopFloor(args),
        SocketFloor(args),
        RedisPy(args),
        RedisPy(args, pure_python=True),
        Coredis(args),
        Glide(args),
        Prototype(args),
        AsyncpgConn(args),
        PsycopgConn(args),
        AsyncpgPool(args),
        AsyncpgPool(args, noop_reset=True),
        AsyncpgDequePool(args),
        PsycopgPool(args),
    ]


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------
@dataclass
class Cell:
    group: str
    driver: str
    op: str
    conc: int
    cpu_us: float | None = None  # client CPU per op (process_time)
    user_us: float | None = None  # split of the above (getrusage)
    sys_us: float | None = None
    ops_s: float | None = None
    spread: float | None = None  # (max-min)/median of per-round CPU/op, %
    conns: int | None = None  # server connections the driver opened
    n_ops: int = 0
    wall_s: float = 0.0
    note: str = ""
    rounds_cpu_us: list[float] = field(default_factory=list)


@dataclass
class Job:
    cell: Cell
    adapter: Adapter
    ops: list[Op]
    per_task: int = 0  # ops per task per round
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    failed: bool = False


async def run_chunk(ops: list[Op], per_task: int) -> tuple[float, float, float, float]:
    """per_task ops in each of len(ops) tasks; returns (cpu, user, sys, wall) seconds."""

    async def worker(op: Op) -> None:
        for _ in range(per_task):
            await op()

    before = Usage.now()
    if len(ops) == 1:
        await worker(ops[0])
    else:
        await asyncio.gather(*(worker(op) for op in ops))
    used = Usage.now() - before
    return used.cpu, used.user, used.sys, used.wall


async def calibrate(job: Job, seconds: float, rounds: int, warmup: float) -> None:
    per_task = 20
    while True:  # warm-up doubling as rate calibration
        *_, wall = await run_chunk(job.ops, per_task)
        if wall >= warmup / 4 or per_task > 10_000_000:
            break
        per_task *= 4
    rate = per_task * len(job.ops) / max(wall, 1e-9)
    job.per_task = max(1, int(rate * seconds / len(job.ops) / rounds))


async def run_jobs(jobs: list[Job], args: argparse.Namespace) -> None:
    for job in jobs:
        progress(f"calibrating {job.cell.driver} {job.cell.op} c={job.cell.conc}")
        try:
            await calibrate(job, args.seconds, args.rounds, args.calibrate)
        except Exception as e:
            fail(job, e)
    live = [j for j in jobs if not j.failed]
    for rnd in range(args.rounds):
        progress(f"round {rnd + 1}/{args.rounds} ({len(live)} cells)")
        for job in rotated(live, rnd * max(1, len(live) // args.rounds)):
            if job.failed:
                continue
            gc.collect()
            try:
                res = await run_chunk(job.ops, job.per_task)
            except Exception as e:
                fail(job, e)
                continue
            for i in range(4):
                job.totals[i] += res[i]
            job.cell.rounds_cpu_us.append(res[0] / (job.per_task * len(job.ops)) * 1e6)
    for job in live:
        if job.failed:
            continue
        c = job.cell
        n = job.per_task * len(job.ops) * args.rounds
        cpu, user, sys_, wall = job.totals
        c.cpu_us, c.user_us, c.sys_us = cpu / n * 1e6, user / n * 1e6, sys_ / n * 1e6
        c.ops_s, c.n_ops, c.wall_s = n / wall, n, wall
        c.spread = spread(c.rounds_cpu_us) * 100


def fail(job: Job, e: BaseException) -> None:
    traceback.print_exception(e)
    job.failed = True
    job.cell.note = f"failed: {type(e).__name__}: {e}"


def _redis_admin(args: argparse.Namespace) -> Any:
    import redis

    return redis.Redis(host=args.redis_host, port=args.redis_port, protocol=2)


def redis_setup(args: argparse.Namespace) -> str:
    admin = _redis_admin(args)
    try:
        redis_cleanup(args)
        p = admin.pipeline(transaction=False)
        for i in range(N_KEYS):
            p.hset(f"{KEY_PREFIX}claim:{i}", mapping=SEED_HASH)
            p.set(f"{KEY_PREFIX}get:{i}", BODY)
        p.script_flush()  # every driver must go through its NOSCRIPT path once
        p.execute()
        return str(admin.info("server").get("redis_version", "?"))
    finally:
        admin.close()


def redis_cleanup(args: argparse.Namespace) -> None:
    redis_delete(f"redis://{args.redis_host}:{args.redis_port}/0", KEY_PREFIX)


def redis_conn_counts(args: argparse.Namespace) -> dict[str, int]:
    admin = _redis_admin(args)
    try:
        counts: dict[str, int] = {}
        for c in admin.client_list():
            counts[c.get("name", "")] = counts.get(c.get("name", ""), 0) + 1
        return counts
    finally:
        admin.close()


async def pg_exec(args: argparse.Namespace, sql: str) -> Any:
    import asyncpg

    con = await asyncpg.connect(args.pg_dsn)
    try:
        await con.execute(sql)
        return await con.fetch(
            "SELECT current_setting('server_version') AS v, application_name AS name, count(*) AS n"
            " FROM pg_stat_activity GROUP BY 1, 2"
        )
    finally:
        await con.close()


def _importable(mod: str) -> str | None:
    try:
        __import__(mod)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def chosen(args: argparse.Namespace) -> list[Adapter]:
    """The adapters ``--only`` and ``--driver`` ask for, and the floors."""
    return [
        a
        for a in all_adapters(args)
        if (args.only is None or a.group in (args.only, "floor"))
        and (not args.driver or a.group == "floor" or any(s in a.name for s in args.driver))
        and not (args.only == "pg" and a.tag == "sock")
    ]


async def open_jobs(stack: AsyncExitStack, ad: Adapter) -> list[Job] | Cell:
    """The adapter's jobs, one per operation and concurrency; or a cell saying why none."""
    err = _importable(ad.needs) if ad.needs else None
    if err:
        return Cell(ad.group, ad.name, "-", 0, note=f"unavailable: {err}")
    try:
        factories = await ad.open(stack)
        if "claim" in factories and ad.group == "redis":
            check_claim_reply(await factories["claim"]()())
    except Exception as e:
        traceback.print_exception(e)
        return Cell(ad.group, ad.name, "-", 0, note=f"failed: {e!r}")
    return [
        Job(
            Cell(ad.group, ad.name, op_name, conc, note=ad.note),
            ad,
            [factory() for _ in range(conc)],
        )
        for op_name, factory in factories.items()
        for conc in ad.concs()
    ]


async def amain(args: argparse.Namespace) -> tuple[list[Cell], dict[str, str]]:
    meta = versions()
    t0 = time.perf_counter()
    adapters = chosen(args)
    groups = {a.group for a in adapters}
    redis = bool(groups & {"redis", "floor"}) and args.only != "pg"
    cells: list[Cell] = []
    jobs: list[Job] = []
    if redis:
        meta["redis_server"] = redis_setup(args)
    if "pg" in groups:
        rows = await pg_exec(args, PG_SETUP)
        meta["postgres_server"] = rows[0]["v"]
    try:
        async with AsyncExitStack() as stack:
            for ad in adapters:
                opened = await open_jobs(stack, ad)
                cells += [opened] if isinstance(opened, Cell) else [job.cell for job in opened]
                jobs += [] if isinstance(opened, Cell) else opened
            await run_jobs(jobs, args)
            await conn_counts(args, jobs, groups)
    finally:
        if redis:
            redis_cleanup(args)
        if "pg" in groups:
            await pg_exec(args, "DROP SCHEMA IF EXISTS bench_drivers CASCADE")
    meta["rounds"] = str(args.rounds)
    meta["total_runtime_s"] = f"{time.perf_counter() - t0:.0f}"
    return cells, meta


async def conn_counts(args: argparse.Namespace, jobs: list[Job], groups: set[str]) -> None:
    counts: dict[str, int] = {}
    if "redis" in groups:
        counts.update(redis_conn_counts(args))
    if "pg" in groups:
        counts.update({r["name"]: r["n"] for r in await pg_exec(args, "SELECT 1")})
    for job in jobs:
        if job.adapter.group in ("redis", "pg"):
            job.cell.conns = counts.get(job.adapter.conn_name, 0)


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------
def progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


DISTRIBUTIONS: tuple[str, ...] = (
    "redis",
    "hiredis",
    "coredis",
    "valkey-glide",
    "asyncpg",
    "psycopg",
)
DISTRIBUTIONS += ("psycopg-binary", "psycopg-pool")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "cpus": str(os.cpu_count())}
    return {**out, **packages(DISTRIBUTIONS, missing="not installed")}


HEADERS = ["group", "driver", "op", "conc", "CPU us/op", "user", "sys", "ops/s", "spread"]
HEADERS += ["conns", "notes"]


def table_rows(cells: list[Cell]) -> list[list[str]]:
    def fmt(v: float | None, spec: str, suffix: str = "") -> str:
        return "-" if v is None else format(v, spec) + suffix

    return [
        [
            c.group,
            c.driver,
            c.op,
            str(c.conc) if c.conc else "-",
            fmt(c.cpu_us, ".1f"),
            fmt(c.user_us, ".1f"),
            fmt(c.sys_us, ".1f"),
            fmt(c.ops_s, ",.0f"),
            fmt(c.spread, ".0f", "%"),
            str(c.conns) if c.conns is not None else "-",
            c.note,
        ]
        for c in cells
    ]


TITLE = (
    "OncePay drivers: client CPU us/op = process_time/N (user/sys: getrusage),"
    " spread = (max-min)/median over rounds"
)


def render(cells: list[Cell], meta: dict[str, str], markdown: bool = False) -> None:
    rows = table_rows(cells)
    print_table(TITLE, HEADERS, rows, right=range(3, 10), use_markdown=markdown)
    print("\nversions: " + ", ".join(f"{k}={v}" for k, v in meta.items()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="0.4 s per cell, 2 rounds: smoke test")
    p.add_argument("--seconds", type=float, help="measured wall seconds per cell (default 2.2)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per cell (default 4)")
    p.add_argument("--calibrate", type=float, help="warm-up/calibration seconds per cell")
    p.add_argument("--only", choices=("redis", "pg"), help="one group (+ the floor rows)")
    p.add_argument("--driver", action="append", help="substring of a driver name (repeatable)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--redis-host", default=os.environ.get("ONCEPAY_BENCH_REDIS_HOST", "127.0.0.1"))
    p.add_argument(
        "--redis-port", type=int, default=int(os.environ.get("ONCEPAY_BENCH_REDIS_PORT", "6379"))
    )
    p.add_argument(
        "--pg-dsn",
        default=os.environ.get(
            "ONCEPAY_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    p.add_argument("--pg-pool-size", type=int, default=8)
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    a = p.parse_args(argv)
    if a.seconds is None:
        a.seconds = 0.4 if a.quick else 2.2
    if a.rounds is None:
        a.rounds = 2 if a.quick else 4
    if a.calibrate is None:
        a.calibrate = 0.15 if a.quick else 0.4
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cells, meta = asyncio.run(amain(args))
    render(cells, meta, markdown=args.markdown)
    if args.json:
        with open(args.json, "w") as fh:
            payload = {"meta": meta, "args": vars(args), "cells": [asdict(c) for c in cells]}
            json.dump(payload, fh, indent=2)
    return 1 if any(c.note.startswith("failed") for c in cells) else 0


if __name__ == "__main__":
    sys.exit(main())
