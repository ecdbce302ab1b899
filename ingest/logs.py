"""structlog set up once per process: one JSON object per line on stdout (or stderr), rendered by orjson,
written by a thread of its own so that logging never blocks the process.

The log message is under "msg", so that "event" can be the webhook's event, as users grep for it:
code logs `log.info("handled", _event=name)` and the line reads {"msg": "handled", "event": name}.

A reader that stops reading (a log shipper that hangs, Docker's blocking log mode, a pipe nobody
drains) fills the pipe; a write to it then blocks, and a write on the event loop froze the ingress
(`/healthz` included). So every line, structlog's, the standard library's, the access log's, print()'s
and a traceback's, goes to a `LogWriter`: a bounded buffer (`logging.buffer_bytes`) that a thread
writes out. Past the bound, lines are dropped whole and counted (hipcall_log_lines_dropped_total). The
file descriptor itself stays blocking: it is shared with the supervisor and every child, and
O_NONBLOCK would change it for all of them.
"""

import asyncio
import atexit
import io
import json
import logging
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from typing import IO, Any, BinaryIO

import orjson
import structlog
from prometheus_client import Counter

from .config import LoggingConfig
from .message import without_lone_surrogates

LINES_DROPPED = Counter("hipcall_log_lines_dropped_total",
                        "Log lines dropped: their reader (stdout, stderr) did not keep up and logging.buffer_bytes "
                        "were waiting to be written.")
EXIT_FLUSH = 2.0  # seconds the lines still waiting at exit may take: a stalled reader never holds up a stop
DEFAULT_BUFFER = 1 << 20  # bytes, for a writer made before configure_logging (logging.buffer_bytes)

# Tracebacks as data, without local variables: locals can hold tokens and passwords.
_TRACEBACKS = structlog.processors.ExceptionRenderer(structlog.tracebacks.ExceptionDictTransformer(show_locals=False))


