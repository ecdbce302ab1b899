"""The access log's own renderer (ingest/logs.py AccessLog) against structlog's: the same line."""

import asyncio
import fcntl
import io
import logging
import os
import time
from dataclasses import replace

import orjson
import pytest
import structlog
from prometheus_client import REGISTRY

from ingest.config import load_config
from ingest.logs import AccessLog, LogWriter, configure_logging, writer_of

FIELDS = {"method": "POST", "path": "/webhooks/hipcall", "status": 202, "latency_ms": 1.5, "remote": "127.0.0.1",
          "_event": "call_hangup", "message_id": "abc", "call_uuid": "u-1"}


@pytest.fixture(autouse=True)
def structlog_as_it_was():
    yield
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def logging_config(**changes):
    return replace(load_config(None, env={}).logging, **changes)


def through_structlog(config) -> dict:
    stream = io.TextIOWrapper(io.BytesIO())
    configure_logging(config, "serve", stream)
    structlog.contextvars.bind_contextvars(pid=42)
    structlog.get_logger("ingest.http").info("request", **FIELDS)
    stream.flush()
    return orjson.loads(stream.buffer.getvalue())


def test_a_line_has_every_key_and_value_structlogs_line_has_and_the_lines_of_a_loop_turn_are_one_write():
    config = logging_config()
    expected = through_structlog(config)  # also binds process=serve, pid=42, as a supervised process has
    out = io.BytesIO()
    writes = []
    out.write = lambda data: writes.append(data) or len(data)  # type: ignore[method-assign]

    async def main():
        lines = AccessLog(config, out)
        lines.request(dict(FIELDS))
        lines.request(dict(FIELDS, status=503))
        assert writes == []  # not yet: at the end of this turn of the loop
        await asyncio.sleep(0)
        return lines

    asyncio.run(main())
    assert len(writes) == 1
    first, second = (orjson.loads(line) for line in writes[0].splitlines())
    assert first.keys() == expected.keys() and second["status"] == 503
    assert {k: v for k, v in first.items() if k != "timestamp"} == {k: v for k, v in expected.items() if k != "timestamp"}
    assert first["timestamp"].endswith("Z") and first["timestamp"][:10] == expected["timestamp"][:10]


def test_no_line_when_the_level_is_above_info_or_the_access_log_is_off():
    assert AccessLog(logging_config()).enabled
    assert not AccessLog(logging_config(level="warning")).enabled
    assert not AccessLog(logging_config(access=False)).enabled


def test_with_the_console_format_the_line_goes_through_structlog():
    config = logging_config(format="console")
    stream = io.StringIO()
    configure_logging(config, "serve", stream)
    AccessLog(config, io.BytesIO()).request(dict(FIELDS))
    assert "request" in stream.getvalue() and "call_hangup" in stream.getvalue()


def dropped() -> float:
    return REGISTRY.get_sample_value("hipcall_log_lines_dropped_total") or 0.0


def test_a_writer_on_a_pipe_nobody_reads_never_blocks_and_drops_whole_lines_past_its_buffer_counting_them():
    read, write = os.pipe()
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)  # the smallest pipe: it is full after a few lines
        writer = LogWriter(write, limit=8192)
        before = dropped()
        lines = [b'{"n": %d, "pad": "%s"}\n' % (n, b"x" * 90) for n in range(500)]  # 50 KB in all
        for line in lines:
            assert writer.write(line) == len(line)  # returns at once, taken or not
        assert not writer.wait_written(0.2)  # the reader stalls: the wait for it is bounded
        lost = dropped() - before
        assert 500 - (4096 + 8192) // 100 - 2 <= lost < 500  # what fit into the pipe and the buffer was kept
        os.set_blocking(read, False)
        received = b""
        deadline = time.monotonic() + 10
        while received.count(b"\n") < 500 - lost and time.monotonic() < deadline:
            try:
                received += os.read(read, 65536)
            except BlockingIOError:
                time.sleep(0.01)
        assert writer.wait_written(5)
        got = received.splitlines(keepends=True)
        assert len(got) == 500 - lost and set(got) <= set(lines)  # whole lines, none cut
        assert [orjson.loads(line)["n"] for line in got] == sorted(orjson.loads(line)["n"] for line in got)
    finally:
        os.close(read)
        os.close(write)


def test_configure_logging_sends_structlog_the_standard_library_and_print_through_one_writer_of_the_fd(tmp_path):
    path = tmp_path / "out.log"
    with open(path, "w") as stream:
        configure_logging(logging_config(), "serve", stream)
        writer = writer_of(stream)
        assert writer is not None
        structlog.get_logger("ingest.http").info("started", token_count=1)
        logging.getLogger("aiormq").warning("a library's warning")
        lines = AccessLog(logging_config(), writer)

        async def main():
            lines.request(dict(FIELDS, call_uuid="\ud800 not encodable as UTF-8"))  # from a header, say

        asyncio.run(main())
        assert writer.wait_written(5)
    records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [r["msg"] for r in records] == ["started", "a library's warning", "request"]
    assert records[2]["call_uuid"] == "\ufffd not encodable as UTF-8"


def test_print_through_a_writers_text_stream_is_one_whole_line_per_print(tmp_path):
    path = tmp_path / "out.log"
    with open(path, "wb") as stream:
        writer = LogWriter(stream.fileno(), limit=4096)
        print("half", end="", file=writer.text)
        print(" and the rest", 42, file=writer.text)  # print() writes each piece and the "\n" on its own
        print("flushed without an end", end="", file=writer.text, flush=True)
        writer.text.buffer.write(b"bytes\n")
        assert writer.wait_written(5)
    assert path.read_bytes() == b"half and the rest 42\nflushed without an endbytes\n"


def test_a_signal_the_main_thread_blocks_stays_pending_with_the_log_writer_running():
    """The supervisor blocks its signals across an upgrade's exec so that they stay pending for the new
    image; the log writer's thread must not take them meanwhile (a process's signal goes to any thread
    that does not block it). In a fresh interpreter: the writer's thread runs, the main thread blocks
    SIGUSR1, the process is sent one, and it must still be pending, not handled."""
    import subprocess
    import sys

    code = (
        "import os, signal, sys, time\n"
        "from ingest.logs import LogWriter\n"
        "handled = []\n"
        "signal.signal(signal.SIGUSR1, lambda *a: handled.append(1))\n"
        "writer = LogWriter(sys.stdout.fileno(), 1 << 20)\n"
        "writer.write(b'{}\\n')\n"
        "time.sleep(0.2)  # the writer's thread is up\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.3)\n"
        "print('pending' if signal.SIGUSR1 in signal.sigpending() and not handled else 'taken', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip().splitlines()[-1] == "pending", done.stdout + done.stderr
