"""Dead-letter tools: list, show, replay, purge, export and import the letters in CONSUMER.EVENT.dlq.

Reading is "read and requeue": the letters are consumed without an ack and the channel is closed
afterwards, so the broker puts every one of them back. A quorum queue delivers returned messages
before the rest, in their original order, so the queue holds exactly what it held, in the same order.
The one thing a read changes is RabbitMQ's own `x-delivery-count` header, which it raises on each
redelivery; export leaves it out and replay drops it. While a read holds letters, a replay running
at the same time does not see those letters (it moves fewer); nothing can be lost either way,
because nothing is acked by a read.

Replay and import are at-least-once: a letter is acked (removed) only after the broker confirmed
its republish. A replay killed half way leaves every letter either still in the DLQ or back in its
consumer's queue, and at worst (confirmed, not yet acked) in both.
"""

from __future__ import annotations

import asyncio
import base64
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime, timezone
from typing import Any

import aiormq
import orjson
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pamqp.commands import Basic

from ingest.config import Config
from ingest.errors import HipcallError
from ingest.topology import Queue, plan

from .retry import fresh_headers, own_headers, republish_properties

IN_FLIGHT = 500  # republishes awaiting their confirm at once
IDLE = 2.0  # seconds without a delivery after which a read decides the queue has no more


class NotADeadLetterQueue(HipcallError):
    """The named queue is not one of the configured consumers' DLQs."""


def dead_letter_queues(config: Config) -> list[Queue]:
    return [q for q in plan(config.broker, config.consumers).queues if q.kind == "dlq"]


def find_dlq(config: Config, name: str) -> Queue:
    for queue in dead_letter_queues(config):
        if queue.name == name:
            return queue
    known = ", ".join(q.name for q in dead_letter_queues(config))
    raise NotADeadLetterQueue(f"{name!r} is not a dead-letter queue of this configuration (DLQs: {known})")


@dataclass(frozen=True)
class Letter:
    """One dead letter, either kind: ours (x-hipcall-* headers) or the broker's (x-death)."""

    message: AbstractIncomingMessage

    @cached_property
    def headers(self) -> dict[str, Any]:
        return dict(self.message.headers or {})

    @property
    def kind(self) -> str:
        return "worker" if "x-hipcall-error" in self.headers else "broker"

    @property
    def _death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death") or []
        return deaths[0] if deaths and isinstance(deaths[0], dict) else {}

    @property
    def event(self) -> str | None:
        return self._payload.get("event") if isinstance(self._payload.get("event"), str) else None

    @property
    def call_uuid(self) -> str | None:
        data = self._payload.get("data")
        uuid = data.get("uuid") if isinstance(data, dict) else None
        return uuid if isinstance(uuid, str) else None

    @cached_property
    def payload_or_text(self) -> Any:
        """The body parsed, for display; as text when it is not JSON."""
        try:
            return orjson.loads(self.message.body)
        except orjson.JSONDecodeError:
            return self.message.body.decode("utf-8", "replace")

    @property
    def _payload(self) -> dict:
        return self.payload_or_text if isinstance(self.payload_or_text, dict) else {}

    @property
    def attempts(self) -> int | None:
        if "x-hipcall-attempts" in self.headers:
            return int(self.headers["x-hipcall-attempts"])
        count = self._death.get("count")
        return int(count) if count is not None else None

    @property
    def error_type(self) -> str:
        if self.kind == "worker":
            return str(self.headers.get("x-hipcall-error-type"))
        return f"broker:{self._death.get('reason', 'unknown')}"

    @property
    def error(self) -> str:
        if self.kind == "worker":
            return str(self.headers.get("x-hipcall-error"))
        return f"dead-lettered by RabbitMQ ({self._death.get('reason', 'unknown')}, e.g. the worker crashed on it)"

    @property
    def failed_at(self) -> str | None:
        if self.kind == "worker":
            return str(self.headers.get("x-hipcall-failed-at"))
        time = self._death.get("time")
        return time.astimezone(timezone.utc).isoformat() if isinstance(time, datetime) else None

    def summary(self) -> dict[str, Any]:
        return {"message_id": self.message.message_id, "event": self.event, "call_uuid": self.call_uuid,
                "kind": self.kind, "attempts": self.attempts, "error_type": self.error_type, "error": self.error,
                "failed_at": self.failed_at}

    def matches(self, events: list[str] | None, ids: list[str] | None, grep: str | None) -> bool:
        if events and self.event not in events:
            return False
        if ids and self.message.message_id not in ids:
            return False
        if grep and grep not in self.message.body.decode("utf-8", "replace") and grep not in self.error:
            return False
        return True


