"""The worker process: consume each consumer's queues, run its handler, then ack, retry or dead-letter.

At-least-once, end to end. A delivery is acked only
- after the handler returned, or
- after the broker confirmed the publish that replaces it (into a delay tier, or into the DLQ).
If that publish fails or times out, the delivery is not acked: it goes back to its queue. If the
worker dies mid-handler, the broker redelivers the unacked message; a message that kills its worker
every time is dead-lettered by the broker after `delivery_limit` redeliveries (x-delivery-limit).
A handler that finishes after its delivery's channel is gone (a reconnect) neither publishes nor
acks: the broker has put the message back already.
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
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from ingest.broker import BrokerLink
from ingest.config import Config, ConsumerConfig
from ingest.errors import PublishFailed, StartupError
from ingest.message import RECEIVED_AT, id_of
from ingest.names import consumer_queue, dead_letter_queue, delay_exchange, retry_routing_key
from ingest.publish import Publisher
from ingest.topology import declare, plan

from .handler import Event, Handler, PermanentError, load_handler
from .retry import attempt_of, dead_letter_headers, describe_error, next_delay, republish_properties, retry_headers

log = structlog.get_logger("workers")

HANDLED = Counter("hipcall_worker_handled_total", "Messages handled successfully.", ["consumer", "event"])
FAILED = Counter("hipcall_worker_failed_total", "Handler failures (each attempt).", ["consumer", "event"])
DEAD_LETTERED = Counter("hipcall_worker_dead_lettered_total", "Messages sent to a DLQ.", ["consumer", "event"])
DURATION = Histogram("hipcall_worker_handler_seconds", "Handler run time.", ["consumer", "event"])
IN_FLIGHT = Gauge("hipcall_worker_in_flight", "Handlers running now.", ["consumer"])

CANCEL_TIMEOUT = 2.0  # seconds for the broker to confirm our consumer cancels at shutdown


class Worker:
    """Runs the handlers of some consumers on one connection."""

    def __init__(self, config: Config, consumers: Sequence[ConsumerConfig], handlers: dict[str, Handler]) -> None:
        self.config = config
        self.consumers = consumers
        self.handlers = handlers
        self.link = BrokerLink(config.broker, "hipcall-ingest work", self._on_connect)
        self._publisher: Publisher | None = None  # retries and dead letters
        self._subscriptions: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._tasks: set[asyncio.Task] = set()
        self._limits = {c.name: asyncio.Semaphore(c.concurrency) for c in consumers}
        self._stopping = False

    async def _on_connect(self, connection: aio_pika.abc.AbstractConnection) -> None:
        await declare(connection, plan(self.config.broker, self.consumers))
        publisher = await connection.channel(publisher_confirms=True)
        self.link.watch(publisher)
        self._publisher = Publisher(await publisher.get_underlay_channel(), self.config.broker.publish_timeout)
        self._subscriptions = []
        for consumer in self.consumers:
            channel = await connection.channel()
            self.link.watch(channel)
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
            # Quorum queues have no channel-wide (global) prefetch: each queue gets `concurrency`,
            # and the semaphore keeps the handlers of the consumer to `concurrency` in all.
            await channel.set_qos(prefetch_count=consumer.concurrency)
            for event in consumer.events:
                queue = await channel.get_queue(consumer_queue(consumer.name, event), ensure=False)
                tag = await queue.consume(self._callback(consumer, event))
                self._subscriptions.append((queue, tag))
        log.info("consuming", consumers=[c.name for c in self.consumers])

    def _on_cancel(self, frame) -> None:
        """The broker cancelled a consumer (its queue was deleted, say): like a lost channel, start over.
        The reconnect declares the topology again and consumes every queue anew."""
        if self._stopping:
            return
        queue = next((q.name for q, tag in self._subscriptions if tag == frame.consumer_tag), None)
        log.warning("consumer_cancelled_by_broker", queue=queue, action="reconnecting")
        self.link.restart()

    def _callback(self, consumer: ConsumerConfig, event: str):
        async def on_message(message: AbstractIncomingMessage) -> None:
            if self._stopping:  # shutting down: leave it unacked, the broker gives it to another worker
                return
            task = asyncio.create_task(self._process(consumer, event, message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _process(self, consumer: ConsumerConfig, name: str, message: AbstractIncomingMessage) -> None:
        async with self._limits[consumer.name]:
            IN_FLIGHT.labels(consumer.name).inc()
            try:
                await self._handle(consumer, name, message)
            except Exception as exc:  # a bug of ours: say so; the message stays unacked and comes back
                log.error("worker_error", consumer=consumer.name, _event=name, error=describe_error(exc), exc_info=exc)
            finally:
                IN_FLIGHT.labels(consumer.name).dec()

    async def _handle(self, consumer: ConsumerConfig, name: str, message: AbstractIncomingMessage) -> None:
        attempt = attempt_of(message.headers)
        fields = {"consumer": consumer.name, "_event": name, "message_id": id_of(message.message_id, message.body),
                  "attempt": attempt}
        started = time.perf_counter()
        try:
            event = _event(name, message, attempt, fields["message_id"])
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
        fields["duration_ms"] = round(duration * 1000, 2)
        if await self._ack(message, fields):
            HANDLED.labels(consumer.name, name).inc()
            log.info("handled", **fields)

    async def _fail(self, consumer, name, message, attempt, exc, fields) -> None:
        if _channel_gone(message):  # nothing to replace: the broker has put the message back already
            log.warning("delivery_channel_gone", outcome="failed", action="redelivered by the broker", **fields)
            return
        delay = None if isinstance(exc, PermanentError) else next_delay(consumer.retry, attempt)
        if delay is not None:
            exchange, key = delay_exchange(self.config.broker.exchange), retry_routing_key(consumer.name, delay, name)
            headers = retry_headers(message.headers, attempt)
        else:
            exchange, key = "", dead_letter_queue(consumer.name, name)
            headers = dead_letter_headers(message.headers, attempt=attempt, exc=exc,
                                          queue=consumer_queue(consumer.name, name), consumer=consumer.name)
        try:
            publisher = self._publisher
            if publisher is None:
                raise PublishFailed("no publish channel (broker connection lost)")
            await publisher.publish(message.body, exchange, key, republish_properties(message, headers))
        except PublishFailed as publish_error:
            # Not stored: keep the original. Requeue it now if its channel still works; if it does
            # not, the broker requeues it when the channel closes.
            log.error("replacement_publish_failed", publish_error=str(publish_error), **fields)
            try:
                await message.nack(requeue=True)
            except Exception:
                pass
            return
        if not await self._ack(message, fields):  # stored twice now; the handler sees it again (dedupe on id)
            return
        if delay is not None:
            log.warning("retry_scheduled", retry_in_ms=round(delay * 1000), **fields)
        else:
            DEAD_LETTERED.labels(consumer.name, name).inc()
            log.error("dead_lettered", queue=key, **fields)

    async def _ack(self, message: AbstractIncomingMessage, fields: dict) -> bool:
        """Ack on the delivery's own channel; False (logged) when that channel is gone."""
        if not _channel_gone(message):
            try:
                await message.ack()
                return True
            except Exception:
                pass
        log.warning("delivery_channel_gone", outcome="not acked", action="redelivered by the broker", **fields)
        return False

    async def drain(self, grace: float) -> None:
        """Stop taking new messages; let in-flight handlers finish (acked) for up to `grace` seconds.
        Every wait is bounded: a broker that does not answer (a resource alarm) cannot hold SIGTERM."""
        self._stopping = True
        cancels = [asyncio.ensure_future(queue.cancel(tag)) for queue, tag in self._subscriptions]
        for cancel in cancels:  # a channel may be gone already, or blocked: nothing more is taken from it either way
            cancel.add_done_callback(_retrieve)
        if cancels:
            await asyncio.wait(cancels, timeout=min(grace, CANCEL_TIMEOUT))
        if self._tasks:
            log.info("draining", in_flight=len(self._tasks), grace_period_s=grace)
            done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:  # unacked: the broker redelivers them
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1)
                log.warning("grace_period_over", abandoned=len(pending))


