"""Acks for one consumer channel: many with one frame where that is safe.

Handlers finish in any order. A basic.ack per message costs a frame and a socket write each; one
basic.ack(multiple=True) settles every unacked delivery on the channel up to its tag. It may only
cover deliveries that are finished (handled, or their replacement confirmed by the broker). So once
per turn of the event loop, the run of finished deliveries from the oldest open one is acked with one
frame, and each finished delivery behind one still running is acked on its own: a slow handler
neither gets acked early nor holds back the acks (and so the prefetch) of the ones after it.
"""

from __future__ import annotations

import asyncio

import aiormq

SETTLE_TIMEOUT = 2.0  # seconds to hand the last acks to the connection at shutdown


class Acks:
    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._open: dict[int, bool] = {}  # delivery tag -> finished, in delivery order
        self._flushing = False
        self._writes: set[asyncio.Task] = set()

    def received(self, tag: int) -> None:
        """Called first thing for every delivery on the channel, so a multiple ack never covers one
        it does not know about."""
        self._open[tag] = False

    def ack(self, tag: int) -> bool:
        """Settle the delivery (soon, with others). False when the channel is gone: the broker
        redelivers it."""
        if self.channel.is_closed:
            return False
        self._open[tag] = True
        self._schedule()
        return True

    async def requeue(self, tag: int) -> None:
        """basic.nack(requeue) for one delivery. It stays open (holding back later acks) until the
        nack is queued on the connection, so no multiple ack can overtake it."""
        try:
            await self.channel.basic_nack(tag, requeue=True, wait=False)
        finally:
            self._open.pop(tag, None)
        self._schedule()

    def _schedule(self) -> None:
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self.channel.is_closed:
            return
        run: list[int] = []  # finished, from the oldest open delivery on: one multiple ack
        behind: list[int] = []  # finished, behind one still running: an ack each
        blocked = False
        for tag, finished in self._open.items():
            if not finished:
                blocked = True
            elif blocked:
                behind.append(tag)
            else:
                run.append(tag)
        if not run and not behind:
            return
        for tag in run + behind:
            del self._open[tag]
        write = asyncio.ensure_future(self._send(run[-1] if run else None, len(run) > 1, behind))
        self._writes.add(write)
        write.add_done_callback(self._written)

    async def _send(self, upto: int | None, multiple: bool, singles: list[int]) -> None:
        if upto is not None:
            await self.channel.basic_ack(upto, multiple=multiple, wait=False)
        for tag in singles:
            await self.channel.basic_ack(tag, wait=False)

    def _written(self, write: asyncio.Task) -> None:
        self._writes.discard(write)
        if not write.cancelled():
            write.exception()  # a closed channel: the broker redelivers what it had not got acks for

    async def settle(self) -> None:
        """At shutdown: send what is finished now and wait (bounded) until it is on the connection."""
        self._flush()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=SETTLE_TIMEOUT)
