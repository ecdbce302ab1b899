"""Dead-letter tools: list, show, replay, purge, export and import the letters in CONSUMER.EVENT.dlq.

Every command that takes letters is one `sweep`: a pass over the letters the DLQ held when it began.
A sweep never hands a letter back to the broker. On a quorum queue every requeue (a nack, or a
channel closed with letters unacked) counts as a delivery, and at the delivery limit (RabbitMQ 4.x
gives every quorum queue 20; an operator policy can set one on 3.x) a DLQ, which has no dead-letter
target, drops the letter. Instead each letter the sweep takes is published again, confirmed, and only
then acked:
- kept (list, show, export, and the letters replay does not choose): a copy at the DLQ's tail. After a
  whole pass the DLQ holds the same letters in the same order; a pass that stops early (`show
  --limit`) has moved the letters it read to the back.
- moved (replay): into its consumer's own queue, attempt count reset.
A sweep killed half way loses nothing: a letter is in the DLQ, or in its new place, or, if its copy
was confirmed but the letter not yet acked, in both. A copy carries the sweep's id, so a pass that
meets its own copies (another reader took some letters meanwhile) stops there and says it was cut short.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import decimal
import os
import secrets
import stat
import sys
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from typing import Any, BinaryIO, TypeVar, cast

import aiormq
import orjson
from aio_pika.abc import AbstractConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from ..config import Config
from ..errors import BrokerUnavailable, CannotWrite, CutShort, HipcallError, NotADeadLetterQueue, QueueMissing
from ..message import SWEEP_HEADER, call_uuid, delivery_tag, fresh_headers, id_of, own_headers, parse_body, republish_properties
from ..publish import Publisher
from ..topology import Queue, declare, plan

IN_FLIGHT = 500  # republishes awaiting their confirm at once
PREFETCH = 200  # letters a sweep takes at once (a window): bounds its memory whatever the DLQ's size
EXPORT_ENVELOPE = 1 << 20  # bytes of an export line besides the body: headers (an error of 1 KiB), properties
IDLE = 2.0  # seconds without a delivery after which a sweep decides someone else holds the rest
SEARCH_LIMIT = 100  # letters a search holds per queue: one call has a handful of events
HELD_OVERHEAD = 2048  # bytes a held letter costs besides its body: its headers, the objects around it
T = TypeVar("T")


def dead_letter_queues(config: Config) -> list[Queue]:
    return [q for q in plan(config.broker, config.consumers).queues if q.kind == "dlq"]


def find_dlq(config: Config, name: str) -> Queue:
    for queue in dead_letter_queues(config):
        if queue.name == name:
            return queue
    known = ", ".join(q.name for q in dead_letter_queues(config))
    raise NotADeadLetterQueue(f"{name!r} is not a dead-letter queue of this configuration (DLQs: {known})")


def delivery_limit(config: Config, dlq: Queue) -> int | None:
    """The delivery limit of the consumer queue whose DLQ this is."""
    source = dlq.name.removesuffix(".dlq")
    for queue in plan(config.broker, config.consumers).queues:
        if queue.name == source:
            return queue.arguments.get("x-delivery-limit")
    return None


_BROKER_REASONS = {
    "rejected": "rejected by a consumer that is not hipcall-ingest's worker (basic.reject or nack without requeue)",
    "expired": "its time to live ran out in {queue}",
    "maxlen": "{queue} was full",
}


@dataclass(frozen=True)
class Letter:
    """One dead letter, either kind: ours (x-hipcall-* headers) or the broker's (x-death)."""

    message: DeliveredMessage  # aiormq's, as delivered: no wrapper per letter
    limit: int | None = None  # the source queue's delivery limit, for the broker's delivery_limit letters
    queue_kind: str = "dlq"  # or "unrouted": a webhook no consumer subscribed to, not a failure

    @property
    def properties(self) -> Basic.Properties:
        return self.message.header.properties

    @property
    def tag(self) -> int:
        return delivery_tag(self.message)

    @cached_property
    def headers(self) -> dict[str, Any]:
        return dict(self.properties.headers or {})

    @property
    def id(self) -> str:
        return id_of(self.properties.message_id, self.message.body)

    @property
    def kind(self) -> str:
        return "worker" if "x-hipcall-error" in self.headers else "broker"

    @property
    def _death(self) -> dict[str, Any]:
        deaths = self.headers.get("x-death") or []
        return deaths[0] if deaths and isinstance(deaths[0], dict) else {}

    @property
    def _reason(self) -> str:
        return str(self._death.get("reason") or self.headers.get("x-first-death-reason") or "unknown")

    @cached_property
    def _facts(self) -> tuple[str | None, str | None]:
        """(event, call uuid), from one parse of the body that is not kept: a letter held for a listing
        holds its body's bytes, not a parsed copy (several times their size)."""
        payload = self.payload_or_text if "payload_or_text" in self.__dict__ else _parsed(self.message.body)
        if not isinstance(payload, dict):
            return None, None
        event = payload.get("event")
        return (event if isinstance(event, str) else None), call_uuid(payload)

    @property
    def event(self) -> str | None:
        return self._facts[0]

    @property
    def call_uuid(self) -> str | None:
        return self._facts[1]

    @property
    def size(self) -> int:
        """Bytes this letter holds, near enough: its body and headers (the bound of a read's memory)."""
        return len(self.message.body) + HELD_OVERHEAD

    @cached_property
    def payload_or_text(self) -> Any:
        """The body parsed, for display; as text when it is not JSON (or nests too deep to parse)."""
        return _parsed(self.message.body)

    @property
    def attempts(self) -> int | str | None:
        """Times a handler had it: our count, or for the broker's delivery limit, the limit plus one.
        A header that is not a count (a foreign producer's, a damaged one) is shown as it is."""
        if "x-hipcall-attempts" in self.headers:
            value = self.headers["x-hipcall-attempts"]
            try:
                return int(value)
            except (TypeError, ValueError):
                return _as_text(value)
        if self.kind == "broker" and self._reason == "delivery_limit" and self.limit is not None:
            return self.limit + 1
        return None

    @property
    def error_type(self) -> str:
        if self.queue_kind == "unrouted":
            return "unrouted"
        if self.kind == "worker":
            return str(self.headers.get("x-hipcall-error-type"))
        return f"broker:{self._reason}"

    @property
    def error(self) -> str:
        if self.queue_kind == "unrouted":
            return f"no consumer subscribed to {self.event or 'its event'} when it arrived (`unrouted replay` moves it)"
        if self.kind == "worker":
            return str(self.headers.get("x-hipcall-error"))
        queue = self._death.get("queue") or "its queue"
        if self._reason == "delivery_limit":
            times = f"{self.attempts} times" if self.attempts else "too often"
            return (f"dead-lettered by RabbitMQ (delivery_limit): delivered {times} from {queue}, its worker "
                    f"crashed or lost its connection each time")
        reason = _BROKER_REASONS.get(self._reason, "dead-lettered by RabbitMQ ({reason})")
        return reason.format(queue=queue, reason=self._reason)

    @property
    def failed_at(self) -> str | None:
        if self.kind == "worker":
            value = self.headers.get("x-hipcall-failed-at")
            return None if value is None else _as_text(value)
        time = self._death.get("time")
        return time.astimezone(timezone.utc).isoformat() if isinstance(time, datetime) else None

    def summary(self) -> dict[str, Any]:
        return {"message_id": self.id, "event": self.event, "call_uuid": self.call_uuid,
                "kind": self.kind, "attempts": self.attempts, "error_type": self.error_type, "error": self.error,
                "failed_at": self.failed_at}

    @property
    def failed_time(self) -> datetime | None:
        """failed_at as a time (UTC when the letter gives no zone); None when it is not one."""
        return _time(self.failed_at)


