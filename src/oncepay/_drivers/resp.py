"""RESP2 over asyncio: the small Redis client under the single-node ``RedisStore``.

    client = RespClient.from_url("rediss://app:secret@cache:6380/2", timeout=2.0)
    reply = await client.execute_command("EVALSHA", sha, 1, name, *args)
    subscriber = client.subscriber()  # pub/sub, on a connection of its own
    await client.aclose()

Why our own: redis-py spends 54-94 µs of client CPU on each EVALSHA (a pool checkout, a Task per
timed read, a retry wrapper), about 40 % of a request through the middleware. On this client a
whole replayed claim costs the store 18-50 µs instead of 66-115 µs, a claim and its completion
25-70 µs instead of 130-250 µs (``bench/drivers/store_redis.py``, concurrency 32 to 1).

**Commands** share one connection, however many tasks send them. A command goes out at once when
nothing is in flight; otherwise it joins the others sent in the same loop iteration in one write,
at most ``JOIN_AT_MOST`` a write: a full batch goes out at once, so Redis starts on it while the
loop is still running the tasks that send the rest. (Unbounded, the batches fell into lockstep
under load: every task of an iteration sent, then waited while Redis ran the whole batch, the
process idle meanwhile — 12,100-12,900 new keys a second through the middleware at 32
connections against 14,800-16,000 at 8 a write: ``bench/overhead/RESULTS.md``, run O.) Redis answers
in order, so each reply resolves the oldest waiting future (a FIFO). hiredis parses
the replies and encodes the commands. The connection opens on first use, with the AUTH and SELECT
the URL asks for, and when the socket's buffer is full (``pause_writing``) new commands wait
until it drains.

**Failures.** Nothing is retried: a command whose reply was lost may have run.

* A lost connection fails every command waiting on it with ``StoreUnavailable``; the next command
  opens a new connection.
* A command not answered within ``timeout`` fails with ``StoreUnavailable``, and so does every
  command behind it: the connection is dropped, because a late reply would answer the wrong
  command.
* An error reply raises :class:`ResponseError` (:class:`NoScriptError` for ``NOSCRIPT``) in its
  own caller only; the connection stays in use.
* Opening a connection (TCP, TLS, AUTH, SELECT) that fails or takes longer than ``timeout``
  fails, with ``StoreUnavailable``, every command that waited for it; callers share one attempt.

**Pub/sub** runs on a :class:`Subscriber`: a connection of its own on which every reply is a
message, confirmations included. It never reconnects: a new connection has no subscriptions, so
its owner must start a new subscriber and subscribe afresh, knowing that it does.

Not here: RESP3, cluster routing (slot maps, MOVED / ASK: ``RedisClusterStore`` stays on
redis-py), Sentinel, Unix sockets, MULTI / EXEC, and blocking commands (one would hold up every
command behind it on the shared connection).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import hiredis

from oncepay.errors import StoreUnavailable

__all__ = ["Address", "NoScriptError", "RespClient", "ResponseError", "Subscriber"]

DEFAULT_PORT = 6379
# Commands joined into one write at most (see the module's docstring: 4-12 measured alike,
# 16 and more fall back into lockstep at 32 connections).
JOIN_AT_MOST = 8

Arg = str | bytes | int | float

# hiredis' encoder, ~3x faster than building the RESP array in Python (its stub types the
# argument as a 1-tuple, hence the cast).
_pack_command = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)


class ResponseError(Exception):
    """An error reply: the server received the command and refused it."""

    @property
    def code(self) -> str:
        """The reply's first word: ``ERR``, ``WRONGTYPE``, ``NOSCRIPT``, ``WRONGPASS``, …"""
        return str(self).split(" ", 1)[0]


class NoScriptError(ResponseError):
    """``NOSCRIPT``: the server has no script under that SHA-1, so nothing ran."""


def _error_reply(message: str) -> ResponseError:
    kind = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
    return kind(message)


