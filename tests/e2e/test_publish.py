"""The one confirmed publish (ingest/publish.py) against a real broker: a returned message is never
taken for a stored one, whatever else is in flight on the channel."""

import asyncio

import aio_pika
import pytest
from pamqp.commands import Basic

from ingest.errors import PublishFailed
from ingest.publish import Publisher


def test_a_returned_publish_fails_even_when_a_stored_one_with_the_same_id_is_in_flight(broker):
    async def main():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue("stored", durable=True)
            publisher = Publisher(await channel.get_underlay_channel(), timeout=5)
            outcomes = []
            for _ in range(20):
                props = [Basic.Properties(message_id="same-id", delivery_mode=2) for _ in range(2)]
                outcomes.append(await asyncio.gather(
                    publisher.publish(b"nowhere", "", "no-such-queue", props[0]),
                    publisher.publish(b"kept", "", "stored", props[1]),
                    return_exceptions=True))
            return outcomes

    for returned, stored in asyncio.run(main()):
        assert isinstance(returned, PublishFailed) and "returned" in str(returned)
        assert stored is None
    assert broker.count("stored") == 20


def test_a_publish_on_a_closed_channel_fails_at_once_and_says_so(broker):
    async def main():
        connection = await aio_pika.connect(broker.url)
        channel = await connection.channel(publisher_confirms=True)
        publisher = Publisher(await channel.get_underlay_channel(), timeout=5)
        await connection.close()
        with pytest.raises(PublishFailed, match="channel is closed"):
            await publisher.publish(b"x", "", "q", Basic.Properties(message_id="m"))

    asyncio.run(main())