@dataclass(frozen=True)
class Filter:
    """Which letters a read, a replay or a search takes; a field left empty takes every letter."""

    events: tuple[str, ...] = ()
    ids: frozenset[str] = frozenset()  # a set: a replay of 29,000 ids costs a lookup per letter, not a scan
    grep: str | None = None  # text in the body or the error
    call_uuid: str | None = None
    failed_after: datetime | None = None
    failed_before: datetime | None = None

    def __bool__(self) -> bool:
        return self != Filter()

    def matches(self, letter: Letter) -> bool:
        if self.events and letter.event not in self.events:
            return False
        if self.ids and letter.id not in self.ids:
            return False
        if self.call_uuid and letter.call_uuid != self.call_uuid:
            return False
        if self.failed_after or self.failed_before:
            failed = letter.failed_time
            if failed is None or (self.failed_after and failed < self.failed_after) or (
                    self.failed_before and failed >= self.failed_before):
                return False
        if self.grep and self.grep not in letter.message.body.decode("utf-8", "replace") and self.grep not in letter.error:
            return False
        return True


@dataclass
class Swept:
    """What one pass did."""

    queue: str
    total: int  # letters in the DLQ when the pass began
    seen: int = 0
    moved: int = 0
    stopped: bool = False  # the caller had enough (a limit), so not every letter was read
    met_own_copy: bool = False

    @property
    def cut_short(self) -> bool:
        return not self.stopped and self.seen < self.total

    def check(self) -> None:
        if self.cut_short:
            raise CutShort(f"read {self.seen} of the {self.total} letters in {self.queue}: another reader "
                           f"(a replay, a worker, a second dlq command) held the rest meanwhile; nothing was "
                           f"lost, run it again")


