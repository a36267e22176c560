"""The RESP client under ``RedisStore`` (``oncepay/_drivers/resp.py``), against real servers.

What the store relies on: replies matched to their commands however many tasks share the
connection, log-in and database from the URL, TLS, and failures that are loud and final for the
commands they hit (``StoreUnavailable``) but not for the client, which reconnects on the next
command. Every test runs on redis-servers of its own: they kill connections, pause the server and
change its users, which must never touch the shared server on 6379.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import quote

import hiredis
import pytest
from redis.asyncio import Redis

from oncepay._drivers import resp
from oncepay._drivers.resp import (
    JOIN_AT_MOST,
    Address,
    NoScriptError,
    RespClient,
    ResponseError,
)
from oncepay.errors import StoreUnavailable
from oncepay.idempotency.records import ClaimOutcome, StoredResponse
from oncepay.idempotency.stores.redis import RedisStore
from tests.redis_cluster import running_server
from tests.servers import require_redis, require_tool

pytestmark = pytest.mark.redis

# How long a test waits for something that happens in milliseconds before calling it a hang;
# also the client timeout of tests that must not time out on a loaded machine.
PATIENCE = 10.0
# The client timeout of tests that wait for one to expire: short to keep them quick, yet ample
# for the healthy round trips before it, on a loaded 2-core machine.
SHORT_TIMEOUT = 1.0
# CLIENT PAUSE outlasts any test (it is lifted in a finally), so only the timeout can end a wait.
PAUSE_MS = 60_000


# -- servers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    require_redis()  # the binaries ship with the server
    with running_server() as url:
        yield url


@pytest.fixture
async def client(server_url: str) -> AsyncIterator[RespClient]:
    built = RespClient.from_url(server_url, timeout=PATIENCE)
    try:
        yield built
    finally:
        await built.aclose()


class Admin(Protocol):
    """redis-py on the same server, the test's view from outside the client, seen through the
    one method these tests call on it."""

    async def execute_command(self, *args: Any, **options: Any) -> Any: ...

    async def aclose(self) -> None: ...


@asynccontextmanager
async def admin_of(url: str) -> AsyncIterator[Admin]:
    inspector: Admin = Redis.from_url(url)
    try:
        yield inspector
    finally:
        await inspector.aclose()


@pytest.fixture
async def admin(server_url: str) -> AsyncIterator[Admin]:
    async with admin_of(server_url) as inspector:
        yield inspector


def with_db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


def with_login(url: str, username: str, password: str) -> str:
    login = f"{quote(username, safe='')}:{quote(password, safe='')}@"
    return url.replace("://", f"://{login}", 1)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll a server-side state until it holds (there is no event to await for it)."""
    try:
        async with asyncio.timeout(PATIENCE):
            while not await condition():  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # a local round trip takes ~0.1 ms
    except TimeoutError:
        pytest.fail(f"not within {PATIENCE} s: {what}")


async def client_flags(admin: Admin, client_id: int) -> str | None:
    """The flags CLIENT LIST shows for a connection (``b`` while blocked), None once it is gone."""
    line = (await admin.execute_command("CLIENT", "LIST", "ID", client_id)).decode()
    fields = dict(field.split("=", 1) for field in line.split())
    return fields.get("flags")


def key() -> str:
    return f"resp-test:{uuid.uuid4().hex}"


# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis://cache", Address("cache")),
        ("redis://cache:6380/3", Address("cache", 6380, db=3)),
        ("redis://:s%40cret@cache/0", Address("cache", password="s@cret")),
        ("redis://app:s%3Acret@cache/1", Address("cache", db=1, username="app", password="s:cret")),
        ("rediss://[::1]:6390", Address("::1", 6390, tls=True)),
    ],
)
def test_urls_give_the_address_and_login(url: str, address: Address) -> None:
    assert Address.from_url(url) == address


@pytest.mark.parametrize(
    "url",
    [
        "http://cache:6379",
        "redis://cache:6379/zero",
        "redis://cache:99999",
        "redis://app@cache",  # a username needs a password
        "redis://cache/0?socket_timeout=5",  # an option we would otherwise ignore
    ],
)
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        Address.from_url(url)