@asynccontextmanager
async def reading(connection: AbstractConnection, queue: str) -> AsyncIterator[list[Letter]]:
    """Every letter in the queue, unacked; they go back when the block ends."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        wanted = declared.declaration_result.message_count or 0
        letters: list[Letter] = []
        if wanted:
            await channel.set_qos(prefetch_count=0)
            got = asyncio.Event()

            async def on_message(message: AbstractIncomingMessage) -> None:
                if len(letters) < wanted:
                    letters.append(Letter(message))
                if len(letters) >= wanted:
                    got.set()

            tag = await declared.consume(on_message)
            await _wait_for(got, lambda: len(letters))
            await declared.cancel(tag)
        yield letters
    finally:
        if not channel.is_closed:
            await channel.close()  # never acked: the broker returns every letter to the queue


async def _wait_for(done: asyncio.Event, progress: Callable[[], int]) -> None:
    """Until `done`, or until no new delivery came for IDLE seconds (someone else took the rest)."""
    seen = -1
    while not done.is_set():
        if progress() == seen:
            return
        seen = progress()
        try:
            await asyncio.wait_for(done.wait(), IDLE)
        except asyncio.TimeoutError:
            pass


def stats(letters: list[Letter]) -> dict[str, Any]:
    failed = sorted(l.failed_at for l in letters if l.failed_at)
    errors = collections.Counter(l.error_type for l in letters).most_common(3)
    return {"messages": len(letters), "oldest_failure": failed[0] if failed else None,
            "top_errors": [{"type": t, "count": c} for t, c in errors]}


class Republisher:
    """Publishes with up to IN_FLIGHT confirms outstanding; `send` returns once its own is confirmed."""

    def __init__(self, channel: aiormq.abc.AbstractChannel, timeout: float) -> None:
        self._channel = channel
        self._timeout = timeout
        self._slots = asyncio.Semaphore(IN_FLIGHT)

    async def send(self, body: bytes, routing_key: str, properties: Basic.Properties) -> None:
        async with self._slots:
            confirm = await self._channel.basic_publish(body, exchange="", routing_key=routing_key, properties=properties,
                                                        mandatory=True, timeout=self._timeout, wait=False)
        if not isinstance(confirm, Basic.Ack):
            raise HipcallError(f"the broker did not store a message for {routing_key!r}; it stays where it was")


async def replay(connection: AbstractConnection, config: Config, dlq: Queue, *, limit: int | None,
                 events: list[str] | None, ids: list[str] | None, progress: Callable[[int], None]) -> int:
    """Move letters back to their consumer's own queue, attempt count reset; returns how many moved."""
    target = dlq.name.removesuffix(".dlq")
    publish_channel = await connection.channel(publisher_confirms=True)
    republisher = Republisher(await publish_channel.get_underlay_channel(), config.broker.publish_timeout)
    channel = await connection.channel()
    moved = 0
    try:
        declared = await channel.declare_queue(dlq.name, passive=True)
        total = declared.declaration_result.message_count or 0
        await channel.set_qos(prefetch_count=IN_FLIGHT * 2)
        tasks: set[asyncio.Task] = set()
        seen = chosen = 0
        finished = asyncio.Event()
        failures: list[BaseException] = []

        async def move(letter: Letter) -> None:
            nonlocal moved
            try:
                headers = {**fresh_headers(letter.headers), "x-hipcall-replayed-at": datetime.now(timezone.utc).isoformat()}
                await republisher.send(letter.message.body, target, republish_properties(letter.message, headers))
                await letter.message.ack()  # only after the confirm
                moved += 1
                if moved % 1000 == 0:
                    progress(moved)
            except Exception as exc:
                failures.append(exc)
                finished.set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            nonlocal seen, chosen
            seen += 1
            letter = Letter(message)
            if (limit is None or chosen < limit) and letter.matches(events, ids, None):
                chosen += 1
                task = asyncio.create_task(move(letter))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            # letters not chosen stay unacked and return to the DLQ when the channel closes
            if seen >= total or (limit is not None and chosen >= limit):
                finished.set()

        if total:
            tag = await declared.consume(on_message)
            await _wait_for(finished, lambda: seen)
            await declared.cancel(tag)
        if tasks:
            await asyncio.gather(*tasks)
        if failures:
            raise HipcallError(f"replay stopped after {moved} moved: {failures[0]}")
    finally:
        for ch in (channel, publish_channel):
            if not ch.is_closed:
                await ch.close()
    return moved