# A letter -> where to move it: a queue name (through the default exchange) or (exchange, routing key);
# None to keep it.
Target = str | tuple[str, str]  # a queue (by the default exchange), or (exchange, routing key)
Choose = Callable[[Letter], Target | None]


async def sweep(connection: AbstractConnection, config: Config, dlq: Queue, choose: Choose, *,
                enough: Callable[[], bool] = lambda: False, prefetch: int = PREFETCH,
                progress: Callable[[int], None] = lambda moved: None, window_bytes: int | None = None) -> Swept:
    """One pass over the letters `dlq` holds now; each is kept or moved as `choose` says (see above).
    With `window_bytes`, a window (the letters taken at once) holds about that many bytes at most: the
    first is sized for letters of http.max_body_bytes, each later one for the largest letter met so far."""
    limit = delivery_limit(config, dlq)
    mark = secrets.token_hex(8)
    timeout = config.broker.publish_timeout  # every request to the broker is answered within it, or it is gone
    publisher = await answered(Publisher.open(connection, timeout, IN_FLIGHT), "open a channel", timeout)
    try:
        channel = await answered(connection.channel(), "open a channel", timeout)
    except BaseException:
        await _close(publisher, timeout)
        raise
    failures: list[BaseException] = []
    try:
        declared = await _passive(channel, dlq.name, timeout)
        result = Swept(dlq.name, declared.declaration_result.message_count or 0)
        letters = await channel.get_underlay_channel()  # aiormq's channel: consume, qos, acks

        async def replace(letter: Letter, target: Target | None, now: str) -> bool:
            """Publish what replaces the letter: True once the broker stored it."""
            if target is None:
                headers = {**own_headers(letter.headers), SWEEP_HEADER: mark}
            else:
                headers = {**fresh_headers(letter.headers), "x-hipcall-replayed-at": now}
            exchange, key = target if isinstance(target, tuple) else ("", target or dlq.name)
            try:
                await publisher.publish(letter.message.body, exchange, key,
                                        republish_properties(letter.properties, letter.message.body, headers))
                return True
            except Exception as exc:
                failures.append(exc)
                return False

        async def settle(window: list[tuple[Letter, Target | None]]) -> None:
            """Replace every letter of a window, then ack the originals whose replacement is stored.

            One ack with multiple=True for a whole window: RabbitMQ 3.10's quorum-queue client holds
            back settles past a few dozen in flight and drops them if the channel closes first, which
            returned (and counted a delivery for) the tail of the last window when a command exited."""
            now = datetime.now(timezone.utc).isoformat()
            stored = await asyncio.gather(*(replace(letter, target, now) for letter, target in window))
            if window and all(stored):
                await answered(letters.basic_ack(max(letter.tag for letter, _ in window), multiple=True), "basic.ack",
                               timeout)
            else:
                for (letter, _), ok in zip(window, stored):
                    if ok:
                        await answered(letters.basic_ack(letter.tag), "basic.ack", timeout)
            for (_, target), ok in zip(window, stored):
                if ok and target is not None:
                    result.moved += 1
                    if result.moved % 1000 == 0:
                        progress(result.moved)

        inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()

        async def deliver(message: DeliveredMessage) -> None:
            inbox.put_nowait(message)

        async def consume(window: int) -> str:
            await answered(letters.basic_qos(prefetch_count=window), "basic.qos", timeout)
            consumer = await answered(letters.basic_consume(dlq.name, deliver), f"consume {dlq.name}", timeout)
            return cast(str, consumer.consumer_tag)  # the broker names it

        async def take(window: int) -> list[DeliveredMessage]:
            """The next `window` letters, or fewer if nothing more comes for IDLE seconds."""
            taken: list[DeliveredMessage] = []
            try:
                while len(taken) < window:
                    if inbox.empty():  # a timed wait only when there is nothing to take at once
                        taken.append(await asyncio.wait_for(inbox.get(), IDLE))
                    else:
                        taken.append(inbox.get_nowait())
            except TimeoutError:
                pass
            return taken

        # Exactly the letters the pass settles are delivered: the prefetch is the window, and before any
        # letter of a window is acked the consumer is cancelled if the pass is done, or replaced by one
        # with a smaller prefetch for a last, shorter window (RabbitMQ fixes a consumer's prefetch when
        # it starts: a later basic.qos does not change it).
        largest = config.http.max_body_bytes + HELD_OVERHEAD  # until a window shows what the letters weigh
        met = 0  # the largest letter met so far

        def window_for(remaining: int) -> int:
            """Letters to take next: `prefetch`, fewer if that many would pass window_bytes, at most `remaining`."""
            fits = prefetch if window_bytes is None else max(1, window_bytes // largest)
            return max(0, min(prefetch, fits, remaining))

        window = max(1, window_for(result.total))
        tag = None
        try:
            if result.total:
                tag = await consume(window)
            while tag is not None:
                taken = await take(window)
                settling: list[tuple[Letter, Target | None]] = []
                if taken:  # the next window is sized for the largest letter met so far
                    met = max(met, max(len(message.body) for message in taken) + HELD_OVERHEAD)
                    largest = 1 << (met - 1).bit_length()  # a power of two: the window changes seldom
                for message in taken:  # in order: `choose` sees the letters as they stand in the queue
                    letter = Letter(message, limit, dlq.kind)
                    if letter.headers.get(SWEEP_HEADER) == mark:  # our own copy: every original here was read
                        result.met_own_copy = True
                    if result.met_own_copy or result.seen >= result.total or enough():
                        settling.append((letter, None))  # delivered but not needed: kept (a requeue would count)
                        continue
                    result.seen += 1
                    settling.append((letter, choose(letter)))
                following = window_for(result.total - result.seen)
                done = len(taken) < window or result.met_own_copy or not following or enough()
                if done or following != window:
                    await answered(letters.basic_cancel(tag), "basic.cancel", timeout)
                    tag = None
                if done:
                    result.stopped = result.seen < result.total and enough()
                    if len(taken) < window:  # a delivery may have come after the wait gave up
                        await asyncio.sleep(0.05)
                    while not inbox.empty():
                        settling.append((Letter(inbox.get_nowait(), limit, dlq.kind), None))
                elif tag is None:
                    window = following
                    tag = await consume(window)
                await settle(settling)  # acked only now; the broker then sends the next window
                if failures:
                    break
        except Exception as exc:  # the channel is gone, or the broker does not answer
            failures.append(exc)  # letters not yet settled go back when the channel closes
        if failures:  # ours say why; anything else is the connection failing under the pass
            first = failures[0]
            kind = HipcallError if isinstance(first, HipcallError) and not isinstance(first, BrokerUnavailable) \
                else BrokerUnavailable
            why = first if isinstance(first, HipcallError) else f"the connection to RabbitMQ failed ({type(first).__name__}: {first})"
            raise kind(f"stopped after {result.seen} letters ({result.moved} moved); the rest are still in "
                       f"{dlq.name}: {why}")
        return result
    finally:
        await _close(channel, timeout)
        await _close(publisher, timeout)


@dataclass
class Stats:
    """`dlq list`'s figures for one DLQ, gathered letter by letter (nothing held)."""

    messages: int = 0
    oldest_failure: str | None = None  # as the letter spells it
    errors: collections.Counter = field(default_factory=collections.Counter)
    _oldest: datetime | None = None

    def add(self, letter: Letter) -> None:
        self.messages += 1
        failed = letter.failed_time  # a failed-at that is not a time is no "oldest failure"
        if failed is not None and (self._oldest is None or failed < self._oldest):
            self._oldest, self.oldest_failure = failed, letter.failed_at
        self.errors[letter.error_type] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"messages": self.messages, "oldest_failure": self.oldest_failure,
                "top_errors": [{"type": t, "count": c} for t, c in self.errors.most_common(3)]}


