"""``redis://`` and ``redis+cluster://``: records in Redis, each primitive one Lua script.

    RedisStore.from_url("redis://localhost:6379/0", prefix="oncepay:")
    RedisClusterStore.from_url("redis+cluster://node-1:6379")   # any one node: the seed

Every primitive is one round trip: one EVALSHA of its script, or, when the server has lost its
script cache, one EVAL more. The scripts and the record layout live in ``_redis_scripts``; this
module only runs them, through ``_Commands`` (one command in, one reply out), on one of two
drivers:

* ``RedisStore`` on our own pipelined client, ``oncepay._drivers.resp.RespClient`` (RESP2,
  asyncio.Protocol and hiredis): all commands share one connection, at a fraction of redis-py's
  CPU per command (``bench/drivers/store_redis.py``);
* ``RedisClusterStore`` on redis-py's asyncio cluster client, for now: ``resp`` has no cluster
  routing (slot map, MOVED / ASK redirections, node discovery).

Driver errors become :class:`~oncepay.errors.StoreUnavailable` here, at the boundary, and are
never retried automatically: a claim or a completion whose reply was lost may have run, and
running it again would mislead its caller (a 409 for its own claim, LeaseLost for its own
completion). The caller retries with the same key instead, which fencing makes safe.

**Wait mode.** ``complete`` and ``release`` publish on the record's channel inside their script.
A store reads notifications on one pub/sub connection (one per master node on a cluster, where
they are sharded: SPUBLISH / SSUBSCRIBE), through a :class:`_Listener` whose task wakes one
asyncio event per watch. A watch is subscribed, and the server has confirmed it, before the
engine reads the record again, so a completion cannot slip between that read and the wait.
Anything unexpected on the connection (it drops, an error reply, an unsubscribe we did not ask
for because a slot moved) retires the listener and wakes all its watches, which subscribe
afresh before their callers read again: a lost notification costs a re-read, never a hang.
"""

from __future__ import annotations

import asyncio
import functools
from collections import Counter, defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from oncepay._drivers import resp
from oncepay.errors import ConfigurationError, LeaseLost, StoreUnavailable
from oncepay.idempotency.records import Claim, ClaimOutcome, Record, RecordState, StoredResponse
from oncepay.idempotency.stores._redis_scripts import (
    CLUSTER_SCRIPTS,
    SINGLE_NODE_SCRIPTS,
    Arg,
    Script,
    Scripts,
    checkpoint_args,
    claim_args,
    decode_claim,
    decode_record,
    record_name,
)
from oncepay.idempotency.stores.base import DEFAULT_PURGE_BATCH, Watch

__all__ = ["DEFAULT_PREFIX", "DEFAULT_TIMEOUT", "RedisClusterStore", "RedisStore"]

DEFAULT_PREFIX = "oncepay:"
# Every script is O(1) and runs in microseconds, and the largest reply is one stored response
# (the body limit is 1 MiB by default): a server that has not answered or accepted a connection
# within 2 s is stalled or gone, and the request is better served by a prompt 503 than a hang.
DEFAULT_TIMEOUT = 2.0

# What the drivers raise when a command fails: redis-py's errors, and our client's error
# replies and StoreUnavailable (it raises that one itself, for a lost or stalled connection).
_DRIVER_ERRORS = (RedisError, RedisClusterException, OSError, resp.ResponseError, StoreUnavailable)
# NOSCRIPT, from either driver: the script did not run.
_NO_SCRIPT = (NoScriptError, resp.NoScriptError)

Cleanup = Callable[[], Awaitable[None]]

_CREATED = ClaimOutcome.CREATED
_EXECUTING = RecordState.EXECUTING


class _Commands(Protocol):
    """All the store needs from a driver: one command in, its reply out; and closing."""

    def execute_command(self, *args: Any) -> Awaitable[Any]: ...

    async def aclose(self) -> None: ...


class _PubSubConnection(Protocol):
    """All a listener needs: send a (un)subscribe, read the next message; and closing."""

    async def execute_command(self, *args: Any) -> Any: ...

    async def get_message(self, *, timeout: None) -> Any:
        """The next message, however long it takes (``timeout=None``)."""

    async def aclose(self) -> None: ...


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise
    except _DRIVER_ERRORS as exc:
        raise StoreUnavailable(f"Redis: {exc}") from exc


