"""The one confirmed publish, used by the ingress, the workers and the dead-letter tools.

A message counts as stored only when the broker acked **its own** publish and did not return it.
Every publish is `mandatory`: a message that no queue takes (not even through the alternate exchange)
comes back as a basic.return instead of vanishing, and every wait is bounded by the timeout, so a dead
connection cannot hold a caller forever.

aiormq matches a basic.return to its publish by message id. Our ids are body hashes, so two publishes
with one id are normal (the same webhook twice, two copies of one dead letter); if both were in flight
on one channel, the return of one would resolve the other's future and the broker's ack for the
returned one would make it look stored. So a publish whose id is already in flight on this channel
waits for that one to finish first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from .errors import PublishFailed, PublishRefused, PublishReturned, PublishTimeout


class Publisher:
    """A confirm channel and the publishes in flight on it."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, timeout: float, in_flight: int | None = None,
                 opened: AbstractChannel | None = None) -> None:
        self.channel = channel
        self.opened = opened  # the aio-pika channel `open` made (to watch, or to close), if it made one
        self._timeout = timeout
        self._busy: dict[str, asyncio.Future] = {}  # message id -> done when its publish has its answer
        self._slots = asyncio.Semaphore(in_flight) if in_flight else None

    @classmethod
    async def open(cls, connection: AbstractConnection, timeout: float, in_flight: int | None = None, *,
                   watch: Callable[[AbstractChannel], None] | None = None) -> Publisher:
        """A new confirm channel on `connection` and a publisher over it: how the ingress, the worker,
        reconcile and the dlq tools each get theirs. `in_flight` bounds the publishes awaiting a confirm;
        `watch` is given the channel (BrokerLink.watch: start over when it closes)."""
        channel = await connection.channel(publisher_confirms=True)
        if watch is not None:
            watch(channel)
        return cls(await channel.get_underlay_channel(), timeout, in_flight, opened=channel)

    async def close(self) -> None:
        if self.opened is not None and not self.opened.is_closed:
            await self.opened.close()

    @property
    def is_open(self) -> bool:
        return not self.channel.is_closed

    async def publish(self, body: bytes, exchange: str, routing_key: str, properties: Basic.Properties,
                      timeout: float | None = None) -> None:
        """Returns once the broker stored the message; raises PublishFailed (saying why) otherwise.
        `timeout` replaces the publisher's own for this publish (the ingress's answer budget)."""
        timeout = self._timeout if timeout is None else timeout
        if self._slots is None:
            return await self._publish(body, exchange, routing_key, properties, timeout)
        async with self._slots:
            return await self._publish(body, exchange, routing_key, properties, timeout)

    async def _publish(self, body: bytes, exchange: str, routing_key: str, properties: Basic.Properties,
                       timeout: float) -> None:
        mid = properties.message_id
        if not mid:
            raise ValueError("every message published here carries a message id")
        where = f"{exchange or '(default exchange)'}/{routing_key}"
        if self.channel.is_closed:
            raise PublishFailed(f"not stored at {where}: the channel is closed (broker connection lost)")
        try:
            async with asyncio.timeout(timeout):
                while (earlier := self._busy.get(mid)) is not None:
                    await asyncio.shield(earlier)
                done = asyncio.get_running_loop().create_future()
                self._busy[mid] = done
                try:
                    answer = await self.channel.basic_publish(
                        body, exchange=exchange, routing_key=routing_key, properties=properties,
                        mandatory=True, wait=False,  # wait=False: many publishes in flight on one channel
                    )  # type: ignore[call-arg]  # aiormq's Channel takes `wait`; its abstract class omits it
                finally:
                    del self._busy[mid]
                    done.set_result(None)
        except TimeoutError:
            raise PublishTimeout(f"not stored at {where}: no confirm within {timeout:g}s") from None
        except aiormq.exceptions.PublishError:
            raise PublishReturned(f"not stored at {where}: returned, no queue is bound for it") from None
        except aiormq.exceptions.DeliveryError:  # aiormq's way of reporting a nack
            raise _refused(where) from None
        except Exception as exc:  # channel or connection closed under it: aiormq raises many kinds
            raise PublishFailed(f"not stored at {where}: {type(exc).__name__}: {str(exc)[:200]}") from None
        if isinstance(answer, Basic.Ack):
            return
        if isinstance(answer, Basic.Nack):
            raise _refused(where)
        raise PublishReturned(f"not stored at {where}: returned, no queue is bound for it")


def _refused(where: str) -> PublishRefused:
    return PublishRefused(f"not stored at {where}: the broker refused it (nack: a queue full at its max_length, "
                          f"or a resource the broker lacks)")