async def replay(connection: AbstractConnection, config: Config, dlq: Queue, *, limit: int | None,
                 which: Filter, progress: Callable[[int], None]) -> Swept:
    """Move the chosen letters back to their consumer's own queue, attempt count reset; keep the rest."""
    target = dlq.name.removesuffix(".dlq")
    chosen = 0

    def choose(letter: Letter) -> str | None:
        nonlocal chosen
        if (limit is None or chosen < limit) and which.matches(letter):
            chosen += 1
            return target
        return None

    # Without a filter, a limit needs only the first `limit` letters; with one, every letter is examined.
    return await sweep(connection, config, dlq, choose, progress=progress,
                       enough=lambda: limit is not None and chosen >= limit,
                       prefetch=PREFETCH if which or limit is None else max(1, min(limit, PREFETCH)))


@dataclass
class Read:
    """What `read` found: up to `limit` matching letters, and how many matched in all."""

    letters: list[Letter]
    matched: int
    swept: Swept
    cut_at_bytes: bool = False  # fewer than `limit` held: the next would have passed max_bytes


async def read(connection: AbstractConnection, config: Config, queue: Queue, which: Filter, limit: int,
               offset: int = 0, max_bytes: int | None = None) -> Read:
    """The letters of a DLQ (or the unrouted queue) that match, `limit` of them held after skipping the
    first `offset` (a page), in one whole pass: the queue is left as it was, in the same order (see sweep).
    With `max_bytes`, the letters held and the sweep's window each stay within about that many bytes,
    whatever their size."""
    found = Read([], 0, Swept(queue.name, 0))
    held = 0

    def choose(letter: Letter) -> None:
        nonlocal held
        if which.matches(letter):
            found.matched += 1
            if found.matched > offset and len(found.letters) < limit and not found.cut_at_bytes:
                if max_bytes is not None and found.letters and held + letter.size > max_bytes:
                    found.cut_at_bytes = True
                else:
                    found.letters.append(letter)
                    held += letter.size
        return None

    found.swept = await sweep(connection, config, queue, choose, window_bytes=max_bytes)
    return found


