"""The broker's side of the topology levers (issue 23), measured in one run against one node.

Each variant is our real topology (`ingest.topology.plan` with the default config) under an exchange
name of its own, changed in one respect. The same publisher (our `Publisher`, the ingress's publish:
persistent, mandatory, confirmed, the webhook's properties, a message id per message) keeps 50
publishes in flight, as wrk's 50 connections keep 50 webhooks in flight, for `seconds`; the variants
alternate round by round. The figures: messages per second and the broker's CPU per message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import aio_pika

from ingest.config import Config
from ingest.message import webhook_properties
from ingest.names import entry_exchange, tap_exchange
from ingest.publish import Publisher
from ingest.topology import Queue, Topology, declare, plan

IN_FLIGHT = 50


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    topology: Topology
    exchange: str  # where a call_hangup is published ("" = the default exchange)
    routing_key: str
    exchange_bindings: tuple[tuple[str, str, str], ...] = ()  # (destination, source, key) beyond the topology's


def variants(config: Config) -> list[Variant]:
    """As shipped, then one lever each, then the minimal ingress's one queue."""
    def ours(name: str, reconcile: bool = True) -> tuple[Topology, str]:
        broker = dataclasses.replace(config.broker, exchange=f"lever-{name}", unrouted=f"lever-{name}.unrouted")
        consumers = tuple(dataclasses.replace(c, name=f"lever-{name}") for c in config.enabled_consumers)
        return plan(broker, consumers, config.reconcile if reconcile else None), broker.exchange

    def with_queues(topology: Topology, change: Callable[[Queue], Queue]) -> Topology:
        return Topology(topology.exchanges, tuple(change(q) for q in topology.queues))

    shipped, shipped_x = ours("shipped")
    stream, stream_x = ours("stream")
    stream = with_queues(stream, lambda q: q if q.kind != "ledger" else dataclasses.replace(q, arguments={
        "x-queue-type": "stream", "x-max-age": f"{round(config.reconcile.retention)}s",
        "x-stream-max-segment-size-bytes": 50_000_000}))
    classic, classic_x = ours("classic")
    classic = with_queues(classic, lambda q: q if q.kind != "ledger" else dataclasses.replace(q, arguments={
        "x-queue-type": "classic", "x-queue-version": 2, "x-message-ttl": round(config.reconcile.retention * 1000)}))
    no_ledger, no_ledger_x = ours("noledger", reconcile=False)
    tap_first, tap_first_x = ours("tapfirst")  # no entry fanout: the tap gets the publish and feeds the events exchange
    tap_first = Topology(tuple(dataclasses.replace(x, bound_to=()) for x in tap_first.exchanges
                               if x.name != entry_exchange(tap_first_x)), tap_first.queues)
    direct, direct_x = ours("direct")
    direct = Topology(tuple(dataclasses.replace(x, type="direct") if x.name in (direct_x, tap_exchange(direct_x)) else x
                            for x in direct.exchanges), direct.queues)
    into_events, into_events_x = ours("intoevents")  # the ledger bound to the events exchange, which gets the publish
    into_events = with_queues(into_events, lambda q: q if q.kind != "ledger"
                              else dataclasses.replace(q, bindings=((into_events_x, "call_hangup"),)))
    baseline = Topology((), (Queue("lever-baseline", "consumer", {"x-queue-type": "quorum"}, ()),))
    return [
        Variant("shipped", "as shipped (entry fanout, topic events + tap, quorum ledger)", shipped,
                entry_exchange(shipped_x), "call_hangup"),
        Variant("stream_ledger", "the ledger as a stream", stream, entry_exchange(stream_x), "call_hangup"),
        Variant("classic_ledger", "the ledger as a classic queue (version 2)", classic, entry_exchange(classic_x),
                "call_hangup"),
        Variant("no_ledger", "no ledger ([reconcile] enabled = false)", no_ledger, entry_exchange(no_ledger_x),
                "call_hangup"),
        Variant("direct", "direct events and tap exchanges", direct, entry_exchange(direct_x), "call_hangup"),
        Variant("tap_first", "no entry fanout: into the tap, bound to events with #", tap_first,
                tap_exchange(tap_first_x), "call_hangup", ((tap_first_x, tap_exchange(tap_first_x), "#"),)),
        Variant("into_events", "into the events exchange, the ledger bound there*", into_events, into_events_x,
                "call_hangup"),
        Variant("baseline", "the minimal ingress's: default exchange, one queue", baseline, "", "lever-baseline"),
    ]


async def publish_for(publisher: Publisher, variant: Variant, body: bytes, seconds: float) -> int:
    """Publishes with IN_FLIGHT in flight until `seconds` have passed; returns how many were confirmed."""
    deadline = time.monotonic() + seconds
    done = 0

    async def sender() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            properties = webhook_properties(uuid.uuid4().hex, datetime.now(timezone.utc), "127.0.0.1")
            await publisher.publish(body, variant.exchange, variant.routing_key, properties)
            done += 1

    await asyncio.gather(*(sender() for _ in range(IN_FLIGHT)))
    return done


async def measure(url: str, config: Config, body: bytes, seconds: float, rounds: int,
                  broker_cpu_s: Callable[[], float], report: Callable[[str], None]) -> dict:
    """Every variant once per round, in order; the rounds' figures and their medians."""
    connection = await aio_pika.connect(url)
    try:
        chosen = variants(config)
        channel = await connection.channel()
        for variant in chosen:
            await declare(connection, variant.topology)
            for destination, source, key in variant.exchange_bindings:
                await (await channel.get_exchange(destination)).bind(source, key)
        publisher = await Publisher.open(connection, timeout=30)
        for variant in chosen:  # the node's first seconds under load are slower: warm it up, unmeasured
            await publish_for(publisher, variant, body, 1.0)
        results: dict = {v.name: {"title": v.title, "rounds": []} for v in chosen}
        for _ in range(rounds):
            for variant in chosen:
                cpu, started = broker_cpu_s(), time.perf_counter()
                count = await publish_for(publisher, variant, body, seconds)
                elapsed, cpu = time.perf_counter() - started, broker_cpu_s() - cpu
                figures = {"msgs_s": round(count / elapsed), "broker_cpu_us": round(cpu * 1e6 / count, 1)}
                results[variant.name]["rounds"].append(figures)
                report(f"  lever {variant.name}: {figures['msgs_s']} msgs/s, broker {figures['broker_cpu_us']} us per message")
                for queue in variant.topology.queues:
                    if queue.arguments.get("x-queue-type") != "stream":  # a stream cannot be purged
                        await (await channel.get_queue(queue.name)).purge()
        for entry in results.values():
            for key in ("msgs_s", "broker_cpu_us"):
                entry[key] = statistics.median(r[key] for r in entry["rounds"])
        for entry in results.values():
            entry["broker_cpu_vs_shipped"] = round(entry["broker_cpu_us"] / results["shipped"]["broker_cpu_us"], 2)
        return results
    finally:
        await connection.close()

