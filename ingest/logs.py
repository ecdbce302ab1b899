"""structlog set up once per process: one JSON object per line on stdout (or stderr), rendered by orjson.

The log message is under "msg", so that "event" can be the webhook's event, as users grep for it:
code logs `log.info("handled", _event=name)` and the line reads {"msg": "handled", "event": name}.
"""

import logging
import sys
from collections.abc import Callable
from typing import Any

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