@dataclass
class Found:
    """What `find_letter` found: the letter, and its call's other letters in that queue (summaries)."""

    letter: Letter | None
    same_call: list[dict[str, Any]]
    swept: Swept


async def find_letter(connection: AbstractConnection, config: Config, queue: Queue, message_id: str,
                      max_bytes: int | None = None) -> Found:
    """One pass for a letter and the other letters of its call in the same queue (a letter page's
    two questions, one sweep). Until the letter is met, each call's letters are kept as summaries
    (SEARCH_LIMIT per call), the only ones that can be its call's."""
    found = Found(None, [], Swept(queue.name, 0))
    before: collections.defaultdict[str, list[dict[str, Any]]] = collections.defaultdict(list)

    def brief(letter: Letter) -> dict[str, Any]:
        return {**letter.summary(), "error": letter.error[:200]}

    def choose(letter: Letter) -> None:
        uuid = letter.call_uuid
        if found.letter is None:
            if letter.id == message_id:
                found.letter = letter
                found.same_call = before.pop(uuid, []) if uuid else []
                before.clear()
            elif uuid and len(before[uuid]) < SEARCH_LIMIT:
                before[uuid].append(brief(letter))
        elif uuid and uuid == found.letter.call_uuid and len(found.same_call) < SEARCH_LIMIT:
            found.same_call.append(brief(letter))
        return None

    found.swept = await sweep(connection, config, queue, choose, window_bytes=max_bytes)
    return found