def test_the_log_in_is_auth_then_select() -> None:
    assert Address("h").set_up() == []
    assert Address("h", db=2, password="pw").set_up() == [("AUTH", "pw"), ("SELECT", 2)]
    assert Address("h", username="app", password="pw").set_up() == [("AUTH", "app", "pw")]


# -- commands and replies ------------------------------------------------------------------------


async def test_concurrent_commands_share_one_connection_and_each_gets_its_own_reply(
    client: RespClient,
) -> None:
    counter, count = key(), 3000
    # INCR answers with how many ran before it, so each reply says where its command was
    # executed; ECHOs of growing size make replies straddle the socket's reads.
    replies = await asyncio.gather(
        *(client.execute_command("INCR", counter) for _ in range(count)),
        *(client.execute_command("ECHO", b"x" * i) for i in range(0, 30_000, 100)),
        *(client.execute_command("CLIENT", "ID") for _ in range(3)),
    )
    assert replies[:count] == list(range(1, count + 1))
    assert replies[count:-3] == [b"x" * i for i in range(0, 30_000, 100)]
    assert len(set(replies[-3:])) == 1  # one connection carried them all


class CountingTransport:
    """The connection's transport, counting the commands each ``write`` carries, and those
    written while the connection was paused (``connection``: the protocol it serves)."""

    def __init__(self, inner: asyncio.Transport, connection: Any = None) -> None:
        self.inner = inner
        self.connection = connection
        self.writes: list[int] = []
        self.written_while_paused = 0

    def write(self, data: bytes) -> None:
        parser, commands = hiredis.Reader(), 0
        parser.feed(data)
        while parser.gets() is not False:  # a command is a RESP array, as a reply can be
            commands += 1
        self.writes.append(commands)
        if self.connection is not None and self.connection.paused:
            self.written_while_paused += commands
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("packed", [False, True], ids=["execute_command", "execute_packed"])
async def test_commands_of_one_loop_iteration_go_out_in_writes_of_at_most_join_at_most(
    client: RespClient, packed: bool
) -> None:
    assert await client.execute_command("PING") == b"PONG"  # connected
    connection = client._connection  # the write pattern is internal: look inside
    assert connection is not None
    counting = CountingTransport(connection._transport)
    connection._transport = counting  # type: ignore[assignment]
    counter, count = key(), 3 * JOIN_AT_MOST + 3

    def send() -> Awaitable[Any]:
        if packed:
            command = hiredis.pack_command(("INCR", counter))  # type: ignore[arg-type]
            return client.execute_packed(command)
        return client.execute_command("INCR", counter)

    # All sent in one go, no await between them: the first goes out alone (nothing in
    # flight), then every full batch at once, before the loop runs anything else ...
    futures = [send() for _ in range(count)]
    assert counting.writes == [1, JOIN_AT_MOST, JOIN_AT_MOST, JOIN_AT_MOST]
    # ... and the rest when the loop iteration ends.
    assert await asyncio.gather(*futures) == list(range(1, count + 1))
    assert counting.writes == [1, JOIN_AT_MOST, JOIN_AT_MOST, JOIN_AT_MOST, 2]


async def test_a_caller_that_gives_up_does_not_shift_the_replies(client: RespClient) -> None:
    abandoned = asyncio.ensure_future(client.execute_command("ECHO", "abandoned"))
    await asyncio.sleep(0)  # sent, not yet answered
    abandoned.cancel()
    assert await client.execute_command("ECHO", "mine") == b"mine"


async def test_bulk_strings_are_binary_safe_and_empty_and_nil_are_kept_apart(
    client: RespClient,
) -> None:
    awkward = bytes(range(256)) + b"\r\n$-1\r\n*2\r\n"  # RESP framing inside the data
    large = os.urandom(3 * 1024 * 1024)  # arrives over many reads
    name = f"{key()}:\x00\r\n".encode()
    await client.execute_command("SET", name + b"1", awkward)
    await client.execute_command("SET", name + b"2", b"")
    await client.execute_command("SET", name + b"3", large)
    replies = await client.execute_command(
        "MGET", name + b"1", name + b"2", b"nothing", name + b"3"
    )
    assert replies == [awkward, b"", None, large]
    assert await client.execute_command("GET", b"nothing") is None
    assert await client.execute_command("HGETALL", b"nothing") == []
    assert await client.execute_command("STRLEN", name + b"3") == len(large)