class LogWriter:
    """Whole lines to a file descriptor without ever blocking the caller: `write` appends to a buffer
    of at most `limit` bytes (or drops the lines and counts them), a daemon thread writes it out.

    Writes go out in pieces of at most PIPE_BUF bytes cut at line ends, each atomic on a pipe, so the
    lines (up to PIPE_BUF long) of the processes that share one, the supervisor's and its children's,
    never interleave."""

    def __init__(self, fd: int, limit: int) -> None:
        self.limit = limit
        self._fd = os.dup(fd)  # ours: a number the caller closes and reuses never gets our lines
        self._queue: deque[bytes] = deque()
        self._size = 0  # bytes accepted and not yet written, the one being written included
        self._cond = threading.Condition()
        self.text = _Lines(self)
        threading.Thread(target=self._run, name="log-writer", daemon=True).start()

    def write(self, data: bytes) -> int:
        """Take `data` (one or more whole lines), or drop it if the buffer has no room for it."""
        with self._cond:
            room = self._size + len(data) <= self.limit
            if room:
                self._queue.append(data)
                self._size += len(data)
                self._cond.notify_all()
        if not room:
            LINES_DROPPED.inc(data.count(b"\n") or 1)
        return len(data)

    def flush(self) -> None:
        """Nothing to do: the thread writes as soon as it can (never waited for)."""

    def fileno(self) -> int:
        return self._fd

    def wait_written(self, timeout: float) -> bool:
        """Until everything taken so far is written (True), or `timeout` (False): for the last lines at exit."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._size:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        # Signals are the main thread's: the supervisor blocks them across an upgrade's exec so that they
        # stay pending for the new image, and the kernel would hand a process's signal to this thread instead.
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = b"".join(self._queue)
                self._queue.clear()
            try:
                self._write_all(data)
            except OSError:  # the reader is gone (EPIPE): nothing can take these lines
                LINES_DROPPED.inc(data.count(b"\n") or 1)
            with self._cond:
                self._size -= len(data)
                self._cond.notify_all()

    def _write_all(self, data: bytes) -> None:
        view, start, end_of_data = memoryview(data), 0, len(data)
        while start < end_of_data:
            end = min(end_of_data, start + select.PIPE_BUF)
            if end < end_of_data:
                cut = data.rfind(b"\n", start, end)
                end = cut + 1 if cut >= start else end  # a line longer than PIPE_BUF goes out in pieces
            start += os.write(self._fd, view[start:end])


class _Lines(io.TextIOBase):
    """A LogWriter as a text stream (sys.stdout, sys.stderr, the standard library's handler): whole lines
    go to the writer, a line's start waits for its end (print() writes its "\\n" on its own)."""

    def __init__(self, writer: LogWriter) -> None:
        super().__init__()
        self._writer = writer
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return "backslashreplace"

    def writable(self) -> bool:
        return True

    @property
    def buffer(self) -> LogWriter:
        """For code that writes bytes to sys.stdout.buffer: the writer itself."""
        return self._writer

    def fileno(self) -> int:
        return self._writer.fileno()

    def isatty(self) -> bool:
        return os.isatty(self._writer.fileno())

    def write(self, text: str) -> int:
        with self._lock:
            text, length = self._pending + text, len(text)
            cut = text.rfind("\n") + 1
            if len(text) - cut > self._writer.limit:  # a line without an end, as long as the buffer: out it goes
                cut = len(text)
            self._pending = text[cut:]
        if cut:
            self._writer.write(text[:cut].encode("utf-8", "backslashreplace"))
        return length

    def flush(self) -> None:
        with self._lock:
            text, self._pending = self._pending, ""
        if text:
            self._writer.write(text.encode("utf-8", "backslashreplace"))


_WRITERS: dict[tuple[int, int], LogWriter] = {}  # one per file (device, inode): one bound and one order for it
_WRITERS_LOCK = threading.Lock()


def writer_of(stream: IO, limit: int = DEFAULT_BUFFER) -> LogWriter | None:
    """The LogWriter of the file `stream` writes to (made on first use), or None for a stream that is no
    file (an in-memory one: it cannot block)."""
    try:
        fd = stream.fileno()
        stat = os.fstat(fd)
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return None
    key = (stat.st_dev, stat.st_ino)
    with _WRITERS_LOCK:
        writer = _WRITERS.get(key)
        if writer is None:
            stream.flush()  # what the stream holds goes out before what the writer gets
            writer = _WRITERS[key] = LogWriter(fd, limit)
            if len(_WRITERS) == 1:
                atexit.register(flush_logs)
        writer.limit = limit
        return writer


def flush_logs(timeout: float = EXIT_FLUSH) -> bool:
    """Write out what waits, for at most `timeout` in all (at exit; before an exec, which skips atexit).
    False if a reader did not take it all in time: those lines are lost, the process goes on."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name, None)
        if isinstance(stream, _Lines):
            stream.flush()
    deadline = time.monotonic() + timeout
    with _WRITERS_LOCK:
        writers = list(_WRITERS.values())
    return all([writer.wait_written(max(0.0, deadline - time.monotonic())) for writer in writers])


def _dumps(value: Any, **kw: Any) -> bytes:
    """orjson, or for a string it cannot encode (a lone surrogate, from a header, say) the standard
    library with U+FFFD for it: a log line is never lost to what it carries, and stays UTF-8."""
    try:
        return orjson.dumps(value, **kw)
    except TypeError:
        return without_lone_surrogates(json.dumps(value, default=kw.get("default", str), ensure_ascii=False)).encode()


def configure_logging(config: LoggingConfig, process: str, stream: IO | None = None) -> None:
    """Called once at start-up; afterwards every module just calls structlog.get_logger(). A command
    that prints a result on stdout logs to stderr (`stream`), and its stdout stays as it is.

    Logging to the process's stdout or stderr, the standard streams themselves are replaced by the
    writer's (stderr always, stdout when the logs go there): print(), warnings and tracebacks never block
    either. An in-memory `stream` (tests) is written as it is."""
    target: Any = stream or sys.stdout
    if target is sys.stdout or target is sys.stderr:
        for name in ("stdout", "stderr") if target is sys.stdout else ("stderr",):
            standard = writer_of(getattr(sys, name), config.buffer_bytes)
            if standard is not None:
                setattr(sys, name, standard.text)
        target = sys.stdout if target is sys.stdout else sys.stderr
    writer = writer_of(target, config.buffer_bytes)
    text: Any = writer.text if writer is not None else target
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
        factory = structlog.WriteLoggerFactory(text)
    else:
        processors += [_TRACEBACKS, structlog.processors.JSONRenderer(serializer=_dumps)]
        out: Any = writer if writer is not None else target.buffer
        factory = structlog.BytesLoggerFactory(out)
        renderer = structlog.processors.JSONRenderer(serializer=lambda v, **kw: _dumps(v, **kw).decode())
    # Libraries (aiormq, aiohttp) log through the standard library: same format, same stdout.
    handler = logging.StreamHandler(text)
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
    With `format = "console"` the line goes through structlog as any other. Written to stdout's
    LogWriter (configure_logging), so it never blocks."""

    def __init__(self, config: LoggingConfig, stream: BinaryIO | None = None) -> None:
        self.enabled = config.access and getattr(logging, config.level.upper()) <= logging.INFO
        self._json = config.format != "console"
        self._stream: Any = stream if stream is not None else writer_of(sys.stdout, config.buffer_bytes) or sys.stdout.buffer
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
        self._lines.append(_dumps(fields))

    def flush(self) -> None:
        if self._lines:
            lines, self._lines = self._lines, []
            self._stream.write(b"\n".join(lines) + b"\n")
            self._stream.flush()
