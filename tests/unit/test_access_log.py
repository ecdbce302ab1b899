"""The access log's own renderer (ingest/logs.py AccessLog) against structlog's: the same line."""

import asyncio
import io
from dataclasses import replace

import orjson
import pytest
import structlog

from ingest.config import load_config
from ingest.logs import AccessLog, configure_logging

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
