"""An idempotent RabbitMQ consumer: a message redelivered after a crash is processed once.

RabbitMQ delivers at least once: a consumer that dies after doing the work but before it
acknowledges gets the message again. Keying the handler by the message id makes the second
delivery a replay of the first result instead of a second charge.

Run it against a local broker::

    python -m examples.rabbitmq_consumer amqp://guest:guest@127.0.0.1/ orders
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from typing import Any

import aio_pika

from oncepay.idempotency import Engine, store_from_url
from oncepay.idempotency.decorator import idempotent

engine = Engine(store_from_url("sqlite:///consumer-keys.db"))
charges: list[dict[str, Any]] = []  # stands in for the side effect: a charge, an email, …


@dataclass
class Receipt:
    order_id: str
    charged: int


@idempotent(engine, key="message_id", scope="orders")
async def handle(message_id: str, order: dict[str, Any]) -> Receipt:
    charges.append(order)
    return Receipt(order_id=order["id"], charged=order["amount"])


async def consume_one(
    queue: aio_pika.abc.AbstractQueue, *, ack: bool = True
) -> tuple[Receipt, bool]:
    """Take one message, handle it, and acknowledge it (unless told to 'crash' before that).
    Returns the receipt and whether the broker marked the message as redelivered."""
    message = await queue.get(no_ack=False, fail=True, timeout=10)
    assert message is not None
    receipt = await handle(message.message_id or "", json.loads(message.body))
    if ack:
        await message.ack()
    return receipt, bool(message.redelivered)


async def main(url: str, queue_name: str) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True)
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():  # acks only after handle() returned
                    print(await handle(message.message_id or "", json.loads(message.body)))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