# -- where to connect -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Address:
    """A server and how to log in to it, as a ``redis://`` or ``rediss://`` URL says."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> Address:
        """``redis[s]://[[username]:password@]host[:port][/db]``; ValueError if it is not one."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in {"redis", "rediss"}:
            raise ValueError("a Redis URL starts with redis:// or rediss://")
        if parts.query or parts.fragment:
            raise ValueError(f"unsupported options {parts.query or parts.fragment!r}")
        password = None if parts.password is None else unquote(parts.password)
        username = unquote(parts.username) if parts.username else None
        if username is not None and password is None:
            raise ValueError("a username needs a password (user:password@host)")
        return cls(
            host=parts.hostname or "localhost",
            port=parts.port or DEFAULT_PORT,  # .port raises ValueError for a bad one
            db=_database(parts.path),
            username=username,
            password=password,
            tls=scheme == "rediss",
        )

    def set_up(self) -> list[tuple[Arg, ...]]:
        """The commands that make a new connection ours: log in, then pick the database."""
        commands: list[tuple[Arg, ...]] = []
        if self.password is not None:
            login = (self.username, self.password) if self.username else (self.password,)
            commands.append(("AUTH", *login))  # the ACL form when there is a username
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def _database(path: str) -> int:
    number = path.strip("/") or "0"
    if not number.isdigit():
        raise ValueError(f"the database must be a number, not {number!r}")
    return int(number)


