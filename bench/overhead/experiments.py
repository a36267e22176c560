"""Experiments, not shipped code: OncePay's Redis store on other drivers.

The store reaches its driver through one seam, ``_Commands`` in
``oncepay/idempotency/stores/redis.py`` (``execute_command(*args)`` and ``aclose()``); these
variants build the store as ``RedisStore.from_url`` does and swap what is behind that seam, so
the store, its Lua scripts, argument encoding and reply decoding are OncePay's own and only the
driver differs:

* ``oncepay-redis-redispy``: redis-py's asyncio client, configured as OncePay configured it
  before it had a client of its own (``socket_timeout`` and ``socket_connect_timeout`` 2 s, no
  retries). redis-py spends its CPU per command on a pool checkout, a ``wait_for`` Task per
  timed write on Python 3.11, a retry wrapper, the ``deprecated_args`` decorator and one socket
  write per command.
* ``oncepay-redis-pipelined``: :class:`PipelinedCommands` below, a minimal pipelined client
  (about 100 lines), as a yardstick for whatever driver the store ships with.

An earlier variant, redis-py without ``socket_timeout`` (no ``wait_for`` Task per command),
measured the same as redis-py with it, within noise (RESULTS.md), and was dropped.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

_INCOMPLETE = object()


def _encode(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode()
        elif isinstance(a, int | float) and not isinstance(a, bool):
            b = repr(a).encode()
        else:
            raise TypeError(f"unsupported RESP argument {type(a).__name__}")
        parts += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.pending: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.lost: BaseException | None = None
        self.stats = {"commands": 0, "writes": 0, "reads": 0}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.stats["reads"] += 1
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not _INCOMPLETE:
            fut = self.waiters.popleft()
            if fut.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                error = NoScriptError if text.startswith("NOSCRIPT") else ResponseError
                fut.set_exception(error(text))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc or ConnectionError("connection closed")
        self.transport = None
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(RedisConnectionError(str(self.lost)))

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self.transport is None:
            raise RedisConnectionError(f"not connected: {self.lost}")
        fut = self.loop.create_future()
        self.stats["commands"] += 1
        idle = not self.waiters and not self.pending
        self.waiters.append(fut)
        if idle:
            self.stats["writes"] += 1
            self.transport.write(payload)  # nothing in flight: write now
        else:
            if not self.pending:
                self.loop.call_soon(self.flush)
            self.pending.append(payload)  # in flight: coalesce this loop iteration's commands
        return fut

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if self.transport is not None and pending:
            self.stats["writes"] += 1
            self.transport.write(b"".join(pending))


class PipelinedCommands:
    """``execute_command(*args)`` over one pipelined connection, connected on first use."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.lstrip("/") or 0)
        self._protocol: _Protocol | None = None
        self._lock: asyncio.Lock | None = None

    async def _connect(self) -> _Protocol:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._protocol is None or self._protocol.transport is None:
                loop = asyncio.get_running_loop()
                _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
                if self.db:
                    await protocol.send(_encode(("SELECT", self.db)))
                self._protocol = protocol
        return self._protocol

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        protocol = self._protocol
        if protocol is None or protocol.transport is None:
            protocol = await self._connect()
        return await protocol.send(_encode(args))

    async def aclose(self) -> None:
        if self._protocol is not None:
            _write_stats(self._protocol.stats)
            if self._protocol.transport is not None:
                self._protocol.transport.close()


def _write_stats(stats: dict[str, int]) -> None:
    """Commands per write and per read, for run.py (``OVERHEAD_STATS``: a file to write)."""
    target = os.environ.get("OVERHEAD_STATS")
    if target:
        Path(target).write_text(json.dumps(stats))


def redispy_store(url: str, prefix: str) -> Any:
    """OncePay's ``RedisStore`` on redis-py, configured as the store configured it."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )
    return _swap(url, prefix, client)


def pipelined_store(url: str, prefix: str) -> Any:
    """OncePay's ``RedisStore`` with its redis-py client swapped for :class:`PipelinedCommands`.

    The store, its Lua scripts, argument encoding and reply decoding are OncePay's own; only the
    driver differs. (The client the store made is closed unused.)
    """
    return _swap(url, prefix, PipelinedCommands(url))


def _swap(url: str, prefix: str, commands: Any) -> Any:
    """The store as ``RedisStore.from_url`` makes it, on ``commands`` instead of its client
    (the seam is the store's ``_Commands`` protocol: ``execute_command`` and ``aclose``)."""
    from oncepay.idempotency.stores.redis import RedisStore

    store = RedisStore.from_url(url, prefix=prefix)
    original = store._commands
    store._commands = commands

    close = store.aclose

    async def aclose() -> None:
        await close()
        await original.aclose()

    store.aclose = aclose  # type: ignore[method-assign]
    return store
