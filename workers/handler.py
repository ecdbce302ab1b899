"""The handler API: what a user's code receives (Event), how it says "never retry"
(PermanentError), and how a `module:name` from the config becomes something the runtime can call.

A handler is one of:
- a function, `async def handle(event)` or `def handle(event)` (a plain function runs in one of the
  consumer's `concurrency` threads so it cannot block the event loop; whatever awaitable it returns,
  a decorated async function's coroutine say, is awaited);
- a class with `handle(event)` (async or not) and, optionally, `async def start(self, options)`
  and `async def close(self)`: one instance per worker process, started before the first message
  with the consumer's `[consumers.NAME.options]` table, closed at shutdown. This is where a
  connection pool or an HTTP session lives. The built-in sinks use the same mechanism.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ingest.config import ConsumerConfig, HipcallConfig, parse_duration
from ingest.errors import HandlerImportError
from ingest.message import SOURCE


class PermanentError(Exception):
    """Raise it from a handler when retrying cannot help: the message goes straight to the DLQ."""


class RetryLater(Exception):
    """Raise it when the other side said when to come back (a Retry-After): the retry takes the first of
    the consumer's remaining delays at least `seconds` long (or the longest there is)."""

    def __init__(self, seconds: float, message: str) -> None:
        super().__init__(message)
        self.seconds = seconds


@dataclass(frozen=True)
class Event:
    """One webhook as a handler sees it."""

    name: str  # the webhook's event, e.g. "call_hangup"
    data: Mapping[str, Any]  # the webhook's parsed "data" object
    id: str  # message id from the ingress; the same body always has the same id: deduplicate on it
    attempt: int  # 1 on the first delivery, 2 on the first retry, ...
    received_at: datetime | None  # when the ingress received it
    body: bytes = field(repr=False)  # the raw body, byte for byte as Hipcall sent it
    headers: Mapping[str, Any] = field(default_factory=dict, repr=False)

    @property
    def source(self) -> str:
        """How it arrived: "webhook", or "reconcile" for a call_hangup rebuilt from Hipcall's API
        (the same id as the real webhook, which may still arrive: deduplicate on `id`)."""
        return "reconcile" if self.headers.get(SOURCE) == "reconcile" else "webhook"

    @property
    def call_uuid(self) -> str | None:
        """The call's uuid for call events (data.uuid), None for the others."""
        uuid = self.data.get("uuid")
        return uuid if isinstance(uuid, str) else None


class Handler:
    """A loaded handler: call it with an Event; start and close it once per worker process."""

    def __init__(self, consumer: ConsumerConfig, target: Any, hipcall: HipcallConfig | None = None) -> None:
        self.consumer = consumer
        self._context = {"consumer": consumer, "hipcall": hipcall}  # what a start() may ask for by name
        self._instance = target() if inspect.isclass(target) else None
        function = getattr(self._instance, "handle", None) if self._instance is not None else target
        if not callable(function):
            raise HandlerImportError(
                f"consumer {consumer.name!r}: handler {consumer.handler!r} must be a function or a class with a handle(event) method"
            )
        if self._instance is None and consumer.options:
            raise HandlerImportError(
                f"consumer {consumer.name!r}: handler {consumer.handler!r} is a function, so it cannot take "
                f"[consumers.{consumer.name}.options]; use a class with async start(options)"
            )
        self._function = function
        is_async = inspect.iscoroutinefunction(function) or inspect.iscoroutinefunction(function.__call__)
        self._threads = None if is_async else ThreadPool(consumer.concurrency, f"handler-{consumer.name}")

    @property
    def busy(self) -> int:
        """Calls still running in a thread (a thread cannot be stopped; the process exits without it)."""
        return self._threads.busy if self._threads else 0

    async def start(self) -> None:
        start = getattr(self._instance, "start", None)
        if start is not None:
            # start(options), or start(options, consumer=..., hipcall=...) for the built-ins that size
            # themselves by the consumer's concurrency or call Hipcall's API
            wanted = inspect.signature(start).parameters
            await start(dict(self.consumer.options), **{k: v for k, v in self._context.items() if k in wanted})

    async def close(self) -> None:
        close = getattr(self._instance, "close", None)
        if close is not None:
            await close()

    async def __call__(self, event: Event) -> None:
        if self._threads is None:
            result = self._function(event)
        else:
            result = await self._threads.run(self._function, event)
        if inspect.isawaitable(result):
            await result


class ThreadPool:
    """`size` daemon threads for a sync handler.

    Not asyncio's default executor: it has six threads here and is joined without a timeout when the
    process exits, so one handler that never returns would keep the worker alive past its grace period.
    A call abandoned at shutdown keeps running in its daemon thread until the process exits."""

    def __init__(self, size: int, name: str) -> None:
        self._size = size
        self._name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = 0
        self.busy = 0  # calls submitted and not yet finished; read and written on the event loop only

    async def run(self, function: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self.busy >= self._threads and self._threads < self._size:
            self._threads += 1
            threading.Thread(target=self._work, name=f"{self._name}-{self._threads}", daemon=True).start()
        self.busy += 1
        self._jobs.put((loop, future, function, args))
        return await future

    def _work(self) -> None:
        while True:
            loop, future, function, args = self._jobs.get()
            outcome: tuple[Any, BaseException | None]
            try:
                outcome = (function(*args), None)
            except BaseException as exc:  # handed to the awaiting task, which decides
                outcome = (None, exc)
            try:
                loop.call_soon_threadsafe(self._finish, future, *outcome)
            except RuntimeError:  # the loop is closed: the process is exiting
                return

    def _finish(self, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
        self.busy -= 1
        if future.done():  # its task was cancelled (grace period over)
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def duration_option(options: Mapping[str, Any], key: str, default: str, handler: str) -> float:
    """A handler's option that is a duration ("10s", "2h"); HandlerImportError naming it otherwise."""
    try:
        return parse_duration(options.get(key, default))
    except Exception:  # config's own parse error, whatever the value's type
        raise HandlerImportError(f'{handler}: options.{key} must be a duration such as "{default}"') from None


def load_handler(consumer: ConsumerConfig, hipcall: HipcallConfig | None = None) -> Handler:
    """Import `module:name`; any failure is a HandlerImportError naming the consumer and the path."""
    module_name, _, attribute = consumer.handler.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise HandlerImportError(
            f"consumer {consumer.name!r}: cannot import handler {consumer.handler!r}: "
            f"{type(exc).__name__}: {exc} (is the module on PYTHONPATH or installed?)"
        ) from None
    target = getattr(module, attribute, None)
    if target is None:
        raise HandlerImportError(f"consumer {consumer.name!r}: module {module_name!r} has no {attribute!r} (handler {consumer.handler!r})")
    return Handler(consumer, target, hipcall)
