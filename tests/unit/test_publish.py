"""The one confirmed publish (ingest/publish.py) over a channel that answers as the broker can.

The same facts against a real broker: tests/e2e/test_publish.py."""

import asyncio

import pytest
from pamqp.commands import Basic

from fakes import FakeChannel
from ingest.errors import PublishFailed, PublishRefused, PublishReturned, PublishTimeout
from ingest.publish import Publisher


def props(mid: str = "m1") -> Basic.Properties:
    return Basic.Properties(message_id=mid, delivery_mode=2)


def publish(channel: FakeChannel, timeout: float = 0.05, mid: str = "m1") -> None:
    asyncio.run(Publisher(channel, timeout).publish(b"{}", "x", "call_hangup", props(mid)))


def test_a_confirmed_publish_returns_and_is_stored():
    channel = FakeChannel("confirm")
    publish(channel)
    assert [(p.exchange, p.routing_key, p.body) for p in channel.published] == [("x", "call_hangup", b"{}")]


@pytest.mark.parametrize("outcome, error, says", [
    ("refuse", PublishRefused, "the broker refused it"),
    ("return", PublishReturned, "no queue is bound for it"),
    ("silent", PublishTimeout, "no confirm within 0.05s"),
    ("closed", PublishFailed, "ChannelInvalidStateError"),  # the channel closed under the publish
])
def test_every_way_a_publish_is_not_stored_is_a_publish_failed_of_its_own_type(outcome, error, says):
    channel = FakeChannel(outcome)
    with pytest.raises(PublishFailed) as caught:
        publish(channel)
    assert type(caught.value) is error
    assert says in str(caught.value) and "x/call_hangup" in str(caught.value)
    assert channel.published == []


def test_a_publish_on_a_channel_already_closed_fails_without_sending():
    channel = FakeChannel("confirm", is_closed=True)
    with pytest.raises(PublishFailed, match="the channel is closed") as caught:
        publish(channel)
    assert type(caught.value) is PublishFailed and channel.published == []


def test_two_publishes_with_one_id_never_overlap_on_a_channel():
    """A return is matched to its publish by message id: the second waits until the first has its answer,
    so a returned copy cannot make the other look stored (or the reverse)."""

    async def main():
        channel = FakeChannel(script=["return", "confirm"])
        publisher = Publisher(channel, 1.0)
        results = await asyncio.gather(publisher.publish(b"a", "x", "k", props("same")),
                                       publisher.publish(b"b", "x", "k", props("same")), return_exceptions=True)
        return channel, results

    channel, results = asyncio.run(main())
    assert isinstance(results[0], PublishReturned)
    assert results[1] is None and [p.body for p in channel.published] == [b"b"]


def test_a_message_without_an_id_is_a_programming_error_not_a_publish():
    with pytest.raises(ValueError, match="message id"):
        asyncio.run(Publisher(FakeChannel(), 1.0).publish(b"{}", "x", "k", Basic.Properties()))
