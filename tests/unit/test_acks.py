"""Which ack frames a consumer channel sends, and in which order (workers/acks.py), on a channel that records them."""

import asyncio

from fakes import FakeChannel
from workers.acks import Acks


def run(steps) -> list:
    """`steps(acks)` drives an Acks over a recording channel; the frames it sent, in order."""

    async def main():
        channel = FakeChannel()
        acks = Acks(channel)
        await steps(acks)
        await acks.settle()
        return channel.frames

    return asyncio.run(main())


async def turn():
    for _ in range(3):
        await asyncio.sleep(0)


def test_deliveries_finished_in_order_are_acked_with_one_multiple_frame():
    async def steps(acks):
        for tag in (1, 2, 3, 4):
            acks.received(tag)
        for tag in (1, 2, 3, 4):
            acks.ack(tag)
        await turn()

    assert run(steps) == [("ack", 4, True)]


def test_one_finished_delivery_is_acked_alone_not_as_multiple():
    async def steps(acks):
        acks.received(1)
        acks.ack(1)
        await turn()

    assert run(steps) == [("ack", 1, False)]


def test_a_slow_handler_is_never_covered_and_does_not_hold_back_the_acks_behind_it():
    async def steps(acks):
        for tag in (1, 2, 3, 4):
            acks.received(tag)
        for tag in (1, 3, 4):  # 2 still running
            acks.ack(tag)
        await turn()
        acks.ack(2)
        await turn()

    assert run(steps) == [("ack", 1, False), ("ack", 3, False), ("ack", 4, False), ("ack", 2, False)]


def test_a_requeue_goes_out_before_any_multiple_ack_that_would_cover_it():
    async def steps(acks):
        for tag in (1, 2, 3):
            acks.received(tag)
        acks.ack(1)
        acks.ack(3)
        await acks.requeue(2)
        await turn()

    frames = run(steps)
    nacked_at = frames.index(("nack", 2, True))
    for position, (kind, tag, multiple) in enumerate(frames):
        if kind == "ack" and (tag == 2 or (multiple and tag > 2)):
            assert position > nacked_at, frames  # else it would ack 2, which its handler asked to have back
    acked = set()
    for kind, tag, multiple in frames:
        if kind == "ack":
            acked |= set(range(1, tag + 1)) if multiple else {tag}
    assert {1, 3} <= acked


def test_acks_are_written_once_per_turn_of_the_loop_not_once_per_delivery():
    async def steps(acks):
        for tag in range(1, 101):
            acks.received(tag)
            acks.ack(tag)
        await turn()

    assert run(steps) == [("ack", 100, True)]


def test_on_a_closed_channel_nothing_is_sent_and_the_caller_is_told():
    async def main():
        channel = FakeChannel(is_closed=True)
        acks = Acks(channel)
        acks.received(1)
        told = acks.ack(1)
        await acks.settle()
        return told, channel.frames

    assert asyncio.run(main()) == (False, [])


def test_settle_at_shutdown_sends_what_is_finished_without_waiting_for_a_turn():
    async def main():
        channel = FakeChannel()
        acks = Acks(channel)
        for tag in (1, 2, 3):
            acks.received(tag)
        acks.ack(1)
        acks.ack(2)  # 3 still running at shutdown: the broker redelivers it
        await acks.settle()
        return channel.frames

    assert asyncio.run(main()) == [("ack", 2, True)]