async def test_error_replies_fail_only_their_own_command(client: RespClient) -> None:
    text = key()
    await client.execute_command("SET", text, "not a list")
    before = await client.execute_command("CLIENT", "ID")
    replies = await asyncio.gather(
        client.execute_command("PING"),
        client.execute_command("LPUSH", text, "x"),
        client.execute_command("EVALSHA", "0" * 40, 0),
        client.execute_command("NO-SUCH-COMMAND"),
        client.execute_command("ECHO", "after"),
        return_exceptions=True,
    )
    pong, wrong_type, no_script, unknown, after = replies
    assert pong == b"PONG"
    assert isinstance(wrong_type, ResponseError)
    assert wrong_type.code == "WRONGTYPE"
    assert isinstance(no_script, NoScriptError)
    assert no_script.code == "NOSCRIPT"
    assert isinstance(unknown, ResponseError)
    assert unknown.code == "ERR"
    assert after == b"after"
    assert await client.execute_command("CLIENT", "ID") == before  # the connection stayed


# -- logging in ----------------------------------------------------------------------------------


async def test_an_acl_user_logs_in_with_its_username_and_password(
    server_url: str, admin: Admin
) -> None:
    user, password = f"oncepay-{uuid.uuid4().hex[:8]}", "p@ss:w/rd?#%"  # escaped in the URL
    await admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "&*", "+@all")
    good = RespClient.from_url(with_login(server_url, user, password), timeout=PATIENCE)
    wrong = RespClient.from_url(with_login(server_url, user, "wrong"), timeout=PATIENCE)
    try:
        assert await good.execute_command("ACL", "WHOAMI") == user.encode()
        with pytest.raises(StoreUnavailable, match="WRONGPASS"):
            await wrong.execute_command("PING")
    finally:
        await good.aclose()
        await wrong.aclose()
        await admin.execute_command("ACL", "DELUSER", user)


async def test_a_password_alone_logs_in_as_the_default_user() -> None:
    with running_server() as url:  # a server of its own: requirepass locks everyone else out
        async with admin_of(url) as admin:
            await admin.execute_command("CONFIG", "SET", "requirepass", "secret")
        logged_in = RespClient.from_url(with_login(url, "", "secret"), timeout=PATIENCE)
        anonymous = RespClient.from_url(url, timeout=PATIENCE)
        try:
            assert await logged_in.execute_command("ACL", "WHOAMI") == b"default"
            with pytest.raises(ResponseError) as refused:
                await anonymous.execute_command("PING")
            assert refused.value.code == "NOAUTH"
        finally:
            await logged_in.aclose()
            await anonymous.aclose()


async def test_the_database_in_the_url_is_selected(server_url: str) -> None:
    name = key()
    client = RespClient.from_url(with_db(server_url, 5), timeout=PATIENCE)
    try:
        await client.execute_command("SET", name, "in db 5")
        assert b" db=5 " in await client.execute_command("CLIENT", "INFO")
    finally:
        await client.aclose()
    async with admin_of(with_db(server_url, 5)) as db5, admin_of(server_url) as db0:
        assert await db5.execute_command("GET", name) == b"in db 5"
        assert await db0.execute_command("GET", name) is None


async def test_a_database_that_does_not_exist_is_store_unavailable(server_url: str) -> None:
    client = RespClient.from_url(with_db(server_url, 999), timeout=PATIENCE)
    try:
        with pytest.raises(StoreUnavailable, match="DB index is out of range"):
            await client.execute_command("PING")
    finally:
        await client.aclose()


# -- losing the connection -----------------------------------------------------------------------


async def test_a_killed_connection_fails_the_commands_in_flight_and_the_next_one_reconnects(
    client: RespClient, admin: Admin
) -> None:
    first = await client.execute_command("CLIENT", "ID")
    # BLPOP holds the connection on the server (and PING behind it) until the kill.
    in_flight = [
        asyncio.ensure_future(client.execute_command("BLPOP", key(), 0)),
        asyncio.ensure_future(client.execute_command("PING")),
    ]

    async def blocked() -> bool:
        return "b" in (await client_flags(admin, first) or "")

    await until(blocked, "the client is blocked in BLPOP")
    await admin.execute_command("CLIENT", "KILL", "ID", first)
    for command in in_flight:
        with pytest.raises(StoreUnavailable, match="connection was lost"):
            await asyncio.wait_for(command, PATIENCE)
    assert await client.execute_command("PING") == b"PONG"  # not retried: the next command
    assert await client.execute_command("CLIENT", "ID") != first  # on a new connection


