"""Baseline: a FastStream no-op subscriber on the same queue (declared passively, as it exists).

    python bench/baselines/faststream_consumer.py AMQP_URL QUEUE
"""

import sys

from faststream import FastStream
from faststream.rabbit import RabbitBroker, RabbitQueue

from handlers import count  # bench/handlers.py: marks the end of the drain

broker = RabbitBroker(sys.argv[1], logger=None)
app = FastStream(broker, logger=None)


@broker.subscriber(RabbitQueue(sys.argv[2], declare=False))
async def handle(body: dict) -> None:  # the JSON body, parsed by FastStream (bytes would fail validation)
    count()


if __name__ == "__main__":
    import asyncio

    asyncio.run(app.run())
