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
import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import aio_pika
import structlog
from aiormq.abc import DeliveredMessage
from prometheus_client import Counter, Gauge, Histogram

from ingest.broker import BrokerLink
from ingest.config import Config, ConsumerConfig
from ingest.errors import PublishFailed
from ingest.lifecycle import Supervised, ready, serve_metrics, stop_event, stop_reason
from ingest.message import RECEIVED_AT, delivery_tag, id_of, own_headers, parse_body, republish_properties
from ingest.names import consumer_queue, dead_letter_queue, delay_exchange, retry_routing_key
from ingest.publish import Publisher
from ingest.topology import declare, plan

from .acks import Acks
from .handler import Event, Handler, PermanentError, RetryLater, load_handler
from .retry import (
    LONGEST_WAIT,
    attempt_of,
    dead_letter_headers,
    describe_error,
    due_in,
    next_delay,
    retry_headers,
    waiting_delay,
)

log = structlog.get_logger("workers")

HANDLED = Counter("hipcall_worker_handled_total", "Messages handled successfully.", ["consumer", "event"])
FAILED = Counter("hipcall_worker_failed_total", "Handler failures (each attempt).", ["consumer", "event"])
DEAD_LETTERED = Counter("hipcall_worker_dead_lettered_total", "Messages sent to a DLQ.", ["consumer", "event"])
DURATION = Histogram("hipcall_worker_handler_seconds", "Handler run time.", ["consumer", "event"])
IN_FLIGHT = Gauge("hipcall_worker_in_flight", "Handlers running now.", ["consumer"])

CANCEL_TIMEOUT = 2.0  # seconds for the broker to confirm our consumer cancels at shutdown
PREFETCH_PER_HANDLER = 4  # deliveries a queue may have in the worker per handler slot (see _on_connect)
SUMMARY_EVERY = 10.0  # seconds between `handled_summary` lines (one `handled` line per message is debug)


