"""Retry policy (workers/retry.py) and the header format (ingest/message.py), as functions."""

from datetime import datetime

import pytest
from pamqp.commands import Basic

from ingest.config import load_config
from ingest.message import (
    ATTEMPT_HEADER,
    RETRY_AT,
    SWEEP_HEADER,
    fresh_headers,
    message_id,
    own_headers,
    republish_properties,
)
from workers.retry import (
    ERROR_LIMIT,
    LONGEST_WAIT,
    attempt_of,
    dead_letter_headers,
    describe_error,
    due_in,
    next_delay,
    retry_headers,
    waiting_delay,
)


@pytest.fixture
def retry():
    return load_config(None, {}).retry  # 10s, 1m, 5m, 30m, 2h


def test_the_delay_after_each_attempt_is_the_configured_tier_then_none(retry):
    assert [next_delay(retry, attempt) for attempt in range(1, 7)] == [10, 60, 300, 1800, 7200, None]


@pytest.mark.parametrize("headers, attempt", [
    (None, 1), ({}, 1), ({ATTEMPT_HEADER: 3}, 3), ({ATTEMPT_HEADER: "4"}, 4),
    ({ATTEMPT_HEADER: 0}, 1), ({ATTEMPT_HEADER: -7}, 1), ({ATTEMPT_HEADER: "x"}, 1), ({ATTEMPT_HEADER: [1]}, 1),
    ({"x-death": [{"count": 9}]}, 1),  # the broker's count is not ours
])
def test_the_attempt_is_our_own_header_and_anything_odd_in_it_counts_as_the_first(headers, attempt):
    assert attempt_of(headers) == attempt


def test_a_retry_counts_up_and_drops_the_queue_s_and_the_sweep_s_bookkeeping():
    headers = {"x-hipcall-received-at": "t", "x-delivery-count": 4, SWEEP_HEADER: "s", ATTEMPT_HEADER: 2}
    assert retry_headers(headers, 2) == {"x-hipcall-received-at": "t", ATTEMPT_HEADER: 3}
    assert own_headers(headers) == {"x-hipcall-received-at": "t", ATTEMPT_HEADER: 2}


def test_a_dead_letter_says_where_when_and_why_it_failed():
    headers = dead_letter_headers({"x-hipcall-client": "1.2.3.4", "x-delivery-count": 1}, attempt=6,
                                  exc=ValueError("no such contact"), queue="crm.call_hangup", consumer="crm")
    failed_at = datetime.fromisoformat(headers.pop("x-hipcall-failed-at"))
    assert failed_at.tzinfo is not None
    assert headers == {"x-hipcall-client": "1.2.3.4", "x-hipcall-attempts": 6, "x-hipcall-error": "ValueError: no such contact",
                       "x-hipcall-error-type": "ValueError", "x-hipcall-queue": "crm.call_hangup", "x-hipcall-consumer": "crm"}


def test_a_long_error_is_cut_at_the_limit_without_splitting_a_character():
    text = describe_error(RuntimeError("é" * 2000))
    assert len(text.encode()) <= ERROR_LIMIT and text.startswith("RuntimeError: éé")
    text.encode("utf-8")  # whole characters only
    assert describe_error(KeyError("k")) == "KeyError: 'k'"


def test_a_replayed_letter_starts_fresh_keeping_only_its_own_headers():
    letter = dead_letter_headers({"x-hipcall-received-at": "t", ATTEMPT_HEADER: 6}, attempt=6, exc=OSError("x"),
                                 queue="q", consumer="c")
    letter |= {"x-death": [{"count": 1}], "x-first-death-queue": "q", "x-delivery-count": 2}
    assert fresh_headers(letter) == {"x-hipcall-received-at": "t"}


def test_republished_properties_keep_the_message_and_make_it_persistent():
    body = b'{"event":"x","data":{}}'
    delivered = Basic.Properties(content_type="application/json", delivery_mode=1, app_id="a", correlation_id="c",
                                 message_type="t", headers={"old": 1})
    properties = republish_properties(delivered, body, {"new": b"\xff\x00"})
    assert properties.delivery_mode == 2 and properties.message_id == message_id(body)  # a foreign message gets its id
    assert (properties.content_type, properties.app_id, properties.correlation_id, properties.message_type) == \
        ("application/json", "a", "c", "t")
    assert properties.headers == {"new": bytearray(b"\xff\x00")}  # bytes as AMQP's byte array, byte for byte
    again = republish_properties(Basic.Properties(message_id="kept"), body, {})
    assert again.message_id == "kept"


def test_a_retry_after_takes_the_first_remaining_delay_at_least_that_long(retry):
    assert next_delay(retry, 1, at_least=30) == 60  # 10s is too short: the 1m tier
    assert next_delay(retry, 1, at_least=60) == 60
    assert next_delay(retry, 2, at_least=5) == 60  # never shorter than the tier the attempt is at
    assert next_delay(retry, 4, at_least=100000) == 7200  # longer than any: the longest that remains
    assert next_delay(retry, 6, at_least=1) is None  # attempts used up


def test_a_wait_longer_than_every_tier_is_carried_as_a_due_time_and_taken_through_the_tiers(retry):
    """Issue 29 #17: a Retry-After past the longest delay is honoured, not cut to it."""
    headers = retry_headers({ATTEMPT_HEADER: 2, "x-delivery-count": 1}, 2, due=1_700_000_000.0 + 9000)
    assert headers == {ATTEMPT_HEADER: 3, RETRY_AT: "2023-11-15T00:43:20+00:00"}
    assert due_in(headers, 1_700_000_000.0) == 9000
    assert due_in(headers, 1_700_000_000.0 + 9000) == 0  # due: handled now
    assert RETRY_AT not in retry_headers(headers, 3)  # the next failure sets its own, or none
    assert RETRY_AT not in dead_letter_headers(headers, attempt=3, exc=ValueError("x"), queue="q", consumer="c")
    assert RETRY_AT not in fresh_headers(headers)  # a replay is not held back
    assert [waiting_delay(retry, left) for left in (9000, 7200, 7199, 61, 1)] == [7200, 7200, 7200, 300, 10]


@pytest.mark.parametrize("value", [None, "soon", 17, "2023-13-45T00:00:00"])
def test_a_due_time_that_is_missing_or_not_a_time_means_now(value):
    assert due_in({RETRY_AT: value}, 1_700_000_000.0) <= 0


def test_a_due_time_is_believed_up_to_a_day():
    assert due_in({RETRY_AT: "2999-01-01T00:00:00+00:00"}, 1_700_000_000.0) == LONGEST_WAIT == 86400