# -- the primitives --------------------------------------------------------------------------


class _RedisStoreBase:
    """The store protocol on a driver: our RESP client (one node) or redis-py's (a cluster)."""

    def __init__(
        self, commands: _Commands, scripts: Scripts, listeners: _Listeners, *, prefix: str
    ) -> None:
        if "{" in prefix or "}" in prefix:
            # Redis Cluster hashes a key by its first {...}: braces in the prefix would put
            # every record in one slot, on one node.
            raise ConfigurationError(f"the Redis key prefix {prefix!r} must not contain braces")
        self._commands = commands
        self._scripts = scripts
        self._listeners = listeners
        self.prefix = prefix
        # On our RESP client, the short way's two commands are encoded here (see _Packed).
        self._packed = (
            _Packed.of(commands, scripts) if isinstance(commands, resp.RespClient) else None
        )

    async def claim(
        self, scope: str, key: str, fingerprint: str, *, now: float, lease: float, ttl: float
    ) -> Claim:
        # _run, claim_args and decode_claim's usual case spelled out here (and _run in
        # complete), the two scripts of every request: a coroutine less to create and to pass
        # through while the reply is awaited, two calls and an argument list less
        now, lease, ttl = float(now), float(lease), float(ttl)
        name = record_name(self.prefix, scope, key)
        script = self._scripts.claim
        try:
            reply = await self._commands.execute_command(
                "EVALSHA", script.sha, 1, name, scope, key, fingerprint, now, lease, ttl
            )
        except _NO_SCRIPT:
            args = claim_args(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
            reply = await self._eval(script, name, args)
        except StoreUnavailable:
            raise
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        if reply[0] == b"created":  # a new record: every field but the fence is what we sent
            return Claim(
                _CREATED,
                Record(
                    scope, key, fingerprint, _EXECUTING, int(reply[1]), now, now + lease, now + ttl
                ),
            )
        return decode_claim(reply, scope, key, fingerprint, now=now, lease=lease, ttl=ttl)

    async def complete(
        self, scope: str, key: str, fence: int, response: StoredResponse, *, now: float
    ) -> None:
        await self.complete_encoded(
            scope, key, fence, response.status, response.headers_json(), response.body
        )

    async def complete_encoded(
        self, scope: str, key: str, fence: int, status: int, headers_json: str, body: bytes
    ) -> None:
        """:meth:`complete` with the headers already encoded (``StoredResponse.headers_json``):
        the ASGI middleware's fast path keeps the encoding of each header set it has seen."""
        # _fenced, _run and complete_args spelled out (see claim)
        name = record_name(self.prefix, scope, key)
        script = self._scripts.complete
        try:
            done = await self._commands.execute_command(
                "EVALSHA", script.sha, 1, name, str(fence), str(status), headers_json, body
            )
        except _NO_SCRIPT:
            args: list[Arg] = [str(fence), str(status), headers_json, body]
            done = await self._eval(script, name, args)
        except StoreUnavailable:
            raise
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc
        if not done:
            raise LeaseLost(f"token {fence} no longer holds key {key!r}")

    # -- ScriptedStore: the claim's reply, raw, for the ASGI middleware's fast path

    def claim_reply(
        self,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float | str,
        ttl: float | str,
        now_text: bytes | None = None,
    ) -> Awaitable[Any]:
        """What :meth:`claim` sends, its reply undecoded (see ``ScriptedStore``)."""
        packed = self._packed
        if packed is not None and isinstance(lease, str) and isinstance(ttl, str):
            # encoded here, as hiredis would (see _Packed), its fixed parts once; ``now`` as
            # its exact text when the caller has one (the script reads either as one double)
            t = repr(now).encode() if now_text is None else now_text
            k, f = key.encode(), fingerprint.encode()
            return packed.client.execute_packed(
                _CLAIM_FORMAT
                % (
                    packed.claim_head,
                    _name_bulk(self.prefix, scope, key),
                    _bulk(scope),
                    len(k),
                    k,
                    len(f),
                    f,
                    len(t),
                    t,
                    _bulk(lease),
                    _bulk(ttl),
                )
            )
        name = record_name(self.prefix, scope, key)
        return self._commands.execute_command(
            "EVALSHA", self._scripts.claim.sha, 1, name, scope, key, fingerprint, now, lease, ttl
        )

    def complete_reply(
        self, scope: str, key: str, fence: bytes, status: int, headers_json: str, body: bytes
    ) -> Awaitable[Any]:
        """What :meth:`complete_encoded` sends, its reply (1, or 0 for a stale token) not
        checked: the ASGI middleware's short way awaits it directly, a coroutine less per
        request. ``fence`` is the claim reply's text of it. An error from awaiting it goes to
        :meth:`complete_failed`."""
        packed = self._packed
        if packed is None:
            script = self._scripts.complete
            name = record_name(self.prefix, scope, key)
            return self._commands.execute_command(
                "EVALSHA", script.sha, 1, name, fence, str(status), headers_json, body
            )
        return packed.client.execute_packed(
            _COMPLETE_FORMAT
            % (
                packed.complete_head,
                _name_bulk(self.prefix, scope, key),
                len(fence),
                fence,
                _status_bulk(status),
                _bulk(headers_json),
                len(body),
                body,
            )
        )

    async def complete_failed(
        self,
        error: Exception,
        scope: str,
        key: str,
        fence: bytes,
        status: int,
        headers_json: str,
        body: bytes,
    ) -> Any:
        """What :meth:`complete_encoded` does when its command raised ``error``: after
        NOSCRIPT the script goes again with EVAL (its reply returned); a driver error is
        ``StoreUnavailable``; anything else is raised as it is."""
        if isinstance(error, _NO_SCRIPT):
            args: list[Arg] = [fence.decode(), str(status), headers_json, body]
            return await self._eval(
                self._scripts.complete, record_name(self.prefix, scope, key), args
            )
        if isinstance(error, _DRIVER_ERRORS) and not isinstance(error, StoreUnavailable):
            raise StoreUnavailable(f"Redis: {error}") from error
        raise error

    async def claim_failed(
        self,
        error: Exception,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float,
        ttl: float,
    ) -> Claim:
        """What :meth:`claim` does when its command raised ``error``: after NOSCRIPT (nothing
        ran) the script goes again with EVAL; a driver error is ``StoreUnavailable``, never
        retried (the claim may have run); anything else is raised as it is."""
        if isinstance(error, _NO_SCRIPT):
            args = claim_args(scope, key, fingerprint, now=now, lease=lease, ttl=ttl)
            reply = await self._eval(
                self._scripts.claim, record_name(self.prefix, scope, key), args
            )
            return self.claim_from(reply, scope, key, fingerprint, now, lease, ttl)
        if isinstance(error, _DRIVER_ERRORS) and not isinstance(error, StoreUnavailable):
            raise StoreUnavailable(f"Redis: {error}") from error
        raise error

    def claim_from(
        self,
        reply: Any,
        scope: str,
        key: str,
        fingerprint: str,
        now: float,
        lease: float,
        ttl: float,
    ) -> Claim:
        now, lease, ttl = float(now), float(lease), float(ttl)
        return decode_claim(reply, scope, key, fingerprint, now=now, lease=lease, ttl=ttl)

    async def release(self, scope: str, key: str, fence: int, *, now: float) -> None:
        await self._fenced(self._scripts.release, scope, key, fence, [str(fence)])

    async def checkpoint(
        self, scope: str, key: str, fence: int, recovery_point: str, *, now: float, lease: float
    ) -> None:
        args = checkpoint_args(fence, recovery_point, now=now, lease=lease)
        await self._fenced(self._scripts.checkpoint, scope, key, fence, args)

    async def get(self, scope: str, key: str) -> Record | None:
        with _store_errors():
            fields = await self._commands.execute_command("HGETALL", self.record_name(scope, key))
        return decode_record(fields)

    async def purge_expired(self, *, now: float, limit: int = DEFAULT_PURGE_BATCH) -> int:
        """Nothing to do: Redis deletes each record at its TTL by itself (PEXPIRE), and the
        claim script treats one past ``expires_at`` on the engine's clock as gone already."""
        return 0

    def watch(self, scope: str, key: str) -> AbstractAsyncContextManager[Watch]:
        return self._listeners.watch(self.record_name(scope, key).encode())

    async def aclose(self) -> None:
        await self._listeners.close()
        with suppress(*_DRIVER_ERRORS):
            await self._commands.aclose()

    def record_name(self, scope: str, key: str) -> str:
        """The record's hash, which is also its notification channel."""
        return record_name(self.prefix, scope, key)

    async def _fenced(
        self, script: Script, scope: str, key: str, fence: int, args: Sequence[Arg]
    ) -> None:
        if not await self._run(script, scope, key, args):
            raise LeaseLost(f"token {fence} no longer holds key {key!r}")

    async def _run(self, script: Script, scope: str, key: str, args: Sequence[Arg]) -> Any:
        # Hot path (every claim and completion): the error mapping of _store_errors, spelled
        # out, as a generator-based context manager costs more than the command's encoding.
        name = record_name(self.prefix, scope, key)
        try:
            return await self._commands.execute_command("EVALSHA", script.sha, 1, name, *args)
        except _NO_SCRIPT:
            return await self._eval(script, name, args)
        except StoreUnavailable:
            raise
        except _DRIVER_ERRORS as exc:
            raise StoreUnavailable(f"Redis: {exc}") from exc

    async def _eval(self, script: Script, name: str, args: Sequence[Arg]) -> Any:
        """After NOSCRIPT, which means nothing ran: the server lost its script cache (a
        restart, a failover, SCRIPT FLUSH). EVAL runs the script and caches it again."""
        with _store_errors():
            return await self._commands.execute_command("EVAL", script.source, 1, name, *args)


# -- the short way's commands, encoded here ---------------------------------------------------
#
# hiredis' encoder writes each argument's length with sprintf (~10 calls a claim), and a float
# as its repr(). The ASGI middleware's two commands a request are encoded here instead, byte for
# byte as hiredis would (strings as UTF-8; tests/http/test_asgi_redis.py): the head (EVALSHA, the
# script's SHA-1, one key) once per store, the texts that repeat (scope, lease, TTL, status,
# a header set's JSON) once per text, the rest with one bytes format.


@dataclass(frozen=True, slots=True)
class _Packed:
    client: resp.RespClient
    claim_head: bytes
    complete_head: bytes

    @classmethod
    def of(cls, client: resp.RespClient, scripts: Scripts) -> _Packed:
        return cls(client, _evalsha(scripts.claim, 7), _evalsha(scripts.complete, 5))


def _evalsha(script: Script, arguments: int) -> bytes:
    """``EVALSHA <sha> 1`` as the head of a RESP array of ``arguments`` more bulk strings."""
    sha = script.sha.encode()
    return b"*%d\r\n$7\r\nEVALSHA\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (arguments + 3, len(sha), sha)


@functools.lru_cache(maxsize=512)
def _bulk(text: str) -> bytes:
    """A text that repeats (a scope, a lease, a status, a header set) as a RESP bulk string."""
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


@functools.lru_cache(maxsize=64)
def _status_bulk(status: int) -> bytes:
    return _bulk(str(status))


# A request's record is named twice (claim, then completion): as the bulk string sent, its
# SHA-256 and encoding done once. 1024 covers the claims in flight between a claim and its
# completion on a busy process (record_name's reason); an evicted name is only computed again.
@functools.lru_cache(maxsize=1024)
def _name_bulk(prefix: str, scope: str, key: str) -> bytes:
    """The record's name (``record_name``) as a RESP bulk string."""
    name = _record_name(prefix, scope, key).encode()
    return b"$%d\r\n%s\r\n" % (len(name), name)


_record_name = record_name.__wrapped__  # not through record_name's cache: _name_bulk's is used

_CLAIM_FORMAT = b"%s%s%s$%d\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n%s%s"
_COMPLETE_FORMAT = b"%s%s$%d\r\n%s\r\n%s%s$%d\r\n%s\r\n"


# -- the stores --------------------------------------------------------------------------------


def _checked(timeout: float) -> float:
    if timeout <= 0:
        raise ConfigurationError(f"the Redis timeout must be > 0 seconds, not {timeout}")
    return timeout


def _client_options(timeout: float) -> dict[str, Any]:
    """redis-py's options for the cluster client: our timeout, and no retries."""
    timeout = _checked(timeout)
    return {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": _no_retry()}


def _no_retry() -> Retry:
    """No automatic retries: see the module docstring. On a pub/sub connection a silent
    reconnect would also drop every subscription without telling the listener."""
    return Retry(NoBackoff(), 0)


class RedisStore(_RedisStoreBase):
    """``redis://`` / ``rediss://``: one Redis server (or whatever proxy stands for one).

    Commands share one pipelined connection; wait mode adds one pub/sub connection. ``timeout``
    bounds connecting (with AUTH and SELECT) and each command's reply.
    """

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT
    ) -> RedisStore:
        try:
            client = resp.RespClient.from_url(url, timeout=_checked(timeout))
        except ValueError as exc:
            raise ConfigurationError(f"bad Redis URL {url!r}: {exc}") from exc
        listeners = _Listeners(
            route=_one_route,
            connect=lambda _route: (client.subscriber(), None),
            flavour=_PLAIN,
            timeout=timeout,
        )
        return cls(client, SINGLE_NODE_SCRIPTS, listeners, prefix=prefix)


class RedisClusterStore(_RedisStoreBase):
    """``redis+cluster://host:port``: a Redis Cluster, found from one seed node.

    Each record hashes to a slot of its own (the digest is its hash tag), so records spread over
    the masters and each script touches one slot. Notifications are sharded pub/sub. It runs on
    redis-py's cluster client: ``resp`` has no cluster routing (slot map, MOVED / ASK) yet.
    """

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT
    ) -> RedisClusterStore:
        try:
            client = RedisCluster.from_url(_seed_url(url), **_client_options(timeout))
        except (ValueError, RedisClusterException) as exc:
            raise ConfigurationError(f"bad Redis Cluster URL {url!r}: {exc}") from exc

        async def route(channel: bytes) -> str:
            return await _owner_of(client, channel)

        listeners = _Listeners(
            route=route,
            connect=lambda node_name: _node_pubsub(client, node_name),
            flavour=_SHARDED,
            timeout=timeout,
        )
        return cls(_MappedCluster(client), CLUSTER_SCRIPTS, listeners, prefix=prefix)


