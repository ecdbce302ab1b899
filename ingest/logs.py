"""structlog set up once per process: one JSON object per line on stdout, rendered by orjson.

The log message is under "msg", so that "event" can be the webhook's event, as users grep for it:
code logs `log.info("handled", _event=name)` and the line reads {"msg": "handled", "event": name}.
"""

import logging
import sys

import orjson
import structlog

from .config import LoggingConfig


def configure_logging(config: LoggingConfig, process: str) -> None:
    """Called once at start-up; afterwards every module just calls structlog.get_logger()."""
    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.EventRenamer("msg", replace_by="_event"),
    ]
    if config.format == "console":
        processors.append(structlog.dev.ConsoleRenderer(colors=False, event_key="msg"))
        factory = structlog.PrintLoggerFactory(sys.stdout)
    else:
        processors += [
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, config.level.upper())),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=process)
