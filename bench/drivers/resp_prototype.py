"""Minimal asyncio Redis client: asyncio.Protocol + hiredis.Reader.

Benchmark prototype for OncePay's Redis store (see bench/drivers/run.py).

* One TCP connection, shared by any number of concurrent tasks.
* Commands are encoded as RESP2 arrays of bulk strings.
* Replies are matched to requests through a FIFO deque of futures, so
  concurrent callers pipeline naturally: a command sent on an idle connection
  is written at once; commands issued while others are in flight are coalesced
  into one ``transport.write`` per event-loop iteration, and the replies that
  arrive together are resolved in a single ``data_received`` call.
* ``evalsha`` falls back to ``EVAL`` on ``NOSCRIPT`` (the server then caches
  the script, so the next ``EVALSHA`` succeeds).

Deliberately missing (prototype): reconnect, timeouts, write back-pressure,
AUTH/SELECT beyond the connect-time call, RESP3 and cluster redirections.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis

__all__ = ["NoScriptError", "RespClient", "RespError", "Script", "encode_command"]

_NOT_ENOUGH = object()  # hiredis "incomplete reply" sentinel (False is ambiguous)
Arg = bytes | str | int | float


class RespError(Exception):
    """An error reply (``-ERR ...``) from the server."""


class NoScriptError(RespError):
    """``-NOSCRIPT``: the script SHA is not in the server's script cache."""


def _arg(a: Arg) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return repr(a).encode()
    raise TypeError(f"unsupported RESP argument type: {type(a).__name__}")


def encode_command(args: Sequence[Arg]) -> bytes:
    """Encode one command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = _arg(a)
        parts.append(b"$%d\r\n" % len(b))
        parts.append(b)
        parts.append(b"\r\n")
    return b"".join(parts)


class Script:
    """A Lua script identified by its SHA1 (computed locally, no SCRIPT LOAD)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str | bytes) -> None:
        self.source = source.encode() if isinstance(source, str) else source
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


class _RespProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader(notEnoughData=_NOT_ENOUGH)
        self._waiters: deque[asyncio.Future[Any]] = deque()
        self._wbuf: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._closed_exc: BaseException | None = None

    # -- asyncio.Protocol callbacks -------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader, waiters = self._reader, self._waiters
        reader.feed(data)
        while (reply := reader.gets()) is not _NOT_ENOUGH:
            fut = waiters.popleft()
            if fut.done():  # caller was cancelled; reply is simply dropped
                continue
            if isinstance(reply, hiredis.ReplyError):
                msg = str(reply)
                cls = NoScriptError if msg.startswith("NOSCRIPT") else RespError
                fut.set_exception(cls(msg))
            else:
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_exc = exc or ConnectionError("connection closed")
        self._transport = None
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectionError(str(self._closed_exc)))

    # -- request side -------------------------------------------------------
    def send(self, payload: bytes) -> asyncio.Future[Any]:
        if self._transport is None:
            raise ConnectionError(f"not connected: {self._closed_exc}")
        fut = self._loop.create_future()
        idle = not self._waiters
        self._waiters.append(fut)
        if idle and not self._wbuf:  # nothing in flight: write now (lowest latency)
            self._transport.write(payload)
        else:  # busy: coalesce with other commands issued this loop iteration
            if not self._wbuf:
                self._loop.call_soon(self._flush)
            self._wbuf.append(payload)
        return fut

    def _flush(self) -> None:
        buf, self._wbuf = self._wbuf, []
        if self._transport is not None:
            self._transport.write(buf[0] if len(buf) == 1 else b"".join(buf))


class RespClient:
    """``client = await RespClient.connect(host, port)``; then ``await client.execute(...)``."""

    def __init__(self, transport: asyncio.Transport, protocol: _RespProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    @classmethod
    async def connect(
        cls, host: str = "127.0.0.1", port: int = 6379, *, db: int = 0, password: str | None = None
    ) -> RespClient:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_connection(_RespProtocol, host, port)
        client = cls(transport, protocol)  # asyncio sets TCP_NODELAY on TCP sockets
        if password is not None:
            await client.execute("AUTH", password)
        if db:
            await client.execute("SELECT", db)
        return client

    def execute(self, *args: Arg) -> asyncio.Future[Any]:
        """Send one command; the returned future resolves to the decoded reply."""
        return self._protocol.send(encode_command(args))

    def get(self, key: Arg) -> asyncio.Future[Any]:
        return self._protocol.send(encode_command(("GET", key)))

    async def evalsha(
        self, script: Script, keys: Sequence[Arg] = (), args: Sequence[Arg] = ()
    ) -> Any:
        tail = (len(keys), *keys, *args)
        try:
            return await self._protocol.send(encode_command(("EVALSHA", script.sha, *tail)))
        except NoScriptError:
            return await self._protocol.send(encode_command(("EVAL", script.source, *tail)))

    async def close(self) -> None:
        self._transport.close()
        await asyncio.sleep(0)  # let connection_lost run