class _MappedCluster:
    """The cluster client, made to load its slot map before it sends any command.

    redis-py sends a command issued before the map is loaded to a random node; the MOVED
    replies that follow make it drop every connection, in-flight commands included (seen with
    50 concurrent first claims). ``initialize()`` is a no-op once the map is loaded, and it
    serialises concurrent first callers (and reloads after the client dropped its connections).
    """

    def __init__(self, client: RedisCluster) -> None:
        self._client = client
        self._commands: _Commands = client

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        await self._client.initialize()
        return await self._commands.execute_command(*args, **options)

    async def aclose(self) -> None:
        await self._commands.aclose()


def _seed_url(url: str) -> str:
    """``redis+cluster://`` → ``redis://`` (and ``rediss+cluster://`` → ``rediss://``)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in {"redis+cluster", "rediss+cluster"}:
        raise ConfigurationError(f"a Redis Cluster URL starts with redis+cluster://, not {url!r}")
    return urlunsplit(parts._replace(scheme=scheme.removesuffix("+cluster")))


async def _one_route(channel: bytes) -> str:
    return ""


async def _owner_of(client: RedisCluster, channel: bytes) -> str:
    """The name of the master that owns the channel's slot, as the client knows it now."""
    with _store_errors():
        await client.initialize()  # a no-op once the slot map is loaded
        node = client.get_node_from_key(channel.decode())
    if node is None:
        raise StoreUnavailable(f"no Redis Cluster node serves channel {channel!r}")
    return node.name