def searched_queues(config: Config) -> list[Queue]:
    """Where a webhook that failed, or that no consumer took, waits: every DLQ, then the unrouted queue."""
    topology = plan(config.broker, config.consumers)
    return [q for q in topology.queues if q.kind == "dlq"] + [q for q in topology.queues if q.kind == "unrouted"]


async def search(connection: AbstractConnection, config: Config, which: Filter, limit: int = SEARCH_LIMIT,
                 hold: Callable[[Queue], AbstractAsyncContextManager[Any]] = lambda queue: contextlib.nullcontext()
                 ) -> list[tuple[Queue, Read]]:
    """`read` over every DLQ and the unrouted queue (a queue never declared is skipped): "what happened
    to this call?" with Filter(call_uuid=...). Each queue is read inside `hold(queue)` (the console's
    lock on it)."""
    found = []
    for queue in searched_queues(config):
        async with hold(queue):
            try:
                found.append((queue, await read(connection, config, queue, which, limit)))
            except QueueMissing:
                continue
    return found


async def replay_unrouted(connection: AbstractConnection, config: Config, *, limit: int | None,
                          events: list[str] | None, progress: Callable[[int], None]) -> Swept:
    """Move the unrouted queue's webhooks whose event the enabled consumers now subscribe to (a consumer
    added, a queue deleted and declared again) to the events exchange, which routes each to every
    queue of its event; the rest stay. The topology is declared first, so no event it moves can find
    no queue and come back."""
    topology = plan(config.broker, config.enabled_consumers, config.reconcile)
    await declare(connection, topology)
    subscribed = {event for consumer in config.enabled_consumers for event in consumer.events}
    unrouted = next(q for q in topology.queues if q.kind == "unrouted")
    chosen = 0

    def choose(letter: Letter) -> tuple[str, str] | None:
        nonlocal chosen
        event = letter.event
        if event in subscribed and (not events or event in events) and (limit is None or chosen < limit):
            chosen += 1
            return config.broker.exchange, event
        return None

    return await sweep(connection, config, unrouted, choose, progress=progress,
                       enough=lambda: limit is not None and chosen >= limit)


async def answered(request: Awaitable[T], what: str, timeout: float) -> T:
    """A request to the broker, or BrokerUnavailable naming RabbitMQ once `timeout` passed without its
    answer: a broker that stops answering (a partition, a paused node) keeps the TCP connection open,
    so without a deadline the request would wait until it answers again."""
    try:
        return await asyncio.wait_for(request, timeout)
    except TimeoutError:
        raise BrokerUnavailable(f"RabbitMQ did not answer ({what}) within {timeout:g} s") from None


async def _passive(channel, name: str, timeout: float):
    try:
        return await answered(channel.declare_queue(name, passive=True), f"declare {name}", timeout)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueMissing(f"{name} does not exist on the broker; `hipcall-ingest topology` declares it") from None