# -- one connection ---------------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One socket: commands written in order, each reply handed to the oldest waiting future."""

    _transport: asyncio.Transport  # set by connection_made, before anyone can send

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._parser = hiredis.Reader(replyError=_error_reply)
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # future, deadline
        self._unsent: list[bytes] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._writers: list[asyncio.Future[None]] = []  # commands held back by pause_writing
        self._closed = self._loop.create_future()
        self.paused = False
        self.broken: str | None = None  # why this connection can no longer be used

    # -- asyncio's callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        parser.feed(data)
        try:
            # RESP2 has no booleans, so hiredis' False can only mean "no whole reply yet".
            while self.broken is None and (reply := parser.gets()) is not False:
                # _deliver spelled out (two replies per request through the middleware)
                waiting = self._waiting
                if not waiting:
                    self._break(f"Redis sent a reply no command asked for: {reply!r:.80}")
                    return
                future = waiting.popleft()[0]
                if future.done():
                    continue  # its caller gave up (cancelled): the reply answers no one
                if isinstance(reply, ResponseError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self._break(f"Redis sent something that is not RESP ({exc})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(f"the connection was lost ({exc or 'closed by the server'})")
        self._closed.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers()

    # -- commands

    def send(self, command: bytes) -> asyncio.Future[Any]:
        """Write one encoded command; the future resolves to its reply."""
        if self.broken is not None:
            raise StoreUnavailable(f"Redis: {self.broken}")
        future = self._loop.create_future()
        # At once when nothing is in flight, else joined to this loop iteration's write (a full
        # batch goes at once): spelled out, this runs for every command
        unsent = self._unsent
        if unsent:
            unsent.append(command)
            if len(unsent) >= JOIN_AT_MOST:
                self._flush()
        elif self._waiting:
            unsent.append(command)
            self._loop.call_soon(self._flush)
        else:
            self._transport.write(command)
        self._waiting.append((future, self._loop.time() + self._timeout))
        if self._watchdog is None:
            self._arm_watchdog()
        return future

    async def writable(self) -> None:
        """Return once the socket's buffer has drained (or the connection broke)."""
        if self.paused and self.broken is None:
            writer = self._loop.create_future()
            self._writers.append(writer)
            await writer

    async def set_up(self, commands: Sequence[tuple[Arg, ...]]) -> None:
        """Run the log-in commands, pipelined; raise the first error among their replies."""
        futures = [self.send(_pack_command(command)) for command in commands]
        for reply in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(reply, BaseException):
                raise reply

    async def aclose(self) -> None:
        self._break("the client closed the connection")
        await self._closed  # the socket is closed once asyncio has called connection_lost

    # -- inside

    def _write(self, data: bytes) -> None:
        """Write now, or after the commands already waiting for this loop iteration's write
        (so that the socket sees every command in the order it was sent)."""
        if self._unsent:
            self._unsent.append(data)
            if len(self._unsent) >= JOIN_AT_MOST:
                self._flush()
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self.broken is None and unsent:
            self._transport.write(b"".join(unsent))

    def _deliver(self, reply: Any) -> None:
        if not self._waiting:
            self._break(f"Redis sent a reply no command asked for: {reply!r:.80}")
            return
        future, _ = self._waiting.popleft()
        if future.done():
            return  # its caller gave up (cancelled): the reply answers no one
        if isinstance(reply, ResponseError):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    def _arm_watchdog(self) -> None:
        """One timer for the oldest command only: deadlines grow along the FIFO, so when the
        oldest is answered in time the timer just moves on to the next (at most once per
        ``timeout``), instead of one timer per command."""
        deadline = self._waiting[0][1]
        self._watchdog = self._loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        if self._loop.time() >= self._waiting[0][1]:
            self._break(f"no reply within {self._timeout:g} s")
        else:
            self._arm_watchdog()

    def _break(self, reason: str) -> None:
        """Stop using this connection: drop the socket (any reply still to come would answer
        the wrong command) and fail everything that waits on it."""
        if self.broken is not None:
            return
        self.broken = reason
        self._transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
        waiting, self._waiting = self._waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(StoreUnavailable(f"Redis: {reason}"))
        self._unsent.clear()
        self.paused = False
        self._wake_writers()

    def _wake_writers(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            if not writer.done():
                writer.set_result(None)


class _SubscribedConnection(_Connection):
    """A connection in subscribe mode: once the first (UN)SUBSCRIBE is out, every reply is a
    message, confirmations included, queued for the one task that reads them."""

    def __init__(self, timeout: float) -> None:
        super().__init__(timeout)
        self._messages: deque[Any] = deque()
        self._arrival: asyncio.Future[None] | None = None
        self._subscribing = False

    def command(self, command: bytes) -> None:
        """Write a (UN)SUBSCRIBE; its confirmation arrives as a message."""
        if self.broken is not None:
            raise StoreUnavailable(f"Redis pub/sub: {self.broken}")
        self._subscribing = True
        self._write(command)

    async def next_message(self) -> Any:
        while not self._messages:
            if self.broken is not None:
                raise StoreUnavailable(f"Redis pub/sub: {self.broken}")
            self._arrival = self._loop.create_future()
            await self._arrival
        return self._messages.popleft()

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        try:
            while self.broken is None and (reply := self._parser.gets()) is not False:
                self._deliver(reply)
        except hiredis.ProtocolError as exc:
            self._break(f"Redis sent something that is not RESP ({exc})")

    def _deliver(self, reply: Any) -> None:
        if not self._subscribing:
            super()._deliver(reply)  # the log-in replies
            return
        self._messages.append(reply)
        self._wake_reader()

    def _break(self, reason: str) -> None:
        super()._break(reason)
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)


# -- opening connections -----------------------------------------------------------------------

_C = TypeVar("_C", bound=_Connection)


class _Dialer:
    """Opens logged-in connections to one address: for the client and for its subscribers."""

    def __init__(self, address: Address, *, timeout: float, tls: ssl.SSLContext | None) -> None:
        self.address = address
        self.timeout = timeout
        self._tls = tls

    async def dial(self, kind: Callable[[float], _C]) -> _C:
        where = f"{self.address.host}:{self.address.port}"
        try:
            async with asyncio.timeout(self.timeout):
                return await self._open(kind)
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise StoreUnavailable(f"Redis at {where}: no answer in {self.timeout:g} s") from exc
        except OSError as exc:  # refused, unreachable, TLS handshake or certificate failures
            raise StoreUnavailable(f"cannot connect to Redis at {where}: {exc}") from exc
        except ResponseError as exc:  # a wrong password, a database that does not exist
            raise StoreUnavailable(f"Redis at {where} refused to log in: {exc}") from exc

    async def _open(self, kind: Callable[[float], _C]) -> _C:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: kind(self.timeout), self.address.host, self.address.port, ssl=self._tls
        )
        try:
            await connection.set_up(self.address.set_up())
        except BaseException:
            await asyncio.shield(connection.aclose())
            raise
        return connection


def _tls_for(address: Address, tls: ssl.SSLContext | None) -> ssl.SSLContext | None:
    if not address.tls:
        return None
    # Verifies the server's certificate and host name against the system's CAs
    # (SSL_CERT_FILE / SSL_CERT_DIR point elsewhere); built once, as loading CAs takes ms.
    return tls if tls is not None else ssl.create_default_context()


# -- the client --------------------------------------------------------------------------------


class RespClient:
    """Commands over one shared, pipelined connection, opened on first use and after a loss."""

    def __init__(
        self, address: Address, *, timeout: float, tls: ssl.SSLContext | None = None
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"the timeout must be > 0 seconds, not {timeout}")
        self._dialer = _Dialer(address, timeout=timeout, tls=_tls_for(address, tls))
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float, tls: ssl.SSLContext | None = None) -> RespClient:
        return cls(Address.from_url(url), timeout=timeout, tls=tls)

    def execute_command(self, *args: Arg) -> Awaitable[Any]:
        """Send one command; await the result for its reply (bytes, int, None or a list).

        On an open connection that takes commands, the command is written (or queued for this
        loop iteration's write) before this returns, and the result is the reply's future: no
        coroutine of ours between the caller and the reply."""
        connection = self._connection
        if connection is None or connection.broken is not None or connection.paused:
            return self._execute_when_ready(args)
        return connection.send(_pack_command(args))

    def execute_packed(self, command: bytes) -> Awaitable[Any]:
        """:meth:`execute_command` for a command already encoded as RESP (an array of bulk
        strings): the Redis store encodes the two commands of every request through the ASGI
        middleware itself, their fixed parts once. ``_Connection.send`` spelled out."""
        connection = self._connection
        if connection is None or connection.broken is not None or connection.paused:
            return self._send_when_ready(command)
        loop = connection._loop
        future = loop.create_future()
        unsent = connection._unsent
        if unsent:
            unsent.append(command)
            if len(unsent) >= JOIN_AT_MOST:
                connection._flush()
        elif connection._waiting:
            unsent.append(command)
            loop.call_soon(connection._flush)
        else:
            connection._transport.write(command)
        connection._waiting.append((future, loop.time() + connection._timeout))
        if connection._watchdog is None:
            connection._arm_watchdog()
        return future

    async def _execute_when_ready(self, args: tuple[Arg, ...]) -> Any:
        return await self._send_when_ready(_pack_command(args))

    async def _send_when_ready(self, command: bytes) -> Any:
        connection = self._connection
        if connection is None or connection.broken is not None:
            connection = await self._reconnect()
        while connection.paused:
            await connection.writable()
        return await connection.send(command)

    def subscriber(self) -> Subscriber:
        """A new pub/sub connection to the same server, opened by its first (UN)SUBSCRIBE."""
        return Subscriber(self._dialer)

    async def aclose(self) -> None:
        """Close the connection; the client cannot be used afterwards."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._connection is not None:
            await self._connection.aclose()

    async def _reconnect(self) -> _Connection:
        if self._closed:
            raise StoreUnavailable("the Redis client is closed")
        if self._connecting is None:  # concurrent callers share one attempt and its outcome
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        # shielded: a caller that gives up must not cancel the connection others wait for
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        try:
            self._connection = await self._dialer.dial(_Connection)
            return self._connection
        finally:
            self._connecting = None


class Subscriber:
    """One pub/sub connection, read by one task: ``execute_command("SUBSCRIBE", channel)``,
    then ``get_message()`` for each confirmation and message, in order.

    It connects on its first command and never again: once the connection is lost, every call
    raises ``StoreUnavailable``. Callers send one command at a time (the listener's lock).
    """

    def __init__(self, dialer: _Dialer) -> None:
        self._dialer = dialer
        self._connection: _SubscribedConnection | None = None
        self._closed = False

    async def execute_command(self, *args: Arg) -> None:
        connection = await self._connected()
        while connection.paused:
            await connection.writable()
        connection.command(_pack_command(args))

    async def get_message(self, *, timeout: None = None) -> dict[str, Any]:
        """The next message, as ``{"type": "message", "channel": b"…", "data": b"…"}``
        (``"subscribe"`` / ``"unsubscribe"`` with the subscription count for confirmations).
        Waits as long as it takes (``timeout`` is always None)."""
        if self._connection is None:
            raise StoreUnavailable("Redis pub/sub: nothing subscribed yet")
        reply = await self._connection.next_message()
        if isinstance(reply, ResponseError):
            raise reply
        if not (isinstance(reply, list) and len(reply) == 3):
            raise StoreUnavailable(f"Redis pub/sub: unexpected reply {reply!r:.80}")
        kind, channel, data = reply
        return {"type": kind.decode(), "channel": channel, "data": data}

    async def aclose(self) -> None:
        self._closed = True
        if self._connection is not None:
            await self._connection.aclose()

    async def _connected(self) -> _SubscribedConnection:
        if self._connection is None:
            if self._closed:
                raise StoreUnavailable("the Redis subscriber is closed")
            self._connection = await self._dialer.dial(_SubscribedConnection)
        return self._connection
