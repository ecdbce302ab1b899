"""Stand-ins for aiormq's channel in the unit tier: the code under test runs unchanged on top of them.

They record every frame the code sends, and answer a publish the way the broker can: confirm (ack),
refuse (nack), return it (no queue), never answer (the publish times out), or be closed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader

OUTCOMES = ("confirm", "refuse", "return", "silent", "closed")


@dataclass
class Published:
    body: bytes
    exchange: str
    routing_key: str
    properties: Basic.Properties


@dataclass
class FakeChannel:
    """Answers each publish with `outcome` (or, while `script` has items, with the next of those)."""

    outcome: str = "confirm"
    script: list[str] = field(default_factory=list)
    is_closed: bool = False
    published: list[Published] = field(default_factory=list)  # what the broker would have stored
    frames: list[tuple[str, Any, bool]] = field(default_factory=list)  # ("ack"|"nack", tag, multiple/requeue)

    async def basic_publish(self, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties,
                            mandatory: bool, wait: bool) -> Any:
        assert mandatory, "every publish is mandatory: an unroutable message must come back, not vanish"
        outcome = self.script.pop(0) if self.script else self.outcome
        await asyncio.sleep(0)  # the answer comes later, as from the broker
        if outcome == "confirm":
            self.published.append(Published(body, exchange, routing_key, properties))
            return Basic.Ack()
        if outcome == "refuse":
            return Basic.Nack()
        if outcome == "return":
            returned = DeliveredMessage(Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange=exchange,
                                                     routing_key=routing_key), ContentHeader(properties=properties),
                                        body, None)
            raise aiormq.exceptions.PublishError(returned, Basic.Ack())
        if outcome == "silent":
            await asyncio.Event().wait()
        if outcome == "closed":
            self.is_closed = True
            raise aiormq.exceptions.ChannelInvalidStateError("writer is None")
        raise AssertionError(f"unknown outcome {outcome!r}; one of {OUTCOMES}")

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        await asyncio.sleep(0)  # the frame reaches the connection a step later, as in aiormq
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True, wait: bool = True) -> None:
        for _ in range(3):  # slower than an ack: the case where an ack written later could overtake it
            await asyncio.sleep(0)
        self.frames.append(("nack", tag, requeue))


def delivered(body: bytes, properties: Basic.Properties, tag: int = 1) -> DeliveredMessage:
    """A message as a consumer receives it (a dead letter read by a sweep, say)."""
    return DeliveredMessage(Basic.Deliver(consumer_tag="t", delivery_tag=tag, exchange="", routing_key="q"),
                            ContentHeader(properties=properties), body, None)