async def purge(connection: AbstractConnection, config: Config, dlq: Queue, count: int) -> int:
    """Delete the first `count` letters of `dlq` (the ones a count just taken saw) and none that came
    after them: never queue.purge(), which deletes whatever is there when it runs. Each window is taken
    by a consumer whose prefetch is at most what is left to delete, so every letter delivered is one to
    delete and none is handed back (a requeue counts as a delivery); a window is acked once taken.
    Fewer are deleted only when fewer are there (another reader holds some meanwhile)."""
    timeout = config.broker.publish_timeout
    channel = await answered(connection.channel(), "open a channel", timeout)
    try:
        await _passive(channel, dlq.name, timeout)
        letters = await channel.get_underlay_channel()
        inbox: asyncio.Queue[DeliveredMessage] = asyncio.Queue()  # emptied by every window

        async def deliver(message: DeliveredMessage) -> None:
            inbox.put_nowait(message)

        deleted = 0
        while deleted < count:
            window = min(PREFETCH, count - deleted)
            await answered(letters.basic_qos(prefetch_count=window), "basic.qos", timeout)
            consumer = await answered(letters.basic_consume(dlq.name, deliver), f"consume {dlq.name}", timeout)
            tag = cast(str, consumer.consumer_tag)  # the broker names it
            taken: list[DeliveredMessage] = []
            with contextlib.suppress(TimeoutError):
                while len(taken) < window:
                    taken.append(await asyncio.wait_for(inbox.get(), IDLE))
            await answered(letters.basic_cancel(tag), "basic.cancel", timeout)
            if len(taken) < window:  # a delivery may have come after the wait gave up: it is one to delete too
                await asyncio.sleep(0.05)
                while not inbox.empty():
                    taken.append(inbox.get_nowait())
            if taken:
                await answered(letters.basic_ack(max(delivery_tag(m) for m in taken), multiple=True), "basic.ack",
                               timeout)
            deleted += len(taken)
            if len(taken) < window:
                break
        return deleted
    finally:
        await _close(channel, timeout)