def _node_pubsub(client: RedisCluster, node_name: str) -> tuple[_PubSubConnection, Cleanup | None]:
    """A plain pub/sub connection to one node, made like the cluster client's own."""
    node = client.get_node(node_name=node_name)
    if node is None:
        raise StoreUnavailable(f"Redis Cluster node {node_name} has gone")
    options = {**node.connection_kwargs, "retry": _no_retry()}
    pool = ConnectionPool(connection_class=node.connection_class, **options)
    return PubSub(pool), pool.disconnect


# -- wait mode: pub/sub ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Flavour:
    """The commands and message types of plain or sharded pub/sub."""

    subscribe: str
    unsubscribe: str
    subscribed: str
    message: str
    unsubscribed: str


_PLAIN = _Flavour("SUBSCRIBE", "UNSUBSCRIBE", "subscribe", "message", "unsubscribe")
_SHARDED = _Flavour("SSUBSCRIBE", "SUNSUBSCRIBE", "ssubscribe", "smessage", "sunsubscribe")


class _Listener:
    """One pub/sub connection: who watches each channel, and the task that reads it.

    The server does not count subscriptions, so the listener counts watchers: SUBSCRIBE when the
    first arrives, UNSUBSCRIBE when the last leaves, decided and sent under one lock so the
    server's state is always that of the last command sent. Replies come back in order, so each
    channel's confirmations are matched first-in, first-out.
    """

    def __init__(
        self,
        pubsub: _PubSubConnection,
        flavour: _Flavour,
        *,
        timeout: float,
        cleanup: Cleanup | None,
    ) -> None:
        self._pubsub = pubsub
        self._flavour = flavour
        self._timeout = timeout
        self._cleanup = cleanup
        self._watchers: dict[bytes, set[asyncio.Event]] = {}
        self._subscribed: dict[bytes, asyncio.Future[bool]] = {}  # confirmed → True, lost → False
        self._confirmations: defaultdict[bytes, deque[asyncio.Future[bool]]] = defaultdict(deque)
        self._unsubscribing: Counter[bytes] = Counter()
        self._lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._unsubscribes: set[asyncio.Task[None]] = set()
        self._shutdown: asyncio.Task[None] | None = None
        self.alive = True

    async def join(self, channel: bytes, event: asyncio.Event) -> None:
        """Set ``event`` on every message to ``channel`` from the moment this returns."""
        self._watchers.setdefault(channel, set()).add(event)
        try:
            async with asyncio.timeout(self._timeout):
                await self._reconcile(channel)
                confirmed = await asyncio.shield(self._confirmation(channel))
        except TimeoutError as exc:
            self._retire()
            raise StoreUnavailable("Redis did not confirm a subscription in time") from exc
        if not confirmed:
            raise StoreUnavailable("the Redis pub/sub connection was lost")

    def leave(self, channel: bytes, event: asyncio.Event) -> None:
        watchers = self._watchers.get(channel)
        if watchers is None:
            return
        watchers.discard(event)
        if watchers:
            return
        del self._watchers[channel]
        if self.alive:  # unsubscribing must not hold up the request that leaves
            task = asyncio.get_running_loop().create_task(self._unsubscribe(channel))
            self._unsubscribes.add(task)
            task.add_done_callback(self._unsubscribes.discard)

    async def close(self) -> None:
        self._retire()
        assert self._shutdown is not None
        await self._shutdown

    @property
    def closed(self) -> bool:
        return self._shutdown is not None and self._shutdown.done()

    def _confirmation(self, channel: bytes) -> asyncio.Future[bool]:
        confirmation = self._subscribed.get(channel)
        if confirmation is None:  # retired meanwhile
            confirmation = asyncio.get_running_loop().create_future()
            confirmation.set_result(False)
        return confirmation

    async def _unsubscribe(self, channel: bytes) -> None:
        with suppress(StoreUnavailable):  # the listener is retired then: nothing left to undo
            await self._reconcile(channel)

    async def _reconcile(self, channel: bytes) -> None:
        """Subscribe or unsubscribe so that the server matches whether anyone still watches."""
        async with self._lock:
            wanted, held = channel in self._watchers, channel in self._subscribed
            if not self.alive or wanted == held:
                return
            if wanted:
                confirmation = asyncio.get_running_loop().create_future()
                self._subscribed[channel] = confirmation
                self._confirmations[channel].append(confirmation)
                await self._send(self._flavour.subscribe, channel)
            else:
                del self._subscribed[channel]
                self._unsubscribing[channel] += 1
                await self._send(self._flavour.unsubscribe, channel)

    async def _send(self, command: str, channel: bytes) -> None:
        try:
            await self._pubsub.execute_command(command, channel)
        except StoreUnavailable:
            self._retire()
            raise
        except _DRIVER_ERRORS as exc:
            self._retire()
            raise StoreUnavailable(f"Redis pub/sub: {exc}") from exc
        except BaseException:
            self._retire()  # interrupted mid-write: what the server got is unknown
            raise
        if self._reader is None:  # the first command opened the connection: start reading it
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        with suppress(*_DRIVER_ERRORS):  # a lost connection ends the listener, nothing more
            expected = True
            while expected:
                expected = self._dispatch(await self._pubsub.get_message(timeout=None))
        self._retire()

    def _dispatch(self, message: dict[str, Any] | None) -> bool:
        """Act on one message; False for a surprise, which retires the listener."""
        if message is None:
            return True
        kind, channel = message["type"], message["channel"]
        if kind == self._flavour.message:
            for event in self._watchers.get(channel, ()):
                event.set()
            return True
        if kind == self._flavour.subscribed:
            return self._confirm(channel)
        if kind == self._flavour.unsubscribed:
            return self._unsubscribed(channel)
        return True

    def _confirm(self, channel: bytes) -> bool:
        pending = self._confirmations.get(channel)
        if not pending:
            return False
        confirmation = pending.popleft()
        if not pending:
            del self._confirmations[channel]
        if not confirmation.done():
            confirmation.set_result(True)
        return True

    def _unsubscribed(self, channel: bytes) -> bool:
        if not self._unsubscribing[channel]:
            return False  # the server dropped the channel (its slot moved): re-subscribe
        self._unsubscribing[channel] -= 1
        if not self._unsubscribing[channel]:
            del self._unsubscribing[channel]
        return True

    def _retire(self) -> None:
        """Stop trusting this connection: wake every watcher, fail pending subscriptions."""
        if not self.alive:
            return
        self.alive = False
        for confirmation in chain(self._subscribed.values(), *self._confirmations.values()):
            if not confirmation.done():
                confirmation.set_result(False)
        for watchers in self._watchers.values():
            for event in watchers:
                event.set()
        self._shutdown = asyncio.get_running_loop().create_task(self._close_connection())

    async def _close_connection(self) -> None:
        tasks = [*self._unsubscribes, *([self._reader] if self._reader else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with suppress(*_DRIVER_ERRORS):
            await self._pubsub.aclose()
            if self._cleanup is not None:
                await self._cleanup()


class _Listeners:
    """A store's listeners by route: one for a single node, one per master on a cluster."""

    def __init__(
        self,
        *,
        route: Callable[[bytes], Awaitable[str]],
        connect: Callable[[str], tuple[_PubSubConnection, Cleanup | None]],
        flavour: _Flavour,
        timeout: float,
    ) -> None:
        self._route = route
        self._connect = connect
        self._flavour = flavour
        self._timeout = timeout
        self._current: dict[str, _Listener] = {}
        self._retired: list[_Listener] = []
        self._closed = False

    @asynccontextmanager
    async def watch(self, channel: bytes) -> AsyncIterator[Watch]:
        watch = _PubSubWatch(self, channel)
        try:
            await watch.join()
            yield watch
        finally:
            watch.leave()

    async def listener_for(self, channel: bytes) -> _Listener:
        route = await self._route(channel)
        if self._closed:  # a watch woken by the store closing must not reconnect
            raise StoreUnavailable("the Redis store is closed")
        listener = self._current.get(route)
        if listener is None or not listener.alive:
            if listener is not None:  # it is shutting down; close() waits for the rest
                self._retired = [old for old in self._retired if not old.closed] + [listener]
            pubsub, cleanup = self._connect(route)
            listener = _Listener(pubsub, self._flavour, timeout=self._timeout, cleanup=cleanup)
            self._current[route] = listener
        return listener

    async def close(self) -> None:
        self._closed = True
        listeners = [*self._current.values(), *self._retired]
        self._current.clear()
        self._retired.clear()
        await asyncio.gather(*(listener.close() for listener in listeners))


class _PubSubWatch:
    """A watch on one record's channel, through whichever listener serves that channel now."""

    def __init__(self, listeners: _Listeners, channel: bytes) -> None:
        self._listeners = listeners
        self._channel = channel
        self._event = asyncio.Event()
        self._listener: _Listener | None = None

    async def join(self) -> None:
        self._listener = await self._listeners.listener_for(self._channel)
        await self._listener.join(self._channel, self._event)

    def leave(self) -> None:
        if self._listener is not None:
            self._listener.leave(self._channel, self._event)

    async def wait(self, timeout: float) -> None:
        if self._listening():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout)
            self._event.clear()
        if not self._listening():
            # The listener was retired while we waited, so a notification may be lost:
            # subscribe afresh before the caller reads the record again.
            self.leave()
            await self.join()

    def _listening(self) -> bool:
        return self._listener is not None and self._listener.alive