def _channel_gone(message: AbstractIncomingMessage) -> bool:
    try:
        return message.channel.is_closed
    except aio_pika.exceptions.ChannelInvalidStateError:  # aio-pika raises for a closed channel
        return True


def _retrieve(future: asyncio.Future) -> None:
    """Consume a background future's outcome, so an expected failure is not reported as unretrieved."""
    if not future.cancelled():
        future.exception()


def _event(name: str, message: AbstractIncomingMessage, attempt: int, mid: str) -> Event:
    try:
        payload = orjson.loads(message.body)
        data = payload["data"]
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
    except Exception as exc:
        raise PermanentError(f"body is not a webhook object with a data object: {exc}") from None
    headers = dict(message.headers or {})
    received = headers.get(RECEIVED_AT)
    try:
        received_at = datetime.fromisoformat(received) if isinstance(received, str) else message.timestamp
    except ValueError:
        received_at = message.timestamp
    return Event(name=name, data=data, id=mid, attempt=attempt, received_at=received_at, body=message.body,
                 headers=headers)


async def work(config: Config, consumers: Sequence[ConsumerConfig], metrics_port: int = 0) -> None:
    """Start-up and shutdown of a worker process, top to bottom."""
    handlers = {c.name: load_handler(c) for c in consumers}  # import errors stop start-up here
    if metrics_port:
        host = config.worker.metrics_host
        try:
            start_http_server(metrics_port, addr=host)
        except OSError as exc:
            raise StartupError(f"cannot serve worker metrics on {host}:{metrics_port} "
                               f"(worker.metrics_port or --metrics-port): {exc.strerror}") from None
    for handler in handlers.values():
        await handler.start()
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
            if handler.busy:  # its thread still runs the handler: closing under it could break it mid-write
                log.warning("handler_not_closed", consumer=handler.consumer.name, still_running=handler.busy)
            else:
                await handler.close()
    log.info("stopped")
