"""The built-in handlers by the names users write in the config: `workers.builtin:log` (the default
consumer) and `jsonl` here; `postgres` (workers/postgres.py, the `postgres` extra), `recordings`
(workers/recordings.py), `http_forward` (workers/forward.py) and `missed_call_task`
(workers/missed_calls.py) in modules of their own. docs/consumers.md says what each does."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import orjson
import structlog

from ingest.errors import HandlerImportError

from .forward import HttpForward
from .handler import Event, PermanentError
from .missed_calls import MissedCallTask
from .postgres import Postgres
from .recordings import Recordings

postgres = Postgres
http_forward = HttpForward
recordings = Recordings
missed_call_task = MissedCallTask

_log = structlog.get_logger("workers.builtin")


async def log(event: Event) -> None:
    """One structured log line per webhook."""
    _log.info("webhook", _event=event.name, message_id=event.id, call_uuid=event.call_uuid, attempt=event.attempt,
              source=event.source)


class jsonl:  # noqa: N801 - named as users write it in the config: "workers.builtin:jsonl"
    """Appends each event to a file as one JSON line, fsync'd before the message is acked.

    Options: path (required). Lines: {"id", "event", "source", "received_at", "attempt", "data"}. A redelivery
    can append the same id twice: deduplicate on "id" when reading.
    """

    async def start(self, options: dict[str, Any]) -> None:
        path = options.get("path")
        if not isinstance(path, str) or not path:
            raise HandlerImportError('workers.builtin:jsonl needs options.path, e.g. [consumers.NAME.options] path = "events.jsonl"')
        self._file = open(path, "ab")
        self._lock = asyncio.Lock()

    async def handle(self, event: Event) -> None:
        try:
            line = orjson.dumps(
                {"id": event.id, "event": event.name, "source": event.source, "received_at": event.received_at, "attempt": event.attempt,
                 "data": event.data}
            ) + b"\n"
        except orjson.JSONEncodeError as exc:  # nested too deep (a hostile body): no retry can help
            raise PermanentError(f"cannot write this event as one JSON line: {exc}") from None
        async with self._lock:  # one writer at a time, so lines never interleave
            await asyncio.to_thread(self._append, line)

    def _append(self, line: bytes) -> None:
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def close(self) -> None:
        self._file.close()