class Worker:
    """Runs the handlers of some consumers on one connection."""

    def __init__(self, config: Config, consumers: Sequence[ConsumerConfig], handlers: dict[str, Handler]) -> None:
        self.config = config
        self.consumers = consumers
        self.handlers = handlers
        self.link = BrokerLink(config.broker, "hipcall-ingest work", self._on_connect)
        self._publisher: Publisher | None = None  # retries and dead letters
        self._subscriptions: list[_Subscription] = []
        self._tasks: set[asyncio.Task] = set()
        self._limits = {c.name: asyncio.Semaphore(c.concurrency) for c in consumers}
        self._meters = {(c.name, e): _Meters(c.name, e) for c in consumers for e in c.events}
        self._running = {c.name: 0 for c in consumers}  # handlers in flight, read by the gauge when scraped
        for c in consumers:
            IN_FLIGHT.labels(c.name).set_function(functools.partial(self._running.__getitem__, c.name))
        self._stopping = False

    async def _on_connect(self, connection: aio_pika.abc.AbstractConnection) -> None:
        await declare(connection, plan(self.config.broker, self.consumers))
        self._publisher = await Publisher.open(connection, self.config.broker.publish_timeout, watch=self.link.watch)
        self._subscriptions = []
        for consumer in self.consumers:
            channel = await connection.channel()
            self.link.watch(channel)
            # aiormq's channel directly: its deliveries, without aio-pika's per-message wrapper.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_cancel)
            # Quorum queues have no channel-wide (global) prefetch: each queue gets its own, and the
            # semaphore keeps the handlers of the consumer to `concurrency` in all. A prefetch of
            # several deliveries per handler slot keeps the next ones here while the acks of the last
            # ones travel (a prefetch of `concurrency` left the handlers idle for every round trip).
            await underlay.basic_qos(prefetch_count=consumer.concurrency * PREFETCH_PER_HANDLER)
            acks = Acks(underlay)
            for event in consumer.events:
                queue = consumer_queue(consumer.name, event)
                ok = await underlay.basic_consume(queue, self._callback(consumer, event, acks))
                self._subscriptions.append(_Subscription(queue, cast(str, ok.consumer_tag), acks))  # the broker names it
        log.info("consuming", consumers=[c.name for c in self.consumers])

    def _on_cancel(self, frame) -> None:
        """The broker cancelled a consumer (its queue was deleted, say): like a lost channel, start over.
        The reconnect declares the topology again and consumes every queue anew."""
        if self._stopping:
            return
        queue = next((s.queue for s in self._subscriptions if s.tag == frame.consumer_tag), None)
        log.warning("consumer_cancelled_by_broker", queue=queue, action="reconnecting")
        self.link.restart()

    def _callback(self, consumer: ConsumerConfig, event: str, acks: Acks):
        meters = self._meters[(consumer.name, event)]

        async def on_message(message: DeliveredMessage) -> None:
            acks.received(delivery_tag(message))  # before anything else: see Acks
            if self._stopping:  # shutting down: leave it unacked, the broker gives it to another worker
                return
            # A task of our own: aiormq cancels its per-delivery tasks when the channel closes, and a
            # handler is never cancelled halfway for that (it finishes; its delivery is redelivered).
            task = asyncio.create_task(self._process(consumer, event, message, acks, meters))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return on_message

    async def _process(self, consumer: ConsumerConfig, name: str, message: DeliveredMessage, acks: Acks,
                       meters: _Meters) -> None:
        async with self._limits[consumer.name]:
            self._running[consumer.name] += 1
            try:
                await self._handle(consumer, name, message, acks, meters)
            except Exception as exc:  # a bug of ours: say so; the message stays unacked and comes back
                log.error("worker_error", consumer=consumer.name, _event=name, error=describe_error(exc), exc_info=exc)
            finally:
                self._running[consumer.name] -= 1

    async def _handle(self, consumer: ConsumerConfig, name: str, message: DeliveredMessage, acks: Acks,
                      meters: _Meters) -> None:
        properties = message.header.properties
        attempt = attempt_of(properties.headers)
        mid = id_of(properties.message_id, message.body)
        fields: dict[str, Any] = {"consumer": consumer.name, "_event": name, "message_id": mid, "attempt": attempt}
        if (left := due_in(properties.headers, time.time())) > 0:  # a Retry-After longer than the tier it took
            await self._wait_more(consumer, name, message, acks, left, fields)
            return
        started = time.perf_counter()
        try:
            event = _event(name, message, attempt, mid)
            fields["call_uuid"] = event.call_uuid
            await self.handlers[consumer.name](event)
        except Exception as exc:
            duration = time.perf_counter() - started
            meters.duration.observe(duration)
            meters.failed.inc()
            fields.update(duration_ms=round(duration * 1000, 2), error=describe_error(exc))
            await self._fail(consumer, name, message, acks, meters, attempt, exc, fields)
            return
        duration = time.perf_counter() - started
        meters.duration.observe(duration)
        if self._ack(message, acks, fields):
            meters.count_handled(duration)
            log.debug("handled", duration_ms=round(duration * 1000, 2), **fields)

    async def summarize(self) -> None:
        """One `handled_summary` line per consumer and event every SUMMARY_EVERY seconds in which it
        handled anything: at thousands of messages a second a line per message costs a sixth of the
        worker's time and floods the log. Failures keep their line each."""
        try:
            while True:
                await asyncio.sleep(SUMMARY_EVERY)
                self._log_summary()
        finally:
            self._log_summary()

    def _log_summary(self) -> None:
        for meters in self._meters.values():
            if meters.summary_count:
                log.info("handled_summary", consumer=meters.consumer, _event=meters.event,
                         handled=meters.summary_count, seconds=round(time.monotonic() - meters.summary_since, 1),
                         duration_ms_max=round(meters.summary_max * 1000, 2))
                meters.reset_summary()

    async def _fail(self, consumer, name, message, acks, meters, attempt, exc, fields) -> None:
        if acks.channel.is_closed:  # nothing to replace: the broker has put the message back already
            log.warning("delivery_channel_gone", outcome="failed", action="redelivered by the broker", **fields)
            return
        wait = min(exc.seconds, LONGEST_WAIT) if isinstance(exc, RetryLater) else 0.0
        delay = None if isinstance(exc, PermanentError) else next_delay(consumer.retry, attempt, wait)
        if delay is not None:
            exchange, key = delay_exchange(self.config.broker.exchange), retry_routing_key(consumer.name, delay, name)
            headers = retry_headers(message.header.properties.headers, attempt,
                                    time.time() + wait if wait > delay else None)
        else:
            exchange, key = "", dead_letter_queue(consumer.name, name)
            headers = dead_letter_headers(message.header.properties.headers, attempt=attempt, exc=exc,
                                          queue=consumer_queue(consumer.name, name), consumer=consumer.name)
        if not await self._replace(message, acks, exchange, key, headers, fields):
            return
        if delay is not None:
            log.warning("retry_scheduled", retry_in_ms=round(max(delay, wait) * 1000), **fields)
        else:
            meters.dead_lettered.inc()
            log.error("dead_lettered", queue=key, **fields)

    async def _wait_more(self, consumer: ConsumerConfig, name: str, message: DeliveredMessage, acks: Acks,
                         left: float, fields: dict) -> None:
        """Not due yet: through a delay tier again, attempt and due time as they are."""
        if acks.channel.is_closed:  # the broker has put it back already
            return
        delay = waiting_delay(consumer.retry, left)
        exchange, key = delay_exchange(self.config.broker.exchange), retry_routing_key(consumer.name, delay, name)
        if await self._replace(message, acks, exchange, key, own_headers(message.header.properties.headers), fields):
            log.debug("retry_waiting", due_in_ms=round(left * 1000), retry_in_ms=round(delay * 1000), **fields)

    async def _replace(self, message: DeliveredMessage, acks: Acks, exchange: str, key: str, headers: dict,
                       fields: dict) -> bool:
        """Publish the message's replacement, then ack the delivery; False when either did not happen."""
        try:
            publisher = self._publisher
            if publisher is None:
                raise PublishFailed("no publish channel (broker connection lost)")
            await publisher.publish(message.body, exchange, key,
                                    republish_properties(message.header.properties, message.body, headers))
        except PublishFailed as publish_error:
            # Not stored: keep the original. Requeue it now if its channel still works; if it does
            # not, the broker requeues it when the channel closes.
            log.error("replacement_publish_failed", publish_error=str(publish_error), **fields)
            try:
                await acks.requeue(delivery_tag(message))
            except Exception:
                pass
            return False
        return self._ack(message, acks, fields)  # False: stored twice now; the handler sees it again (dedupe on id)

    def _ack(self, message: DeliveredMessage, acks: Acks, fields: dict) -> bool:
        """Ack on the delivery's own channel; False (logged) when that channel is gone."""
        if acks.ack(delivery_tag(message)):
            return True
        log.warning("delivery_channel_gone", outcome="not acked", action="redelivered by the broker", **fields)
        return False

    async def drain(self, grace: float) -> None:
        """Stop taking new messages; let in-flight handlers finish (acked) for up to `grace` seconds.
        Every wait is bounded: a broker that does not answer (a resource alarm) cannot hold SIGTERM."""
        self._stopping = True
        cancels = [asyncio.ensure_future(s.acks.channel.basic_cancel(s.tag)) for s in self._subscriptions]
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
        for acks in {s.acks for s in self._subscriptions}:
            await acks.settle()