async def purge(connection: AbstractConnection, dlq: Queue) -> int:
    channel = await connection.channel()
    async with channel:
        queue = await channel.declare_queue(dlq.name, passive=True)
        result = await queue.purge()
        return result.message_count


async def count(connection: AbstractConnection, name: str) -> int:
    channel = await connection.channel()
    async with channel:
        queue = await channel.declare_queue(name, passive=True)
        return queue.declaration_result.message_count or 0


# --- export / import: JSON lines with the body byte for byte -----------------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$datetime"}:
            return datetime.fromisoformat(value["$datetime"])
        if set(value) == {"$bytes"}:
            return base64.b64decode(value["$bytes"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def export_line(letter: Letter) -> bytes:
    m = letter.message
    return orjson.dumps({
        "body_base64": base64.b64encode(m.body).decode(),
        # x-delivery-count is the broker's bookkeeping of this queue (a read raises it), not the letter's
        "headers": _to_json(own_headers(letter.headers)),
        "properties": _to_json({"message_id": m.message_id, "content_type": m.content_type,
                                "content_encoding": m.content_encoding, "timestamp": m.timestamp,
                                "app_id": m.app_id, "type": m.type, "correlation_id": m.correlation_id}),
    }) + b"\n"


def _parse_export_line(number: int, line: bytes) -> tuple[bytes, Basic.Properties]:
    try:
        record = orjson.loads(line)
        body = base64.b64decode(record["body_base64"], validate=True)
        p = _from_json(record.get("properties", {}))
        properties = Basic.Properties(delivery_mode=2, headers=_from_json(record.get("headers", {})),
                                      message_id=p.get("message_id"), content_type=p.get("content_type"),
                                      content_encoding=p.get("content_encoding"), timestamp=p.get("timestamp"),
                                      app_id=p.get("app_id"), message_type=p.get("type"),
                                      correlation_id=p.get("correlation_id"))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise HipcallError(f"line {number}: not a dead letter of `dlq export` ({type(exc).__name__}: {exc})") from None
    return body, properties


async def import_lines(connection: AbstractConnection, config: Config, dlq: Queue, lines: list[bytes]) -> int:
    # Every line is parsed before the first publish: a file with a bad line changes nothing.
    letters = [_parse_export_line(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    channel = await connection.channel(publisher_confirms=True)
    async with channel:
        republisher = Republisher(await channel.get_underlay_channel(), config.broker.publish_timeout)
        await asyncio.gather(*(republisher.send(body, dlq.name, properties) for body, properties in letters))
    return len(letters)
