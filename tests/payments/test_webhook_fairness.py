"""What one merchant's webhook endpoint can do to the delivery worker: hang, trickle its answer
a byte at a time, or answer with an endless body. A black-box review found that a hanging
endpoint held up every merchant's deliveries (a pass waited for its slowest send), that the
10 s limit was per read (a trickle held an attempt a minute), and that an answer's whole body
was read into memory. Each test drives real HTTP against a receiver on a real socket."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from oncepay.payments.webhooks import delivery
from oncepay.payments.webhooks.delivery import (
    SEND_CONCURRENCY,
    claim_due,
    deliver_due,
    keep_delivering,
)
from tests.payments.stack import Stack, running_stack


@dataclass
class Receiver:
    """An HTTP/1.1 endpoint by hand, so that it can misbehave: ``/fast`` answers at once,
    ``/hang`` waits for ``release``, ``/trickle`` sends a byte every 0.2 s, ``/flood`` an
    endless chunked body."""

    port: int = 0
    handlers: set[asyncio.Task[Any]] = field(default_factory=set)
    arrived: Counter[str] = field(default_factory=Counter)
    came: asyncio.Event = field(default_factory=asyncio.Event)  # set at every arrival
    hanging: int = 0
    most_hanging: int = 0
    flooded: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)  # waited for at the end: none is left to be canceled
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            length = next(
                int(line.split(":", 1)[1])
                for line in head.split("\r\n")
                if line.lower().startswith("content-length:")
            )
            await reader.readexactly(length)
            path = head.split(" ", 2)[1]
            self.arrived[path] += 1
            self.came.set()
            await getattr(self, path.strip("/"))(writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.handlers.discard(task)

    async def until(self, path: str, count: int) -> None:
        while self.arrived[path] < count:
            self.came.clear()
            await self.came.wait()

    async def fast(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def hang(self, writer: asyncio.StreamWriter) -> None:
        self.hanging += 1
        self.most_hanging = max(self.most_hanging, self.hanging)
        try:
            await self.release.wait()
        finally:
            self.hanging -= 1
        await self.fast(writer)

    async def trickle(self, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 60\r\n\r\n")
        for _ in range(60):  # 12 s in all, never 10 s without a byte
            writer.write(b".")
            await writer.drain()
            await asyncio.sleep(0.2)

    async def flood(self, writer: asyncio.StreamWriter) -> None:
        # A fixed send buffer (no autotuning to the system's maximum): what is written past
        # it is what the client read, whatever this machine's tcp_wmem says.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        while self.flooded < 1024 * 65536:  # 64 MiB at most, if nobody hangs up
            writer.write(chunk)
            await writer.drain()
            self.flooded += 65536


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver()
    server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    found.port = server.sockets[0].getsockname()[1]
    async with server:
        yield found
        found.release.set()
        async with asyncio.timeout(5):  # each ends once its client hung up or was answered
            await asyncio.gather(*found.handlers)


PER_ENDPOINT = 3  # webhook_endpoint_concurrency here (5 by default)


@pytest.fixture
async def hooks(payments_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(
        payments_url,
        tmp_path,
        webhook_schedule=[10.0, 20.0],
        webhook_endpoint_concurrency=PER_ENDPOINT,
    ) as stack:
        yield stack


async def subscribe(stack: Stack, receiver: Receiver, path: str) -> str:
    body = {"url": f"http://127.0.0.1:{receiver.port}{path}", "events": ["payment.captured"]}
    response = await stack.post("/v1/webhook_endpoints", body)
    assert response.status_code == 201, response.text
    endpoint_id: str = response.json()["id"]
    return endpoint_id


async def attempt_log(stack: Stack) -> list[dict[str, Any]]:
    events = await stack.client.get("/v1/events", params={"type": "payment.captured"})
    [event] = events.json()["data"]
    [row] = (await stack.client.get(f"/v1/events/{event['id']}/deliveries")).json()["data"]
    detail = (await stack.client.get(f"/v1/webhook_deliveries/{row['id']}")).json()
    log: list[dict[str, Any]] = detail["attempt_log"]
    return log


async def test_a_hanging_endpoint_delays_only_its_own_deliveries(
    hooks: Stack, receiver: Receiver
) -> None:
    await subscribe(hooks, receiver, "/hang")
    await subscribe(hooks, receiver, "/fast")
    payments = SEND_CONCURRENCY + 2  # more deliveries to the hanging endpoint than slots
    for _ in range(payments):
        assert (await hooks.pay()).status_code == 201
    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        worker = asyncio.create_task(keep_delivering(hooks.services, client, stop, interval=0.05))
        try:
            async with asyncio.timeout(8):  # well inside an attempt's 10 s: nothing timed out
                await receiver.until("/fast", payments)
                await receiver.until("/hang", PER_ENDPOINT)
            # Every delivery to the fast endpoint went out while the hanging one held its
            # share of the slots, and no more than that: none of the rest has been sent.
            assert receiver.arrived["/hang"] == PER_ENDPOINT
            assert receiver.hanging == receiver.most_hanging == PER_ENDPOINT
            receiver.release.set()
            async with asyncio.timeout(8):
                await receiver.until("/hang", payments)
        finally:
            stop.set()
            await worker
    assert receiver.most_hanging == PER_ENDPOINT
    assert receiver.arrived == {"/fast": payments, "/hang": payments}


async def test_a_busy_endpoints_deliveries_follow_one_another_at_once(
    hooks: Stack, receiver: Receiver
) -> None:
    # Its share in flight, and the next claimed as soon as one is answered: with a long
    # interval between looks, a worker that waited for it would not be done in minutes.
    await subscribe(hooks, receiver, "/fast")
    payments = 4 * PER_ENDPOINT
    for _ in range(payments):
        await hooks.pay()
    stop = asyncio.Event()
    async with httpx.AsyncClient() as client:
        worker = asyncio.create_task(keep_delivering(hooks.services, client, stop, interval=60))
        try:
            async with asyncio.timeout(20):
                await receiver.until("/fast", payments)
        finally:
            stop.set()
            await worker
    assert receiver.arrived == {"/fast": payments}


async def test_a_claim_takes_a_fair_share_of_one_endpoints_backlog(
    hooks: Stack, receiver: Receiver
) -> None:
    busy = await subscribe(hooks, receiver, "/hang")
    for _ in range(5):
        await hooks.pay()
    quiet = await subscribe(hooks, receiver, "/fast")
    await hooks.pay()  # the quiet endpoint's one delivery is due last
    now = time.time() + 1
    first = await claim_due(hooks.services, now=now, limit=10)
    assert Counter(c.endpoint_id for c in first) == {busy: PER_ENDPOINT, quiet: 1}
    # While those are in flight, the busy endpoint gets no more, whoever claims.
    assert await claim_due(hooks.services, now=now, limit=10) == []


async def test_an_attempt_has_its_time_limit_in_all_not_per_read(
    hooks: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(delivery, "DELIVERY_TIMEOUT", 1.0)  # a byte comes every 0.2 s
    await subscribe(hooks, receiver, "/trickle")
    await hooks.pay()
    async with httpx.AsyncClient() as client:
        report = await deliver_due(hooks.services, client)
    assert dict(report.results) == {"retry": 1}
    [attempt] = await attempt_log(hooks)
    assert attempt["status_code"] is None
    assert attempt["error"] == "no complete answer within 1 s"


async def test_an_endless_answer_is_not_read_past_a_limit(hooks: Stack, receiver: Receiver) -> None:
    await subscribe(hooks, receiver, "/flood")
    await hooks.pay()
    async with httpx.AsyncClient() as client:
        report = await deliver_due(hooks.services, client)
    assert dict(report.results) == {"succeeded": 1}  # its status is all that counts
    [attempt] = await attempt_log(hooks)
    assert attempt["status_code"] == 200
    # The worker hung up after ANSWER_LIMIT: the receiver could write only what the sockets'
    # buffers held beyond it, not its 64 MiB.
    assert receiver.flooded < 8 * 1024 * 1024