async def test_a_command_that_times_out_fails_and_its_connection_is_dropped(
    server_url: str, admin: Admin
) -> None:
    client = RespClient.from_url(server_url, timeout=SHORT_TIMEOUT)
    try:
        first = await client.execute_command("CLIENT", "ID")
        await admin.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        try:
            started = time.monotonic()
            stalled = [  # the SET waits for the pause; the PING waits behind it
                asyncio.ensure_future(client.execute_command("SET", key(), "x")),
                asyncio.ensure_future(client.execute_command("PING")),
            ]
            for command in stalled:
                with pytest.raises(StoreUnavailable, match=f"no reply within {SHORT_TIMEOUT:g} s"):
                    await asyncio.wait_for(command, PATIENCE)
            assert time.monotonic() - started < PATIENCE / 2
            await until(lambda: _gone(admin, first), "the stalled connection is closed")
        finally:
            await admin.execute_command("CLIENT", "UNPAUSE")
        assert await client.execute_command("PING") == b"PONG"
        assert await client.execute_command("CLIENT", "ID") != first
    finally:
        await client.aclose()


async def _gone(admin: Admin, client_id: int) -> bool:
    return await client_flags(admin, client_id) is None


async def test_an_unreachable_server_fails_every_caller_with_store_unavailable() -> None:
    client = RespClient.from_url(f"redis://127.0.0.1:{closed_port()}/0", timeout=PATIENCE)
    try:
        results = await asyncio.gather(
            *(client.execute_command("PING") for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(result, StoreUnavailable) for result in results), results
    finally:
        await client.aclose()


async def test_a_closed_client_refuses_commands(client: RespClient) -> None:
    assert await client.execute_command("PING") == b"PONG"
    await client.aclose()
    with pytest.raises(StoreUnavailable, match="closed"):
        await client.execute_command("PING")


# -- a server that stops reading -----------------------------------------------------------------


class StalledServer:
    """A TCP server that accepts, then reads nothing (so the kernel's buffers fill up) until
    ``release()``; from then on it answers +OK to every command, as a server catching up."""

    def __init__(self) -> None:
        self._released = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.commands = 0

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.release()  # the clients are gone by now: each handler reads to the end and quits
        await asyncio.gather(*self._handlers)

    def release(self) -> None:
        self._released.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._released.wait()
            await self._answer(reader, writer)
        except ConnectionError:
            pass  # the client dropped the connection
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = hiredis.Reader()
        while data := await reader.read(1 << 20):
            parser.feed(data)
            while parser.gets() is not False:
                self.commands += 1
                writer.write(b"+OK\r\n")


async def test_commands_wait_while_the_socket_buffer_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transports: list[CountingTransport] = []
    connection_made = resp._Connection.connection_made

    def counted(self: Any, transport: asyncio.BaseTransport) -> None:
        transports.append(CountingTransport(cast(asyncio.Transport, transport), self))
        connection_made(self, transports[-1])  # type: ignore[arg-type]

    monkeypatch.setattr(resp._Connection, "connection_made", counted)
    server = StalledServer()
    async with server as url:
        client = RespClient.from_url(url, timeout=PATIENCE)
        try:
            value = b"v" * (512 * 1024)
            # 16 MiB: more than loopback's kernel buffers take from a server that does not
            # read, so the transport buffers the rest and asks the client to pause.
            flood = [client.execute_command("SET", "k", value) for _ in range(32)]
            sent = [asyncio.ensure_future(command) for command in flood]
            await until(lambda: _paused(client), "the transport asks the client to pause")
            # Paused now (no await since): these must wait for the buffer to drain.
            held = [
                asyncio.ensure_future(client.execute_command("SET", "k", value)) for _ in range(8)
            ]
            await asyncio.sleep(0.05)  # many loop iterations in which they could have written
            # Not a byte written while paused. (The buffer's size is no measure: the kernel's
            # socket buffers grow by themselves, may take what the transport held and resume
            # the client, which then rightly writes what waited.)
            [counting] = transports
            assert sum(counting.writes) > 0
            assert counting.written_while_paused == 0
            server.release()
            replies = await asyncio.wait_for(asyncio.gather(*sent, *held), PATIENCE)
            assert replies == [b"OK"] * 40
            assert server.commands == 40
            assert sum(counting.writes) == 40
            assert counting.written_while_paused == 0
        finally:
            await client.aclose()


async def _paused(client: RespClient) -> bool:
    return client._connection is not None and client._connection.paused


async def test_a_server_that_never_answers_the_log_in_times_out() -> None:
    async with StalledServer() as url:
        client = RespClient.from_url(with_login(url, "", "pw"), timeout=SHORT_TIMEOUT)
        try:
            with pytest.raises(StoreUnavailable, match=r"no (answer|reply)"):
                await asyncio.wait_for(client.execute_command("PING"), PATIENCE)
        finally:
            await client.aclose()


# -- pub/sub -------------------------------------------------------------------------------------


async def test_a_subscriber_reads_confirmations_and_messages_and_never_reconnects(
    client: RespClient, admin: Admin
) -> None:
    subscriber = client.subscriber()
    channel = key().encode()
    try:
        await subscriber.execute_command("SUBSCRIBE", channel)
        assert await subscriber.get_message() == {
            "type": "subscribe",
            "channel": channel,
            "data": 1,
        }
        await admin.execute_command("PUBLISH", channel, b"\x00completed")
        message = await asyncio.wait_for(subscriber.get_message(), PATIENCE)
        assert message == {"type": "message", "channel": channel, "data": b"\x00completed"}
        await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(subscriber.get_message(), PATIENCE)
        with pytest.raises(StoreUnavailable):  # its subscriptions are gone: it stays down
            await subscriber.execute_command("SUBSCRIBE", channel)
        assert await client.execute_command("PING") == b"PONG"  # commands are not affected
    finally:
        await subscriber.aclose()


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A private redis-server that speaks TLS only, with a self-signed certificate for
    localhost; yields its rediss:// URL and the certificate (its own CA)."""
    require_redis()
    require_tool("openssl")  # to make the certificate
    folder = tmp_path_factory.mktemp("tls")
    cert, private_key = folder / "cert.pem", folder / "key.pem"
    make_certificate = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    make_certificate += ["-keyout", str(private_key), "-out", str(cert), "-subj", "/CN=localhost"]
    make_certificate += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    subprocess.run(make_certificate, check=True, capture_output=True)
    port = closed_port()
    serve = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    serve += ["--tls-cert-file", str(cert), "--tls-key-file", str(private_key)]
    serve += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    serve += ["--save", "", "--appendonly", "no", "--dir", str(folder)]
    process = subprocess.Popen(serve, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, process)
        yield f"rediss://localhost:{port}/0", cert
    finally:
        process.terminate()
        process.wait(PATIENCE)


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PATIENCE
    while process.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)  # redis-server starts in milliseconds
    pytest.fail(f"the TLS redis-server did not start on port {port}")


async def test_rediss_verifies_the_server_certificate_against_the_system_cas(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = tls_server
    untrusted = RespClient.from_url(url, timeout=PATIENCE)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the client builds its context
    trusted = RespClient.from_url(url, timeout=PATIENCE)
    try:
        with pytest.raises(StoreUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.execute_command("PING")
        assert await trusted.execute_command("PING") == b"PONG"
    finally:
        await untrusted.aclose()
        await trusted.aclose()


async def test_the_store_claims_and_is_notified_over_tls(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    store = RedisStore.from_url(url, prefix=f"tls-{uuid.uuid4().hex[:8]}:")
    now, response = time.time(), StoredResponse(201, (), b"{}")
    try:
        claim = await store.claim("tenant", "k1", "fp", now=now, lease=30, ttl=600)
        assert claim.outcome is ClaimOutcome.CREATED
        async with store.watch("tenant", "k1") as watch:  # subscribed, over TLS too
            await store.complete("tenant", "k1", claim.record.fence, response, now=now)
            started = time.monotonic()
            await watch.wait(PATIENCE)
            assert time.monotonic() - started < PATIENCE / 2  # woken by the notification
        record = await store.get("tenant", "k1")
        assert record is not None
        assert record.response == response
    finally:
        await store.aclose()
