"""What hipcall-ingest keeps on RabbitMQ, and declaring it idempotently.

    webhook --> [entry, fanout] --> [tap, topic]: observers (tail) bind here, never to the events exchange
                    |
                    v
                [events exchange, topic] --routing key = event--> CONSUMER.EVENT (quorum)
                    | alternate exchange                            |  handler failed
                    v                                               v
              [unrouted, fanout] --> hipcall.unrouted      [delay exchange] --> CONSUMER.retry.DELAY
                                                                                  | queue TTL expires
                                                                                  v
                                   CONSUMER.EVENT  <--CONSUMER.*.EVENT-- [requeue exchange]

The tap has no alternate exchange and the events exchange does: a queue bound to the tap sees every
webhook without giving any event a route, so unsubscribed events still land in the unrouted queue.
reconcile's ledger queue (EXCHANGE.reconcile) is bound to the tap for this reason.
Dead letters go to CONSUMER.EVENT.dlq: published there by the worker (retries exhausted or a
PermanentError) or by the broker itself (the delivery limit: a message that crashed its worker too
often). Every queue on a broker dead-letter path is a quorum queue with the at-least-once strategy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from .config import BrokerConfig, ConsumerConfig, ReconcileConfig
from .errors import TopologyError
from .names import (
    consumer_queue,
    dead_letter_queue,
    delay_exchange,
    entry_exchange,
    ledger_queue,
    requeue_binding,
    requeue_exchange,
    retry_binding,
    retry_queue,
    tap_exchange,
)


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    bound_to: tuple[str, ...] = ()  # exchanges this one receives everything from (exchange-to-exchange)


@dataclass(frozen=True)
class Queue:
    name: str
    kind: str  # "consumer", "retry", "dlq", "unrouted" or "ledger"
    arguments: Mapping[str, Any]
    bindings: tuple[tuple[str, str], ...]  # (exchange, routing key)
    consumer: str | None = None
    event: str | None = None


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]


_QUORUM = {"x-queue-type": "quorum"}
# Broker-side dead-lettering is at-least-once only with this pair (quorum queues, RabbitMQ >= 3.10).
_AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


def plan(broker: BrokerConfig, consumers: Iterable[ConsumerConfig], reconcile: ReconcileConfig | None = None) -> Topology:
    """Everything the given consumers need, plus the exchanges and the unrouted queue, plus
    reconcile's ledger queue when `reconcile` is given and enabled."""
    delay, requeue = delay_exchange(broker.exchange), requeue_exchange(broker.exchange)
    entry = entry_exchange(broker.exchange)
    exchanges = (
        Exchange(entry, "fanout"),
        Exchange(broker.unrouted, "fanout"),
        Exchange(broker.exchange, "topic", {"alternate-exchange": broker.unrouted}, bound_to=(entry,)),
        Exchange(tap_exchange(broker.exchange), "topic", bound_to=(entry,)),
        Exchange(delay, "topic"),
        Exchange(requeue, "topic"),
    )
    queues = [Queue(broker.unrouted, "unrouted", _QUORUM, ((broker.unrouted, ""),))]
    if reconcile is not None and reconcile.enabled:
        # Only a record of what arrived: bound to the tap, so it never gives call_hangup a route (with
        # no consumer for it, it still goes to the unrouted queue); old messages expire (dropped);
        # a second reconcile process is a standby that gets nothing while the first one consumes.
        queues.append(Queue(ledger_queue(broker.exchange), "ledger",
                            {**_QUORUM, "x-single-active-consumer": True, "x-message-ttl": round(reconcile.retention * 1000)},
                            ((tap_exchange(broker.exchange), "call_hangup"),)))
    for consumer in consumers:
        name = consumer.name
        for seconds in sorted(set(consumer.retry.delays)):
            queues.append(
                Queue(
                    retry_queue(name, seconds),
                    "retry",
                    {**_QUORUM, "x-message-ttl": round(seconds * 1000), "x-dead-letter-exchange": requeue, **_AT_LEAST_ONCE},
                    ((delay, retry_binding(name, seconds)),),
                    consumer=name,
                )
            )
        for event in consumer.events:
            queues.append(
                Queue(
                    consumer_queue(name, event),
                    "consumer",
                    {
                        **_QUORUM,
                        "x-delivery-limit": consumer.retry.delivery_limit,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": dead_letter_queue(name, event),
                        **_AT_LEAST_ONCE,  # with x-overflow reject-publish: a full queue nacks the publish
                        **({"x-max-length": consumer.max_length} if consumer.max_length else {}),
                    },
                    ((broker.exchange, event), (requeue, requeue_binding(name, event))),
                    consumer=name,
                    event=event,
                )
            )
            queues.append(Queue(dead_letter_queue(name, event), "dlq", _QUORUM, (), consumer=name, event=event))
    return Topology(exchanges, tuple(queues))


@dataclass(frozen=True)
class QueueState:
    queue: Queue
    messages: int
    consumers: int


async def declare(connection: AbstractConnection, topology: Topology) -> list[QueueState]:
    """Declare every exchange, queue and binding; safe to repeat. Returns each queue's counts."""
    states = []
    channel = await connection.channel(publisher_confirms=False)
    try:
        declared_exchanges = {}
        for exchange in topology.exchanges:
            try:
                declared_exchanges[exchange.name] = await channel.declare_exchange(
                    exchange.name, exchange.type, durable=True, arguments=dict(exchange.arguments))
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise _conflict("exchange", exchange.name, exc) from None
        for exchange in topology.exchanges:
            for source in exchange.bound_to:
                await declared_exchanges[exchange.name].bind(source, "")
        for queue in topology.queues:
            try:
                declared = await channel.declare_queue(queue.name, durable=True, arguments=dict(queue.arguments))
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                raise _conflict("queue", queue.name, exc) from None
            for source, key in queue.bindings:
                await declared.bind(source, key)
            result = declared.declaration_result
            states.append(QueueState(queue, result.message_count or 0, result.consumer_count or 0))
    finally:
        if not channel.is_closed:
            await channel.close()
    return states


def _conflict(kind: str, name: str, exc: aiormq.exceptions.ChannelPreconditionFailed) -> TopologyError:
    reason = str(exc.args[0] if exc.args else exc)
    return TopologyError(
        f"the broker already has {kind} {name!r} with other arguments than this config asks for "
        f"({reason}). Delete it once its messages are safe (rabbitmqctl delete_queue / delete_exchange) "
        f"or set the config back to match it."
    )


async def inspect(connection: AbstractConnection, topology: Topology) -> list[QueueState | None]:
    """Counts for each queue without creating anything (passive declares); None where it is missing."""
    result: list[QueueState | None] = []
    channel = await connection.channel(publisher_confirms=False)
    try:
        for queue in topology.queues:
            if channel.is_closed:
                channel = await connection.channel(publisher_confirms=False)
            try:
                declared = await channel.declare_queue(queue.name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                result.append(None)
                continue
            info = declared.declaration_result
            result.append(QueueState(queue, info.message_count or 0, info.consumer_count or 0))
    finally:
        if not channel.is_closed:
            await channel.close()
    return result

