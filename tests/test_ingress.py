"""The ingress end to end: a real HTTP socket in front, a real RabbitMQ behind."""

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import http, payload, post_webhook

SEEDS = ["call_init", "call_hangup", "task_create", "deal_create"]


@pytest.mark.parametrize("event", SEEDS)
def test_each_hipcall_payload_lands_byte_for_byte_in_its_queue(ingress, broker, event):
    body = payload(event)
    status, _, answer = post_webhook(ingress, body)
    assert status == 202
    assert answer["status"] == "accepted"

    [message] = broker.take(f"hipcall.{event}", expect=1)
    assert message.body == body
    assert message.message_id == answer["id"]
    assert message.content_type == "application/json"
    assert message.delivery_mode == 2
    assert message.routing_key == event
    assert message.timestamp is not None
    assert message.headers["x-hipcall-client"] == "127.0.0.1"
    assert message.headers["x-hipcall-received-at"].startswith("20")


def test_same_body_gets_same_id_and_different_body_a_different_one(ingress):
    first = post_webhook(ingress, payload("call_hangup"))[2]["id"]
    again = post_webhook(ingress, payload("call_hangup"))[2]["id"]
    other = post_webhook(ingress, payload("call_init"))[2]["id"]
    assert first == again
    assert first != other


def test_an_event_nobody_subscribes_to_is_kept_in_unrouted(ingress, broker):
    body = b'{"event": "company_create", "data": {"id": 7, "name": "ACME"}}'
    status, _, answer = post_webhook(ingress, body)
    assert status == 202
    [message] = broker.take("hipcall.unrouted", expect=1)
    assert message.body == body
    assert message.message_id == answer["id"]


