"""``@idempotent`` on sync and async functions, and on a real RabbitMQ consumer."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from oncepay.errors import ConfigurationError, IdempotencyKeyReused, RequestInProgress
from oncepay.idempotency.decorator import idempotent
from oncepay.idempotency.stores.memory import MemoryStore
from tests.servers import require


@dataclass
class Charge:
    id: str
    amount: int


class Refund(BaseModel):
    id: str
    amount: int


async def test_an_async_function_runs_once_per_key_and_replays_its_dataclass() -> None:
    calls: list[int] = []

    @idempotent(MemoryStore(), key="request_id")
    async def charge(request_id: str, amount: int) -> Charge:
        calls.append(amount)
        return Charge(id=f"ch_{len(calls)}", amount=amount)

    first = await charge("r1", 100)
    again = await charge("r1", amount=100)
    assert first == again == Charge("ch_1", 100)
    assert isinstance(again, Charge)
    assert calls == [100]


async def test_pydantic_results_are_restored_to_their_model() -> None:
    @idempotent(MemoryStore(), key="key")
    async def refund(key: str, amount: int) -> Refund:
        return Refund(id="re_1", amount=amount)

    await refund("k", 5)
    again = await refund("k", 5)
    assert isinstance(again, Refund)
    assert again == Refund(id="re_1", amount=5)


def test_a_sync_function_gets_the_same_guarantee(tmp_path: Path) -> None:
    calls: list[str] = []

    @idempotent(f"sqlite:///{tmp_path / 'keys.db'}", key=lambda order, **_: order["id"])
    def ship(order: dict[str, Any], express: bool = False) -> dict[str, Any]:
        calls.append(order["id"])
        return {"shipped": order["id"], "express": express}

    assert ship({"id": "o1"}) == ship({"id": "o1"}) == {"shipped": "o1", "express": False}
    assert calls == ["o1"]
    with pytest.raises(IdempotencyKeyReused):
        ship({"id": "o1"}, express=True)


async def test_the_same_key_with_other_arguments_is_refused() -> None:
    @idempotent(MemoryStore(), key="key")
    async def pay(key: str, amount: int) -> int:
        return amount

    await pay("k", 1)
    with pytest.raises(IdempotencyKeyReused):
        await pay("k", 2)


async def test_an_exception_releases_the_key_so_a_retry_runs() -> None:
    attempts: list[int] = []

    @idempotent(MemoryStore(), key="key")
    async def flaky(key: str) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("downstream hiccup")
        return "done"

    with pytest.raises(ConnectionError):
        await flaky("k")
    assert await flaky("k") == "done"
    assert await flaky("k") == "done"
    assert len(attempts) == 2


async def test_a_call_while_the_first_runs_is_in_progress() -> None:
    entered, leave = asyncio.Event(), asyncio.Event()

    @idempotent(MemoryStore(), key="key")
    async def slow(key: str) -> str:
        entered.set()
        await leave.wait()
        return "done"

    first = asyncio.create_task(slow("k"))
    await entered.wait()
    with pytest.raises(RequestInProgress):
        await slow("k")
    leave.set()
    assert await first == "done"


def test_naming_an_argument_the_function_lacks_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="no argument named 'id'"):

        @idempotent(MemoryStore(), key="id")
        async def f(key: str) -> None: ...


async def test_a_redelivered_rabbitmq_message_is_processed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("RabbitMQ", "127.0.0.1", 5672)
    import aio_pika

    monkeypatch.chdir(tmp_path)  # the example keeps its keys in ./consumer-keys.db
    from examples import rabbitmq_consumer as example

    url = "amqp://guest:guest@127.0.0.1/"
    queue_name = f"oncepay-test-{uuid.uuid4().hex[:8]}"
    order = {"id": "ord_1", "amount": 4200}
    publisher = await aio_pika.connect(url)
    async with publisher:
        channel = await publisher.channel()
        queue = await channel.declare_queue(queue_name, auto_delete=False)
        await channel.default_exchange.publish(
            aio_pika.Message(json.dumps(order).encode(), message_id="msg-1"), routing_key=queue_name
        )

        # Consumer 1 does the work, then 'crashes' before acknowledging: its connection drops.
        crashed = await aio_pika.connect(url)
        crashed_queue = await (await crashed.channel()).get_queue(queue_name)
        first, redelivered = await example.consume_one(crashed_queue, ack=False)
        assert not redelivered
        await crashed.close()

        # RabbitMQ redelivers the message to consumer 2, which acknowledges it.
        survivor = await aio_pika.connect(url)
        async with survivor:
            survivor_queue = await (await survivor.channel()).get_queue(queue_name)
            second, redelivered = await example.consume_one(survivor_queue)
            assert redelivered
        await queue.delete(if_unused=False, if_empty=False)
    assert first == second
    assert example.charges == [order]  # charged once, though delivered twice