async def _close(closable: Any, timeout: float) -> None:
    """Close a channel (or a publisher's) within `timeout`; one the broker does not answer for is left to
    the connection's fate (its letters go back when that closes)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(closable.close(), timeout)


async def count(connection: AbstractConnection, name: str, timeout: float) -> int:
    channel = await answered(connection.channel(), "open a channel", timeout)
    try:
        return (await _passive(channel, name, timeout)).declaration_result.message_count or 0
    finally:
        await _close(channel, timeout)


# --- export / import: JSON lines with the body byte for byte -----------------------------------------
# AMQP header values are tagged where JSON has no type of their own: bytes, decimals, timestamps.


def json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, decimal.Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$datetime"}:
            return datetime.fromisoformat(value["$datetime"])
        if set(value) == {"$bytes"}:
            return bytearray(base64.b64decode(value["$bytes"], validate=True))  # AMQP's byte array
        if set(value) == {"$decimal"}:
            return decimal.Decimal(value["$decimal"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def export_line(letter: Letter) -> bytes:
    p = letter.properties
    return orjson.dumps({
        "body_base64": base64.b64encode(letter.message.body).decode(),
        # x-delivery-count is the broker's bookkeeping of this queue, not the letter's
        "headers": json_value(own_headers(letter.headers)),
        "properties": json_value({"message_id": letter.id, "content_type": p.content_type,
                                "content_encoding": p.content_encoding, "timestamp": p.timestamp,
                                "app_id": p.app_id, "type": p.message_type, "correlation_id": p.correlation_id}),
    }) + b"\n"


async def export(connection: AbstractConnection, config: Config, dlq: Queue, path: str) -> int:
    """Write every letter to `path`: `-` is stdout; a device, a FIFO (or a link to one) is written as it
    is; a regular file (through a link, to the file it points at) or a new path is written under a
    temporary name and renamed once complete, so a failed export leaves no file behind."""
    if path == "-":
        return await _export_to(connection, config, dlq, sys.stdout.buffer)
    target = os.path.realpath(path)  # a link is written through, never replaced
    try:
        special = not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as exc:
        raise CannotWrite(f"cannot write {path}: {exc.strerror}") from None
    try:
        if special:
            with open(target, "wb") as out:
                return await _export_to(connection, config, dlq, out)
        partial = f"{target}.partial-{os.getpid()}"
        try:
            with open(partial, "wb") as out:
                written = await _export_to(connection, config, dlq, out)
                os.fsync(out.fileno())
            os.replace(partial, target)
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return written
    except OSError as exc:  # a missing directory, a full disk (/dev/full), no permission
        raise CannotWrite(f"cannot write {path}: {exc.strerror or exc}") from None


async def _export_to(connection: AbstractConnection, config: Config, dlq: Queue, out: BinaryIO) -> int:
    written = 0

    def choose(letter: Letter) -> None:
        nonlocal written
        out.write(export_line(letter))  # before the letter is settled: a failure leaves it in the DLQ
        written += 1

    swept = await sweep(connection, config, dlq, choose)
    swept.check()
    out.flush()
    return written


def _parse_export_line(number: int, line: bytes) -> tuple[bytes, Basic.Properties]:
    try:
        record = orjson.loads(line)
        body = base64.b64decode(record["body_base64"], validate=True)
        p = _from_json(record.get("properties", {}))
        properties = Basic.Properties(delivery_mode=2, headers=_from_json(record.get("headers", {})),
                                      message_id=p.get("message_id") or id_of(None, body),
                                      content_type=p.get("content_type"),
                                      content_encoding=p.get("content_encoding"), timestamp=p.get("timestamp"),
                                      app_id=p.get("app_id"), message_type=p.get("type"),
                                      correlation_id=p.get("correlation_id"))
    except (ValueError, KeyError, TypeError, AttributeError, decimal.InvalidOperation) as exc:
        raise HipcallError(f"line {number}: not a dead letter of `dlq export` ({type(exc).__name__}: {exc})") from None
    return body, properties


def read_export(file: BinaryIO, max_line: int) -> list[tuple[bytes, Basic.Properties]]:
    """Every letter of an export file, parsed before anything is published (a file with a bad line
    changes nothing). A line longer than `max_line` bytes (no dead letter is: /dev/zero, say) is an
    error naming it, read in bounded memory."""
    letters: list[tuple[bytes, Basic.Properties]] = []
    for number, line in enumerate(iter(lambda: file.readline(max_line + 1), b""), 1):
        if len(line) > max_line:
            raise HipcallError(f"line {number}: longer than {max_line} bytes, which no dead letter of "
                               f"`dlq export` is (http.max_body_bytes, base64-encoded, with its headers)")
        if line.strip():
            letters.append(_parse_export_line(number, line))
    return letters


def max_export_line(config: Config) -> int:
    """The longest line `dlq export` can write for a body the ingress accepts: base64 plus the envelope."""
    return (config.http.max_body_bytes + 2) // 3 * 4 + EXPORT_ENVELOPE


async def import_letters(connection: AbstractConnection, config: Config, dlq: Queue,
                         letters: list[tuple[bytes, Basic.Properties]]) -> int:
    publisher = await Publisher.open(connection, config.broker.publish_timeout, IN_FLIGHT)
    try:
        await asyncio.gather(*(publisher.publish(body, "", dlq.name, properties) for body, properties in letters))
    finally:
        await publisher.close()
    return len(letters)


def _parsed(body: bytes) -> Any:
    try:
        return parse_body(body)
    except orjson.JSONDecodeError:
        return body.decode("utf-8", "replace")


def _as_text(value: Any) -> str:
    """A header value as it is, for display."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")[:100]
    return str(value)[:100]


def _time(text: str | None) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
    if moment is not None and moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment
