"""Dead letters as the dlq tools read and write them (ingest/ops/dlq.py), without a broker: what a letter
says, and the export file's round trip. Sweeps, replays and purges on a real broker: tests/e2e/test_operators.py."""

import io
from datetime import datetime, timedelta, timezone

import pytest
from pamqp.commands import Basic

from conftest import payload
from fakes import delivered
from ingest.config import load_config
from ingest.errors import HipcallError
from ingest.message import SWEEP_HEADER, message_id
from ingest.ops.dlq import Filter, Letter, Stats, export_line, max_export_line, read_export
from workers.retry import dead_letter_headers

BODY = payload("call_hangup")


def worker_letter(body: bytes = BODY, **extra) -> Letter:
    headers = dead_letter_headers({"x-hipcall-received-at": "2026-11-26T10:00:00+00:00"}, attempt=6,
                                  exc=TimeoutError("CRM did not answer"), queue="crm.call_hangup", consumer="crm")
    properties = Basic.Properties(message_id=message_id(body), content_type="application/json", delivery_mode=2,
                                  timestamp=datetime(2026, 11, 26, 10, tzinfo=timezone.utc), app_id="hipcall-ingest",
                                  headers={**headers, "x-delivery-count": 3, **extra})
    return Letter(delivered(body, properties))


def test_a_worker_s_letter_says_which_call_how_often_and_why():
    summary = worker_letter().summary()
    assert summary["event"] == "call_hangup" and summary["call_uuid"] == "2483a75a-56a2-41f1-991b-92b1667e324a"
    assert (summary["kind"], summary["attempts"], summary["error_type"]) == ("worker", 6, "TimeoutError")
    assert summary["error"] == "TimeoutError: CRM did not answer" and summary["failed_at"].startswith("20")


def test_a_broker_s_letter_says_the_broker_s_reason():
    death = {"reason": "delivery_limit", "queue": "crm.call_hangup", "count": 1,
             "time": datetime(2026, 11, 26, 10, tzinfo=timezone.utc)}
    letter = Letter(delivered(BODY, Basic.Properties(message_id="m", headers={"x-death": [death]})), limit=20)
    assert (letter.kind, letter.attempts, letter.error_type) == ("broker", 21, "broker:delivery_limit")
    assert "delivered 21 times from crm.call_hangup" in letter.error
    assert letter.failed_at == "2026-11-26T10:00:00+00:00"


def test_a_foreign_letter_without_an_id_or_json_body_is_still_shown():
    letter = Letter(delivered(b"\xffnot json", Basic.Properties(headers={"x-hipcall-attempts": "many"})))
    assert letter.id == message_id(b"\xffnot json") and letter.event is None and letter.attempts == "many"
    assert letter.payload_or_text == "\ufffdnot json"


def test_filters_match_event_id_call_text_and_failure_time():
    letter = worker_letter()
    assert Filter(events=("call_hangup",)).matches(letter) and not Filter(events=("call_init",)).matches(letter)
    assert Filter(ids=(letter.id,)).matches(letter) and not Filter(ids=("other",)).matches(letter)
    assert Filter(grep="CRM did not").matches(letter) and Filter(grep="2483a75a").matches(letter)
    assert not Filter(grep="nowhere").matches(letter)
    assert Filter(call_uuid="2483a75a-56a2-41f1-991b-92b1667e324a").matches(letter)
    assert not Filter(call_uuid="2483a75a").matches(letter)  # the whole uuid, not a part of it
    failed = letter.failed_time
    assert failed is not None and Filter(failed_after=failed, failed_before=failed + timedelta(seconds=1)).matches(letter)
    assert not Filter(failed_before=failed).matches(letter) and not Filter(failed_after=failed + timedelta(1)).matches(letter)
    assert not Filter() and Filter(grep="x")  # an empty filter is falsy: "no filter"


def test_a_letter_of_the_unrouted_queue_is_described_as_unrouted_not_as_a_failure():
    letter = Letter(delivered(BODY, Basic.Properties(message_id="m")), queue_kind="unrouted")
    assert letter.error_type == "unrouted" and "no consumer subscribed to call_hangup" in letter.error


def test_an_export_line_reads_back_as_the_same_letter_without_the_bookkeeping():
    letter = worker_letter(body=b'{"event":"x","data":{"raw":"\\u0000"}}\n\xff', **{SWEEP_HEADER: "s"})
    [(body, properties)] = read_export(io.BytesIO(export_line(letter)), 1 << 20)
    assert body == letter.message.body  # byte for byte, whatever the bytes
    assert properties.message_id == letter.id and properties.delivery_mode == 2
    assert (properties.content_type, properties.app_id, properties.timestamp) == \
        ("application/json", "hipcall-ingest", datetime(2026, 11, 26, 10, tzinfo=timezone.utc))
    expected = {k: v for k, v in letter.headers.items() if k not in ("x-delivery-count", SWEEP_HEADER)}
    assert properties.headers == expected


def test_an_export_file_with_one_bad_line_is_refused_whole_naming_the_line():
    good = export_line(worker_letter())
    for bad, says in [(b"{not json}\n", "line 2: not a dead letter"), (b'{"body_base64": "!!"}\n', "line 2"),
                      (b'{"headers": {}}\n', "line 2")]:
        with pytest.raises(HipcallError, match=says):
            read_export(io.BytesIO(good + bad + good), 1 << 20)
    assert len(read_export(io.BytesIO(good + b"\n\n" + good), 1 << 20)) == 2  # blank lines are nothing


def test_a_line_longer_than_any_export_is_refused_in_bounded_memory():
    config = load_config(None, {})
    limit = max_export_line(config)
    assert limit >= config.http.max_body_bytes * 4 // 3  # room for the largest body the ingress takes, in base64
    with pytest.raises(HipcallError, match=f"line 1: longer than {limit} bytes"):
        read_export(io.BytesIO(b"x" * (limit + 10)), limit)


def test_stats_count_letters_and_keep_only_real_failure_times():
    stats = Stats()
    stats.add(worker_letter())
    stats.add(Letter(delivered(BODY, Basic.Properties(headers={"x-hipcall-error": "E: x", "x-hipcall-error-type": "E",
                                                              "x-hipcall-failed-at": "not a time"}))))
    seen = stats.as_dict()
    assert seen["messages"] == 2 and seen["oldest_failure"].startswith("20")
    assert {e["type"] for e in seen["top_errors"]} == {"TimeoutError", "E"}