@dataclass(frozen=True)
class _Subscription:
    queue: str
    tag: str
    acks: Acks  # and through it, the channel the consumer is on


class _Meters:
    """A consumer's and event's metric children (looked up once, not with labels() per message) and
    its counts since the last summary line."""

    summary_count: int
    summary_max: float

    def __init__(self, consumer: str, event: str) -> None:
        self.consumer, self.event = consumer, event
        self.handled = HANDLED.labels(consumer, event)
        self.failed = FAILED.labels(consumer, event)
        self.dead_lettered = DEAD_LETTERED.labels(consumer, event)
        self.duration = DURATION.labels(consumer, event)
        self.reset_summary()

    def count_handled(self, duration: float) -> None:
        self.handled.inc()
        self.summary_count += 1
        self.summary_max = max(self.summary_max, duration)

    def reset_summary(self) -> None:
        self.summary_count, self.summary_max, self.summary_since = 0, 0.0, time.monotonic()


def _retrieve(future: asyncio.Future) -> None:
    """Consume a background future's outcome, so an expected failure is not reported as unretrieved."""
    if not future.cancelled():
        future.exception()


def _event(name: str, message: DeliveredMessage, attempt: int, mid: str) -> Event:
    try:
        payload = parse_body(message.body)
        data = payload["data"]
        if not isinstance(data, dict):
            raise TypeError("data is not an object")
    except Exception as exc:
        raise PermanentError(f"body is not a webhook object with a data object: {exc}") from None
    properties = message.header.properties
    headers = dict(properties.headers or {})
    received = headers.get(RECEIVED_AT)
    try:
        received_at = datetime.fromisoformat(received) if isinstance(received, str) else properties.timestamp
    except ValueError:
        received_at = properties.timestamp
    return Event(name=name, data=data, id=mid, attempt=attempt, received_at=received_at, body=message.body,
                 headers=headers)


async def work(config: Config, consumers: Sequence[ConsumerConfig], metrics_port: int = 0,
               supervised: Supervised | None = None) -> None:
    """Start-up and shutdown of a worker process, top to bottom."""
    handlers = {c.name: load_handler(c, config.hipcall) for c in consumers}  # import errors stop start-up here
    stop = stop_event(supervised)
    if metrics_port:
        serve_metrics("worker", config.worker.metrics_host, metrics_port, "worker.metrics_port or --metrics-port")
    for handler in handlers.values():
        await handler.start()
    worker = Worker(config, consumers, handlers)
    summaries = asyncio.create_task(worker.summarize())
    ready(supervised)
    try:
        async with worker.link:
            await stop.wait()
            log.info("stopping", reason=stop_reason(supervised))
            await worker.drain(config.worker.grace_period)
    finally:
        summaries.cancel()
        await asyncio.gather(summaries, return_exceptions=True)
        for handler in handlers.values():
            if handler.busy:  # its thread still runs the handler: closing under it could break it mid-write
                log.warning("handler_not_closed", consumer=handler.consumer.name, still_running=handler.busy)
            else:
                await handler.close()
    log.info("stopped")
