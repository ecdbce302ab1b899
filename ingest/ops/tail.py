"""`hipcall-ingest tail`: print webhooks as they arrive, taking nothing from the real consumers.

Its own exclusive, auto-delete queue is bound to the tap exchange, which gets a copy of every webhook
from the entry exchange: binding there gives no event a route, so an unsubscribed event still lands in
the unrouted queue while tail runs. The broker removes the queue when the connection closes (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from ..broker import connect
from ..config import Config
from ..lifecycle import stop_event
from ..message import call_uuid, parse_body
from ..names import tap_exchange
from ..topology import Topology, declare, plan


def tail_line(message: AbstractIncomingMessage) -> str:
    payload: Any
    try:
        payload = parse_body(message.body)
    except orjson.JSONDecodeError:
        payload = {}
    raw = payload.get("data") if isinstance(payload, dict) else None
    data: dict = raw if isinstance(raw, dict) else {}
    when = message.timestamp.strftime("%H:%M:%S") if message.timestamp else "--:--:--"
    parts = [when, f"{message.routing_key or '?':<14}", (message.message_id or "")[:12]]
    if uuid := call_uuid(payload):
        parts.append(uuid)
    if data.get("direction"):
        parts.append(f"{data['direction']} {data.get('caller_number') or '?'} -> {data.get('callee_number') or '?'}")
    return "  ".join(parts)


async def tail(config: Config, events: Sequence[str]) -> None:
    connection = await connect(config.broker, "hipcall-ingest tail")
    stop = stop_event(None)
    async with connection:
        exchanges = plan(config.broker, config.enabled_consumers).exchanges
        await declare(connection, Topology(exchanges, ()))  # the tap exists before we bind to it
        channel = await connection.channel()
        name = f"hipcall-ingest.tail.{os.getpid()}.{secrets.token_hex(4)}"
        queue = await channel.declare_queue(name, exclusive=True, auto_delete=True, durable=False)
        for key in events or ["#"]:
            await queue.bind(tap_exchange(config.broker.exchange), key)

        async def show(message: AbstractIncomingMessage) -> None:
            print(tail_line(message), flush=True)

        await queue.consume(show, no_ack=True)
        print(f"tailing {tap_exchange(config.broker.exchange)} ({', '.join(events) or 'all events'}) through {name}; Ctrl-C stops",
              file=sys.stderr, flush=True)
        closed = asyncio.ensure_future(connection.closed())
        await asyncio.wait([asyncio.ensure_future(stop.wait()), closed], return_when=asyncio.FIRST_COMPLETED)
