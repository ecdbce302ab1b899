"""Ceiling: a raw aiormq consumer, prefetch 200, one basic.ack per message.

    python bench/baselines/raw_consumer.py AMQP_URL QUEUE
"""

import asyncio
import sys

import aiormq

from handlers import count  # bench/handlers.py: marks the end of the drain


async def main(url: str, queue: str) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=200)

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        count()
        await channel.basic_ack(message.delivery.delivery_tag)

    await channel.basic_consume(queue, on_message)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
