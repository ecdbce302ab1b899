"""structlog set up once per process: one JSON object per line on stdout (or stderr), rendered by orjson.

The log message is under "msg", so that "event" can be the webhook's event, as users grep for it:
code logs `log.info("handled", _event=name)` and the line reads {"msg": "handled", "event": name}.
"""

import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, BinaryIO

import orjson
import structlog

from .config import LoggingConfig

# Tracebacks as data, without local variables: locals can hold tokens and passwords.
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


def configure_logging(config: LoggingConfig, process: str, stream=None) -> None:
    """Called once at start-up; afterwards every module just calls structlog.get_logger(). A command
    that prints a result on stdout logs to stderr (`stream`)."""
    stream = stream or sys.stdout
    shared: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    processors = shared + [structlog.processors.EventRenamer("msg", replace_by="_event")]
    renderer: Callable[..., Any]  # for the standard library's records, below
    factory: Callable[..., Any]
    if config.format == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False, event_key="msg")
        processors.append(renderer)
        factory = structlog.PrintLoggerFactory(stream)
    else:
        processors += [
            _TRACEBACKS,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(stream.buffer)
        renderer = structlog.processors.JSONRenderer(serializer=lambda v, **kw: orjson.dumps(v).decode())
    # Libraries (aiormq, aiohttp) log through the standard library: same format, same stdout.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared + [structlog.stdlib.add_logger_name, structlog.processors.EventRenamer("msg")],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        _TRACEBACKS, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, config.level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=process)


class AccessLog:
    """The ingress's `request` line, rendered as structlog renders a line but without its processor
    chain, and the lines of one turn of the event loop written together. At saturation the chain and
    a write per line were a sixth of the ingress's CPU per webhook (bench/README.md, 2026-12-06).
    With `format = "console"` the line goes through structlog as any other."""

    def __init__(self, config: LoggingConfig, stream: BinaryIO | None = None) -> None:
        self.enabled = config.access and getattr(logging, config.level.upper()) <= logging.INFO
        self._json = config.format != "console"
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._context = structlog.contextvars.get_contextvars()  # process, pid: bound before the app is built
        self._lines: list[bytes] = []

    def request(self, fields: dict[str, Any]) -> None:
        """One request's line; `fields` as for structlog (`_event` becomes "event")."""
        if not self._json:
            structlog.get_logger("ingest.http").info("request", **fields)
            return
        event = fields.pop("_event", None)
        for key, value in self._context.items():
            fields.setdefault(key, value)
        fields["level"] = "info"
        fields["timestamp"] = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
        fields["msg"] = "request"
        if event is not None:
            fields["event"] = event
        if not self._lines:
            asyncio.get_running_loop().call_soon(self.flush)
        self._lines.append(orjson.dumps(fields))

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()
