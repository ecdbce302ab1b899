"""Reconcile's rules as functions: its window, the API's calls spelled as webhooks, the rate limit.
A pass against a stand-in of Hipcall's API and a real broker: tests/e2e/test_reconcile.py."""

import asyncio
from datetime import datetime, timedelta, timezone

import pytest

from ingest.config import load_config
from ingest.hipcall_api import RateLimit, _retry_after, as_webhook_data, iso, parse_time
from ingest.reconcile import window

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)


def test_a_pass_looks_back_lookback_and_stops_grace_before_now(tmp_path):
    config = load_config(None, {})  # lookback 2h, grace 5m
    assert window(config, NOW) == (NOW - timedelta(hours=2), NOW - timedelta(minutes=5))
    assert window(config, NOW, since=86400) == (NOW - timedelta(days=1), NOW - timedelta(minutes=5))
    path = tmp_path / "c.toml"
    path.write_text('[reconcile]\nlookback = "30m"\ngrace = "1m"\n')
    assert window(load_config(path, {}), NOW) == (NOW - timedelta(minutes=30), NOW - timedelta(minutes=1))


@pytest.mark.parametrize("text, expected", [
    ("2024-11-17T10:41:06Z", datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)),
    ("2024-11-17T13:41:06+03:00", datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)),
    ("2024-11-17T10:41:06", datetime(2024, 11, 17, 10, 41, 6, tzinfo=timezone.utc)),  # naive: UTC
    ("yesterday", None), ("", None), (None, None), (1731840066, None),
])
def test_api_times_are_read_as_utc_and_anything_else_is_no_time(text, expected):
    assert parse_time(text) == expected


def test_an_api_call_is_spelled_as_a_call_hangup_s_data():
    call = {"uuid": "u1", "recording_url": "https://r/1.mp3", "call_flow": '[{"event": "hangup"}]',
            "ended_at": "2024-11-17T13:41:06.123+03:00", "started_at": "not a time", "direction": "inbound"}
    assert as_webhook_data(call) == {"uuid": "u1", "record_url": "https://r/1.mp3", "call_flow": [{"event": "hangup"}],
                                     "ended_at": "2024-11-17T10:41:06Z", "started_at": "not a time",
                                     "direction": "inbound"}
    assert as_webhook_data({"call_flow": "[not json"})["call_flow"] == "[not json"  # kept as sent
    assert iso(datetime(2024, 11, 17, 13, 41, 6, 999, tzinfo=timezone(timedelta(hours=3)))) == "2024-11-17T10:41:06Z"


@pytest.mark.parametrize("header, seconds", [
    (None, 1.0), ("", 1.0), ("7", 7.0), ("-5", 1.0), ("soon", 1.0), ("100000", 120.0),
])
def test_retry_after_is_believed_within_bounds_and_otherwise_our_own_backoff(header, seconds):
    assert _retry_after(header, 1.0) == seconds


def test_the_api_rate_limit_is_never_passed_in_any_60_seconds(monkeypatch):
    """130 requests at 60 a minute, on a clock the test moves: no 60 s hold more than 60 of them (the
    token bucket this replaced let 64 through in one 60 s window)."""
    now = [0.0]
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        await real_sleep(0)

    monkeypatch.setattr("ingest.hipcall_api.time.monotonic", lambda: now[0])
    monkeypatch.setattr("ingest.hipcall_api.asyncio.sleep", sleep)

    async def main() -> list[float]:
        limit = RateLimit(60)
        sent = []
        for _ in range(130):
            await limit.take()
            sent.append(now[0])
        return sent

    sent = asyncio.run(main())
    assert max(sum(1 for t in sent if start <= t < start + 60) for start in sent) == 60
