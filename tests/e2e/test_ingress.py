"""The ingress end to end: a real HTTP socket in front, a real RabbitMQ behind."""

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT, children_of, free_port, http, payload, post_webhook, raw_http, wait_until

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
    (b'{"event": "call_hangup\\n", "data": {}}', '"event" must match'),  # "$" alone would let it through
    (b'{"event": "call_hangup", "data": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "nests deeper than 32"),
    (b'{"event": "call_hangup", "data": {"x": ' + b"[" * 1000 + b"]" * 1000 + b"}}", "nests deeper than 32"),
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


def test_an_unroutable_webhook_is_never_a_2xx_without_a_spool(launch, broker):
    """With the unrouted queue gone nothing stores an unsubscribed event: the broker returns it (mandatory)."""
    ingress = launch("serve", broker, '[spool]\nenabled = false\n', wait="/readyz")
    broker.delete_queue("hipcall.unrouted")
    status, headers, answer = post_webhook(ingress, b'{"event": "company_create", "data": {"id": 7}}')
    assert status == 503 and headers["Retry-After"]
    assert post_webhook(ingress, payload("call_hangup"))[0] == 202  # a routed event is still stored
    assert ingress.stop() == 0
    [failed] = [l for l in ingress.logs() if l.get("msg") == "publish_failed"]
    assert failed["event"] == "company_create" and "returned" in failed["error"]


def test_an_unroutable_webhook_waits_in_the_spool_until_a_queue_takes_it(ingress, broker, tmp_path):
    broker.delete_queue("hipcall.unrouted")
    status, _, answer = post_webhook(ingress, b'{"event": "company_create", "data": {"id": 7}}')
    assert status == 202  # on our disk, not lost: the broker returned it
    time.sleep(1.5)  # a drain or two, returned again
    assert broker.count("hipcall.unrouted") is None
    config = tmp_path / "t.toml"
    config.write_text("")
    env = {"HIPCALL_AMQP_URL": broker.url, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "ingest", "topology", "--config", str(config)], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    [message] = broker.take("hipcall.unrouted", expect=1, timeout=40)
    assert message.message_id == answer["id"] and message.headers["x-hipcall-spooled"] == "true"
    assert ingress.stop() == 0
    assert any(l.get("msg") == "spooled" and "returned" in l.get("reason", "") for l in ingress.logs())


def test_a_token_header_that_is_not_ascii_gets_401(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    body = payload("call_hangup")
    request = (b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"X-Webhook-Token: s3cret-\xff\xfe\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
               b"Connection: close\r\n\r\n" + body)
    answer = raw_http(proc.port, request)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert proc.stop() == 0
    assert "Traceback" not in proc.output() and '"status":500' not in proc.output()


def test_a_malformed_request_line_is_a_json_400_and_one_log_line_without_the_token(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    answer = raw_http(proc.port, b"POST /webhooks/hipcall?token=s3cret-token&x=\x7f HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request") and b"application/json" in head
    assert json.loads(body)["error"] == "malformed HTTP request"
    assert proc.stop() == 0
    output = proc.output()
    assert "s3cret" not in output and "\\x7f" not in output and "Traceback" not in output
    lines = [l for l in proc.logs() if l.get("level") in ("warning", "error")]
    assert [l["msg"] for l in lines] == ["bad_request"]
    assert "exception" not in lines[0] and lines[0]["status"] == 400


def test_a_gzip_body_is_decoded_and_one_that_is_not_gzip_gets_400(ingress, broker):
    body = payload("call_hangup")
    status, _, answer = post_webhook(ingress, gzip.compress(body), {"Content-Encoding": "gzip"})
    assert status == 202 and answer["id"]
    status, _, answer = post_webhook(ingress, body, {"Content-Encoding": "gzip"})
    assert status == 400 and "Content-Encoding" in answer["error"]
    assert [m.body for m in broker.take("hipcall.call_hangup", expect=1)] == [body]


def test_serve_logs_whether_auth_is_on_and_how_many_tokens_never_which(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    open_proc = launch("serve", broker, "", wait="/readyz")
    assert proc.stop() == 0 and open_proc.stop() == 0
    serving = [l for l in proc.logs() if l.get("msg") == "serving"]
    assert len(serving) == 2 and all(l["auth"] == "on" and l["tokens"] == 2 for l in serving)  # one per process
    assert "s3cret" not in proc.output()
    assert [l["auth"] for l in open_proc.logs() if l.get("msg") == "serving"] == ["off", "off"]


SLOW = '[http]\nidle_timeout = "1s"\nbody_timeout = "1s"\nshutdown_timeout = "30s"\n'


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_within(s: socket.socket, seconds: float) -> bool:
    """True if the server closes the connection within `seconds` (reading what it sends first)."""
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _one_past_the_cap_is_closed(port: int, cap: int) -> None:
    """With `cap` connections held open, the next one is closed at once; then they are let go."""
    held = [_connect(port) for _ in range(cap)]
    try:
        wait_until(lambda: _closed_within(_connect(port), 2), timeout=10, what=f"connection {cap + 1} closed at once")
    finally:
        for s in held:
            s.close()


def test_a_trickled_head_or_body_is_cut_off_and_idle_connections_are_closed(launch, broker):
    proc = launch("serve", broker, SLOW, wait="/readyz")
    idle = _connect(proc.port)
    head = _connect(proc.port)
    head.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\n")  # the rest of the head never comes
    body = _connect(proc.port)
    body.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"ev")
    started = time.monotonic()
    for s in (idle, head, body):
        assert _closed_within(s, 5), "the server kept a slow connection open"
    assert time.monotonic() - started < 5
    body.close()
    # the trickled body got its answer before the close
    trickle = _connect(proc.port)
    trickle.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    trickle.settimeout(5)
    assert trickle.recv(65536).startswith(b"HTTP/1.1 408")
    assert proc.stop(timeout=10) == 0


def test_a_normal_webhook_is_answered_while_1000_slow_connections_are_open_and_sigterm_does_not_wait_for_them(launch, broker):
    # 1000 slow clients, all from 127.0.0.1 here: past the per-client cap, which is not what this is about.
    proc = launch("serve", broker, '[http]\nidle_timeout = "20s"\nbody_timeout = "20s"\nmax_connections_per_client = 4096\n',
                  wait="/readyz")
    slow = []
    try:
        for n in range(1000):
            s = _connect(proc.port)
            s.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\n" if n % 2 else b"")
            slow.append(s)
        status, _, answer = post_webhook(proc, payload("call_hangup"))
        assert status == 202
        started = time.monotonic()
        assert proc.stop(timeout=30) == 0
        assert time.monotonic() - started < 10  # idle and half-sent requests are not in-flight requests
    finally:
        for s in slow:
            s.close()
    assert [m.message_id for m in broker.take("hipcall.call_hangup", expect=1)] == [answer["id"]]


def test_connections_past_max_connections_are_closed_at_once_and_counted(launch, broker):
    # The cap is per process: one process, so that every connection meets the same cap.
    proc = launch("serve", broker, '[http]\nmax_connections = 20\nprocesses = 1\n', wait="/readyz")
    _one_past_the_cap_is_closed(proc.port, 20)
    def accepted() -> bool:
        try:
            return post_webhook(proc, payload("call_hangup"))[0] == 202
        except OSError:  # still refused: the server has not seen every close yet
            return False

    wait_until(accepted, timeout=10, what="room again once the held connections closed")
    metrics = http("GET", proc.url + "/metrics")[2].decode()
    refused = [l for l in metrics.splitlines() if l.startswith("hipcall_ingest_connections_refused_total")]
    assert refused and float(refused[0].split()[-1]) >= 1


def test_serve_on_a_port_in_use_exits_1_with_one_line_naming_it(launch, broker):
    first = launch("serve", broker, "", wait="/readyz")
    second = launch("serve", broker, "", env={"HIPCALL_HTTP_PORT": str(first.port)})
    assert second.wait() == 1
    output = second.output()
    assert "Traceback" not in output and f":{first.port}" in output and "http.port" in output
    assert first.stop() == 0


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(launch, broker):
    allow = '[auth]\nallow_ips = ["203.0.113.7/32"]\n[http]\nhost = "127.0.0.1"\n'
    behind = launch("serve", broker, allow + 'trusted_proxies = ["127.0.0.1/32"]\n', wait="/readyz")
    body = payload("call_hangup")
    # From the trusted proxy: the right-most entry it did not add itself is the client.
    assert post_webhook(behind, body, {"X-Forwarded-For": "10.9.9.9, 203.0.113.7"})[0] == 202
    # A client that forges the header gets its forgery on the left: the proxy appends the real address.
    assert post_webhook(behind, body, {"X-Forwarded-For": "203.0.113.7, 198.51.100.4"})[0] == 403
    [message] = broker.take("hipcall.call_hangup", expect=1)
    assert message.headers["x-hipcall-client"] == "203.0.113.7"
    # Two processes write their lines each at the end of its loop turn: the webhooks' own lines, in any order.
    assert sorted(wait_until(lambda: _webhook_lines(behind, 2), what="the two webhooks' request lines")) == [
        (202, "203.0.113.7"), (403, "198.51.100.4")]
    # From a peer that is not a trusted proxy the header is ignored: the peer itself is the client.
    direct = launch("serve", broker, allow + 'trusted_proxies = ["10.0.0.0/8"]\n', wait="/readyz")
    assert post_webhook(direct, body, {"X-Forwarded-For": "203.0.113.7"})[0] == 403
    assert wait_until(lambda: _webhook_lines(direct, 1), what="the webhook's request line") == [(403, "127.0.0.1")]


def _webhook_lines(proc, at_least: int) -> list[tuple[int, str]] | None:
    """(status, remote) of the `request` lines of webhooks (not of /readyz), once there are `at_least`."""
    lines = [(l["status"], l["remote"]) for l in proc.logs() if l.get("msg") == "request" and l["path"] == "/webhooks/hipcall"]
    return lines if len(lines) >= at_least else None


def test_a_call_hangup_id_comes_from_its_call_uuid_and_other_ids_from_the_body(ingress):
    def answer_id(event: str, **data) -> str:
        body = json.dumps({"event": event, "data": {"uuid": "call-1", **data}}).encode()
        return post_webhook(ingress, body)[2]["id"]

    # One call has one call_hangup: rebuilt by reconcile with other field spellings, it keeps the id.
    assert answer_id("call_hangup", record_url=None) == answer_id("call_hangup", record_url="https://x/r.mp3")
    # A call may be bridged more than once: each call_bridged is its own message.
    assert answer_id("call_bridged", user_id=1) != answer_id("call_bridged", user_id=2)


def test_x_forwarded_for_entries_with_a_port_are_parsed_and_a_trusted_hop_with_a_port_is_skipped(launch, broker):
    allow = '[auth]\nallow_ips = ["203.0.113.7/32", "2001:db8::1/128"]\n'
    proc = launch("serve", broker, allow + '[http]\ntrusted_proxies = ["127.0.0.1/32", "10.0.0.0/8"]\n', wait="/readyz")
    body = payload("call_hangup")
    assert post_webhook(proc, body, {"X-Forwarded-For": "203.0.113.7:43122"})[0] == 202  # Azure's way
    assert post_webhook(proc, body, {"X-Forwarded-For": "[2001:db8::1]:443"})[0] == 202
    assert post_webhook(proc, body, {"X-Forwarded-For": "203.0.113.7:1, 10.1.1.1:8080"})[0] == 202
    assert post_webhook(proc, body, {"X-Forwarded-For": "203.0.113.7, 198.51.100.4:443"})[0] == 403
    # Each process writes its lines at the end of its loop turn: wait for the four webhooks' own lines (not
    # the last four lines of the file, where a /readyz of the other process may stand), whatever their order.
    assert sorted(wait_until(lambda: _webhook_lines(proc, 4), what="the four webhooks' request lines")) == [
        (202, "2001:db8::1"), (202, "203.0.113.7"), (202, "203.0.113.7"), (403, "198.51.100.4")]


def test_a_request_is_authorized_when_any_token_it_presents_is_right(launch, broker):
    proc = launch("serve", broker, TOKEN_CONFIG, wait="/readyz")
    body = payload("call_hangup")
    assert post_webhook(proc, body, {"X-Webhook-Token": "wrong"}, query="?token=s3cret-token")[0] == 202
    assert post_webhook(proc, body, query="?token=wrong&token=second-token")[0] == 202
    assert post_webhook(proc, body, {"Authorization": "Bearer wrong"}, query="?token=s3cret-token")[0] == 202
    assert post_webhook(proc, body, {"X-Webhook-Token": "wrong"}, query="?token=wrong&token=")[0] == 401


def test_the_http_edge_answers_each_odd_client_with_one_line_and_no_traceback(launch, broker):
    proc = launch("serve", broker, "[http]\nprocesses = 1\n", wait="/readyz")
    body = payload("call_hangup")
    status, _, answer = post_webhook(proc, body, {"Content-Encoding": "compress"})
    assert status == 415 and "compress" in answer["error"]
    for _ in range(20):  # a fuzz run's worth of bodies that are not the gzip they claim
        assert post_webhook(proc, b"not gzip at all", {"Content-Encoding": "gzip"})[0] == 400
    # A client that half-closes after sending its whole request still gets its answer.
    with _connect(proc.port) as s:
        s.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 202"), answer
    # One that half-closes in the middle of its body gets its 400 at once; nothing is logged as an error.
    with _connect(proc.port) as s:
        s.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"event\"")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        answer = b"".join(iter(lambda: s.recv(65536), b""))
    assert answer.startswith(b"HTTP/1.1 400") and b"before the body was complete" in answer, answer
    time.sleep(0.5)
    assert post_webhook(proc, body)[0] == 202
    assert proc.stop() == 0
    assert "Traceback" not in proc.output() and '"exception"' not in proc.output()
    assert not [l for l in proc.logs() if l.get("level") == "error"]
    assert len(broker.take("hipcall.call_hangup", expect=2)) == 2


def test_sigterm_closes_connections_still_sending_their_body_at_once(launch, broker):
    proc = launch("serve", broker, '[http]\nbody_timeout = "20s"\nprocesses = 1\n', wait="/readyz")
    trickling = []
    try:
        for _ in range(300):
            s = _connect(proc.port)
            s.sendall(b"POST /webhooks/hipcall HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            trickling.append(s)
        wait_until(lambda: post_webhook(proc, payload("call_hangup"))[0] == 202, what="an answer while they trickle")
        started = time.monotonic()
        assert proc.stop(timeout=30) == 0
        assert time.monotonic() - started < 10  # not the 20 s body_timeout
    finally:
        for s in trickling:
            s.close()


def test_one_client_address_cannot_take_every_connection(launch, broker):
    limited = '[http]\nmax_connections_per_client = 5\nprocesses = 1\n'
    proc = launch("serve", broker, limited, wait="/readyz")
    _one_past_the_cap_is_closed(proc.port, 5)
    wait_until(lambda: post_webhook(proc, payload("call_hangup"))[0] == 202, what="room once they closed")
    metrics = http("GET", proc.url + "/metrics")[2].decode()
    assert [l for l in metrics.splitlines() if l.startswith("hipcall_ingest_connections_refused_per_client_total")
            and float(l.split()[-1]) >= 1]
    # An allowed sender (Hipcall's address in auth.allow_ips) is exempt.
    exempt = launch("serve", broker, limited + '[auth]\nallow_ips = ["127.0.0.1/32"]\n', wait="/readyz")
    held = [_connect(exempt.port) for _ in range(5)]
    try:
        assert post_webhook(exempt, payload("call_hangup"))[0] == 202
    finally:
        for s in held:
            s.close()


def test_a_stdout_nobody_reads_never_blocks_the_ingress_and_lines_past_the_buffer_are_dropped_and_counted(
        broker, tmp_path):
    """A stalled log reader (a hung log shipper, Docker's blocking log mode): serve's stdout is a pipe
    nobody reads (64 KiB in the kernel). 300 webhooks write about 100 KB of access lines, past the pipe and
    the 16 KiB buffer: every one gets its 202, /healthz answers, the dropped lines are counted, the
    supervisor still replaces a killed process, and a stop does not hang on the pipe. The lines read
    afterwards are whole JSON lines."""
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text('[http]\nhost = "127.0.0.1"\nprocesses = 1\n[logging]\nbuffer_bytes = 16384\n')
    env = {**os.environ, "HIPCALL_AMQP_URL": broker.url, "HIPCALL_HTTP_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-m", "ingest", "serve", "--config", str(config)], env=env,
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, process_group=0)
    url = f"http://127.0.0.1:{port}"

    def connected() -> bool:
        assert process.poll() is None, "serve exited"
        try:
            status, _, body = http("GET", url + "/readyz")
        except OSError:
            return False
        return status == 200 and json.loads(body)["broker"] == "connected"

    def get(path: str) -> tuple[int, bytes]:
        with urllib.request.urlopen(url + path, timeout=5) as response:  # a frozen loop fails here
            return response.status, response.read()

    try:
        wait_until(connected, what="serve ready")
        for n in range(300):
            body = json.dumps({"event": "call_hangup", "data": {"uuid": f"stall-{n}"}}).encode()
            request = urllib.request.Request(url + "/webhooks/hipcall", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    assert response.status == 202, n
            except OSError as exc:
                pytest.fail(f"webhook {n} got no answer: {exc!r}")
        assert get("/healthz")[0] == 200
        metrics = get("/metrics")[1].decode()
        [dropped] = [float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("hipcall_log_lines_dropped_total ")]
        assert 0 < dropped <= 300 + 10  # the access lines past pipe and buffer, and a few others
        # The supervisor logs to the same pipe: its loop goes on too (it logs the kill, starts another).
        [(old, _)] = children_of(process.pid)
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: [pid for pid, _ in children_of(process.pid) if pid != old], what="a new ingress process")
        wait_until(connected, what="the new ingress process ready")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0  # the last lines' flush gives up on the stalled pipe
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert len(broker.take("hipcall.call_hangup", expect=300)) == 300
    output = process.stdout.read()
    process.stdout.close()
    lines = output.splitlines()
    assert len(lines) > 100 and all(isinstance(json.loads(line), dict) for line in lines)


def test_a_lone_surrogate_escape_is_valid_json_accepted_stored_as_sent_and_handled_by_a_worker(launch, broker, tmp_path):
    """"\\ud800" is valid JSON text (RFC 8259's grammar allows any \\uXXXX escape); Hipcall sends once.
    The ingress takes it (202), the queue holds the bytes as sent, and a worker handles it (the jsonl sink
    writes it, with U+FFFD for the lone surrogate) instead of dead-lettering it."""
    sink = tmp_path / "events.jsonl"
    config = (f'[http]\nhost = "127.0.0.1"\n[consumers.archive]\nhandler = "workers.builtin:jsonl"\n'
              f'events = ["call_hangup", "call_init"]\n[consumers.archive.options]\npath = "{sink}"\n')
    proc = launch("serve", broker, config, wait="/readyz")
    stored_body = b'{"event": "call_init", "data": {"uuid": "s-1", "caller_name": "A\\ud800B", "\\udc00": 1}}'
    status, _, answer = post_webhook(proc, stored_body)
    assert status == 202, answer
    [message] = broker.take("archive.call_init", expect=1)
    assert message.body == stored_body and message.message_id == answer["id"]

    handled_body = b'{"event": "call_hangup", "data": {"uuid": "s-2", "caller_name": "A\\ud800B"}}'
    assert post_webhook(proc, handled_body)[0] == 202
    worker = launch("work", broker, config)
    wait_until(lambda: sink.exists() and b"s-2" in sink.read_bytes(), what="the jsonl sink has the webhook")
    [line] = [json.loads(l) for l in sink.read_text().splitlines() if "s-2" in l]
    assert line["data"]["caller_name"] == "A\ufffdB"
    assert worker.stop() == 0
    assert not [l for l in worker.logs() if l.get("msg") in ("dead_lettered", "retry_scheduled")]
    assert broker.count("archive.call_hangup.dlq") == 0 and broker.count("hipcall.call_hangup.dlq") == 0


def test_the_supervisors_last_line_before_an_upgrades_exec_is_written_not_lost(launch, broker):
    """An exec skips atexit: the supervisor writes out the lines still waiting in its log buffer first."""
    proc = launch("serve", broker, '[http]\nhost = "127.0.0.1"\nprocesses = 1\n', wait="/readyz")
    proc.process.send_signal(signal.SIGUSR2)
    wait_until(lambda: any(l.get("msg") == "reload_done" for l in proc.logs()), what="the upgrade's reload done")
    said = [l["msg"] for l in proc.logs() if l.get("msg", "").startswith("supervisor_")]
    assert said == ["supervisor_started", "supervisor_upgrading", "supervisor_upgraded"]
    assert proc.stop() == 0