BAD_BODIES = [
    (b"", "empty body"),
    (b"   ", "empty body"),
    (b"{not json", "not valid JSON"),
    (b'{"event": "call_hangup", "data": {"x": "\xff\xfe"}}', "not valid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"call_hangup"', "must be a JSON object"),
    (b'{"data": {}}', '"event" must be a string'),
    (b'{"event": 5, "data": {}}', '"event" must be a string'),
    (b'{"event": "Call Hangup", "data": {}}', '"event" must match'),
    (b'{"event": "' + b"a" * 65 + b'", "data": {}}', '"event" must match'),
    (b'{"event": "call_hangup"}', '"data" must be a JSON object'),
    (b'{"event": "call_hangup", "data": [1]}', '"data" must be a JSON object'),
]


@pytest.mark.parametrize("body,error", BAD_BODIES)
def test_a_malformed_webhook_gets_400_saying_what_is_wrong_and_nothing_is_published(ingress, broker, body, error):
    status, _, answer = post_webhook(ingress, body)
    assert status == 400
    assert error in answer["error"]
    assert broker.count("hipcall.unrouted") == 0
    assert all(broker.count(f"hipcall.{event}") == 0 for event in SEEDS)


def test_a_body_over_the_limit_gets_413(launch, broker):
    proc = launch("serve", broker, "[http]\nmax_body_bytes = 2000\n", wait="/readyz")
    big = b'{"event": "call_hangup", "data": {"pad": "' + b"x" * 3000 + b'"}}'
    status, _, answer = post_webhook(proc, big)
    assert status == 413
    assert "2000" in answer["error"]
    assert post_webhook(proc, payload("call_hangup"))[0] == 202  # under the limit: fine
    assert broker.count("hipcall.call_hangup") == 1


def test_other_methods_on_the_webhook_path_get_405(ingress):
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        status, headers, _ = http(method, ingress.url + "/webhooks/hipcall")
        assert status == 405, method
        assert headers["Allow"] == "POST"


TOKEN_CONFIG = '[auth]\ntokens = ["s3cret-token", "second-token"]\n'


def test_tokens_are_accepted_in_each_of_the_three_places(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    body = payload("call_hangup")
    assert post_webhook(proc, body, {"Authorization": "Bearer s3cret-token"})[0] == 202
    assert post_webhook(proc, body, {"X-Webhook-Token": "second-token"})[0] == 202
    assert post_webhook(proc, body, query="?token=s3cret-token")[0] == 202
    assert broker.count("hipcall.call_hangup") == 3


def test_a_missing_or_wrong_token_gets_401_and_is_never_logged(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    body = payload("call_hangup")
    assert post_webhook(proc, body)[0] == 401
    assert post_webhook(proc, body, {"Authorization": "Bearer wrong"})[0] == 401
    assert post_webhook(proc, body, {"Authorization": "Basic s3cret-token"})[0] == 401
    assert post_webhook(proc, body, query="?token=s3cret-tokenX")[0] == 401
    assert post_webhook(proc, body, query="?token=s3cret-token")[0] == 202
    assert broker.count("hipcall.call_hangup") == 1
    status, _, metrics = http("GET", proc.url + "/metrics")
    assert proc.stop() == 0
    assert "s3cret" not in proc.output()
    assert b"s3cret" not in metrics
    assert any(line.get("status") == 401 for line in proc.logs())


def test_tokens_from_the_environment_win_over_the_file(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, env={"HIPCALL_TOKENS": "env-token, other"}, wait="/readyz")
    assert post_webhook(proc, payload("deal_create"), {"X-Webhook-Token": "s3cret-token"})[0] == 401
    assert post_webhook(proc, payload("deal_create"), {"X-Webhook-Token": "env-token"})[0] == 202


def test_a_client_outside_allow_ips_gets_403(launch, broker):
    denied = launch("serve", broker, '[auth]\nallow_ips = ["10.0.0.0/8"]\n', wait="/readyz")
    assert post_webhook(denied, payload("call_hangup"))[0] == 403
    allowed = launch("serve", broker, '[auth]\nallow_ips = ["10.0.0.0/8", "127.0.0.1"]\n', wait="/readyz")
    assert post_webhook(allowed, payload("call_hangup"))[0] == 202
    assert broker.count("hipcall.call_hangup") == 1


def test_health_readiness_and_metrics(ingress):
    assert http("GET", ingress.url + "/healthz")[0] == 200
    status, _, body = http("GET", ingress.url + "/readyz")
    assert status == 200 and json.loads(body)["broker"] == "connected"
    post_webhook(ingress, payload("call_hangup"))
    post_webhook(ingress, b"nope")
    status, headers, body = http("GET", ingress.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'hipcall_ingest_requests_total{event="call_hangup",status="202"} 1.0' in text
    assert 'hipcall_ingest_requests_total{event="-",status="400"} 1.0' in text
    assert "hipcall_ingest_publish_seconds_count 1.0" in text
    assert "hipcall_ingest_broker_connected 1.0" in text


def test_each_request_is_logged_as_one_json_line(ingress):
    status, _, answer = post_webhook(ingress, payload("call_hangup"))
    assert ingress.stop() == 0
    [line] = [l for l in ingress.logs() if l.get("msg") == "request" and l.get("status") == 202]
    assert line["event"] == "call_hangup"
    assert line["message_id"] == answer["id"]
    assert line["call_uuid"] == "2483a75a-56a2-41f1-991b-92b1667e324a"
    assert line["latency_ms"] >= 0


def test_sigterm_finishes_in_flight_requests_loses_nothing_and_exits_0(ingress, broker):
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(n: int) -> None:
        body = json.dumps({"event": "call_hangup", "data": {"uuid": f"u-{n}"}}).encode()
        try:
            status, _, answer = post_webhook(ingress, body)
        except OSError:
            return  # refused once the server stopped accepting: Hipcall would retry it
        if status == 202:
            with lock:
                accepted.append(answer["id"])

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(sender, n) for n in range(400)]
        while len(accepted) < 100:
            pass
        ingress.signal(signal.SIGTERM)
        for f in futures:
            f.result()
    assert ingress.wait() == 0
    stored = [m.message_id for m in broker.take("hipcall.call_hangup")]
    assert len(accepted) >= 100
    assert set(accepted) <= set(stored)
