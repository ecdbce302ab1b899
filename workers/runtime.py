"""The worker process: consume each consumer's queues, run its handler, then ack, retry or dead-letter.

At-least-once, end to end. A delivery is acked only
- after the handler returned, or
- after the broker confirmed the publish that replaces it (into a delay tier, or into the DLQ).
If that publish fails or times out, the delivery is not acked: it goes back to its queue. If the
worker dies mid-handler, the broker redelivers the unacked message; a message that kills its worker
every time is dead-lettered by the broker after `delivery_limit` redeliveries (x-delivery-limit).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Sequence
from datetime import datetime

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractIncomingMessage
from pamqp.commands import Basic
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ingest.broker import BrokerLink
from ingest.config import Config, ConsumerConfig
from ingest.names import consumer_queue, dead_letter_queue, delay_exchange, retry_routing_key
from ingest.topology import declare, plan

from .handler import Event, Handler, PermanentError, load_handler
from .retry import attempt_of, dead_letter_headers, describe_error, next_delay, republish_properties, retry_headers

log = structlog.get_logger("workers")

HANDLED = Counter("hipcall_worker_handled_total", "Messages handled successfully.", ["consumer", "event"])
FAILED = Counter("hipcall_worker_failed_total", "Handler failures (each attempt).", ["consumer", "event"])
DEAD_LETTERED = Counter("hipcall_worker_dead_lettered_total", "Messages sent to a DLQ.", ["consumer", "event"])
DURATION = Histogram("hipcall_worker_handler_seconds", "Handler run time.", ["consumer", "event"])
IN_FLIGHT = Gauge("hipcall_worker_in_flight", "Handlers running now.", ["consumer"])


class PublishFailed(Exception):
    """The replacement of a failed message was not confirmed; the original stays unacked."""


class Worker:
    """Runs the handlers of some consumers on one connection."""

    def __init__(self, config: Config, consumers: Sequence[ConsumerConfig], handlers: dict[str, Handler]) -> None:
        self.config = config
        self.consumers = consumers
        self.handlers = handlers
        self.link = BrokerLink(config.broker, "hipcall-ingest work", self._on_connect)
        self._publisher = None  # aiormq confirm channel for retries and dead letters
        self._subscriptions: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._tasks: set[asyncio.Task] = set()
        self._limits = {c.name: asyncio.Semaphore(c.concurrency) for c in consumers}

    async def _on_connect(self, connection: aio_pika.abc.AbstractConnection) -> None:
        await declare(connection, plan(self.config.broker, self.consumers))
        publisher = await connection.channel(publisher_confirms=True)
        self.link.watch(publisher)
        self._publisher = await publisher.get_underlay_channel()
        self._subscriptions = []
        for consumer in self.consumers:
            channel = await connection.channel()
            self.link.watch(channel)
            # Quorum queues have no channel-wide (global) prefetch: each queue gets `concurrency`,
            # and the semaphore keeps the handlers of the consumer to `concurrency` in all.
            await channel.set_qos(prefetch_count=consumer.concurrency)
            for event in consumer.events:
                queue = await channel.get_queue(consumer_queue(consumer.name, event), ensure=False)
                tag = await queue.consume(self._callback(consumer, event))
                self._subscriptions.append((queue, tag))
        log.info("consuming", consumers=[c.name for c in self.consumers])

    def _callback(self, consumer: ConsumerConfig, event: str):
        async def on_message(message: AbstractIncomingMessage) -> None:
            task = asyncio.create_task(self._process(consumer, event, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _process(self, consumer: ConsumerConfig, name: str, message: AbstractIncomingMessage) -> None:
        async with self._limits[consumer.name]:
            IN_FLIGHT.labels(consumer.name).inc()
            try:
                await self._handle(consumer, name, message)
            finally:
                IN_FLIGHT.labels(consumer.name).dec()

    async def _handle(self, consumer: ConsumerConfig, name: str, message: AbstractIncomingMessage) -> None:
        attempt = attempt_of(message.headers)
        fields = {"consumer": consumer.name, "_event": name, "message_id": message.message_id, "attempt": attempt}
        started = time.perf_counter()
        try:
            event = _event(name, message, attempt)
            fields["call_uuid"] = event.call_uuid
            await self.handlers[consumer.name](event)
        except Exception as exc:
            duration = time.perf_counter() - started
            DURATION.labels(consumer.name, name).observe(duration)
            FAILED.labels(consumer.name, name).inc()
            fields.update(duration_ms=round(duration * 1000, 2), error=describe_error(exc))
            await self._fail(consumer, name, message, attempt, exc, fields)
            return
        duration = time.perf_counter() - started
        DURATION.labels(consumer.name, name).observe(duration)
        await message.ack()
        HANDLED.labels(consumer.name, name).inc()
        log.info("handled", duration_ms=round(duration * 1000, 2), **fields)

    async def _fail(self, consumer, name, message, attempt, exc, fields) -> None:
        delay = None if isinstance(exc, PermanentError) else next_delay(consumer.retry, attempt)
        try:
            if delay is not None:
                await self._publish(
                    message,
                    delay_exchange(self.config.broker.exchange),
                    retry_routing_key(consumer.name, delay, name),
                    retry_headers(message.headers, attempt),
                )
            else:
                headers = dead_letter_headers(
                    message.headers, attempt=attempt, exc=exc, queue=consumer_queue(consumer.name, name), consumer=consumer.name
                )
                await self._publish(message, "", dead_letter_queue(consumer.name, name), headers)
        except Exception as publish_error:
            # Not confirmed: keep the original. Requeue it now if the channel still works; if it
            # does not, the broker requeues it when the channel closes.
            log.error("replacement_publish_failed", publish_error=describe_error(publish_error), **fields)
            try:
                await message.nack(requeue=True)
            except Exception:
                pass
            return
        await message.ack()  # only now: its replacement is confirmed
        if delay is not None:
            log.warning("retry_scheduled", retry_in_ms=round(delay * 1000), **fields)
        else:
            DEAD_LETTERED.labels(consumer.name, name).inc()
            log.error("dead_lettered", queue=dead_letter_queue(consumer.name, name), **fields)

    async def _publish(self, message: AbstractIncomingMessage, exchange: str, routing_key: str, headers: dict) -> None:
        channel = self._publisher
        if channel is None or channel.is_closed:
            raise PublishFailed("no publish channel (broker connection lost)")
        # mandatory: a missing queue must not swallow the message; the timeout bounds a publish on a
        # dead connection, which could otherwise wait forever (aio-pika issue 636).
        confirm = await channel.basic_publish(
            message.body,
            exchange=exchange,
            routing_key=routing_key,
            properties=republish_properties(message, headers),
            mandatory=True,
            timeout=self.config.broker.publish_timeout,
        )
        if not isinstance(confirm, Basic.Ack):
            raise PublishFailed(f"broker did not store it ({type(confirm).__name__}) at {exchange!r}/{routing_key!r}")

    async def drain(self, grace: float) -> None:
        """Stop taking new messages; let in-flight handlers finish (acked) for up to `grace` seconds."""
        for queue, tag in self._subscriptions:
            try:
                await queue.cancel(tag)
            except Exception:  # the channel may be gone already: nothing more will come from it
                pass
        if self._tasks:
            log.info("draining", in_flight=len(self._tasks), grace_period_s=grace)
            done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:  # unacked: the broker redelivers them
                task.cancel()
            if pending:
                log.warning("grace_period_over", abandoned=len(pending))


def _event(name: str, message: AbstractIncomingMessage, attempt: int) -> Event:
    try:
        payload = orjson.loads(message.body)
        data = payload["data"]
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
    except Exception as exc:
        raise PermanentError(f"body is not a webhook object with a data object: {exc}") from None
    headers = dict(message.headers or {})
    received = headers.get("x-hipcall-received-at")
    try:
        received_at = datetime.fromisoformat(received) if isinstance(received, str) else message.timestamp
    except ValueError:
        received_at = message.timestamp
    return Event(name=name, data=data, id=message.message_id or "", attempt=attempt, received_at=received_at,
                 body=message.body, headers=headers)


async def work(config: Config, consumers: Sequence[ConsumerConfig], metrics_port: int = 0) -> None:
    """Start-up and shutdown of a worker process, top to bottom."""
    handlers = {c.name: load_handler(c) for c in consumers}  # import errors stop start-up here
    for handler in handlers.values():
        await handler.start()
    if metrics_port:
        start_http_server(metrics_port, addr=config.http.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(config, consumers, handlers)
    try:
        async with worker.link:
            await stop.wait()
            log.info("stopping", reason="signal")
            await worker.drain(config.worker.grace_period)
    finally:
        for handler in handlers.values():
            await handler.close()
    log.info("stopped")
