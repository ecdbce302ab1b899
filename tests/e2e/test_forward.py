"""`workers.builtin:http_forward` through a real worker to a real HTTP server in the test, which answers
as receivers do: 200, 500 once, 410, 400, 429 with Retry-After, too slow once. Every delivery is
checked with the Standard Webhooks reference implementation."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks.webhooks import Webhook

from conftest import wait_until

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Receiver:
    """Answers by the uuid's prefix: ok (200), flaky (500, then 200), gone (410), bad (400), busy (429 with
    Retry-After: 1, then 200), slow (past the forwarder's timeout, then 200)."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[float, dict, bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handle(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                uuid = json.loads(body)["data"]["uuid"]
                with receiver.lock:
                    receiver.deliveries.append((time.monotonic(), dict(self.headers), body))
                    seen = sum(1 for _, _, b in receiver.deliveries if json.loads(b)["data"]["uuid"] == uuid)
                kind = uuid.split("-")[0]
                status, headers = 200, {}
                if kind == "flaky" and seen == 1:
                    status = 500
                elif kind == "gone":
                    status = 410
                elif kind == "bad":
                    status = 400
                elif kind == "busy" and seen == 1:
                    status, headers = 429, {"Retry-After": "1"}
                elif kind == "slow" and seen == 1:
                    time.sleep(2)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def of(self, uuid: str) -> list[tuple[float, dict, bytes]]:
        with self.lock:
            return [d for d in self.deliveries if json.loads(d[2])["data"]["uuid"] == uuid]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def test_each_answer_a_receiver_can_give_is_handled_as_it_should_be(launch, broker, receiver):
    config = (f'[consumers.hipcall]\nenabled = false\n'
              f'[consumers.crm]\nevents = ["call_hangup"]\nhandler = "workers.builtin:http_forward"\n'
              f'retry = {{ delays = ["300ms", "1s", "2s"] }}\n'
              f'[consumers.crm.options]\nurl = "{receiver.url}"\ntimeout = "1s"\nsecret = "{SECRET}"\n'
              f'headers = {{ Authorization = "Bearer crm-token" }}\n')
    worker = launch("work", broker, config)
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    bodies = {}
    for uuid in ("ok-1", "flaky-1", "gone-1", "bad-1", "busy-1", "slow-1"):
        bodies[uuid] = json.dumps({"event": "call_hangup", "data": {"uuid": uuid, "n": "ü"}}, ensure_ascii=False).encode()
        broker.publish("hipcall.events", "call_hangup", bodies[uuid], message_id=f"id-{uuid}")

    wait_until(lambda: len(receiver.of("flaky-1")) == 2 and len(receiver.of("busy-1")) == 2 and len(receiver.of("slow-1")) >= 2,
               timeout=30, what="the retries delivered")
    letters = {json.loads(m.body)["data"]["uuid"]: m for m in broker.take("crm.call_hangup.dlq", expect=2)}
    assert set(letters) == {"gone-1", "bad-1"}
    assert "410 Gone" in letters["gone-1"].headers["x-hipcall-error"]
    assert "HTTP 400" in letters["bad-1"].headers["x-hipcall-error"]
    assert [len(receiver.of(u)) for u in ("ok-1", "gone-1", "bad-1")] == [1, 1, 1]  # no retry of a permanent refusal

    for uuid, body in bodies.items():
        for _, headers, delivered in receiver.of(uuid):
            assert delivered == body  # byte for byte
            assert headers["webhook-id"] == f"id-{uuid}"  # the same on every retry: the idempotency key
            assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer crm-token"
            Webhook(SECRET).verify(delivered, {k.lower(): v for k, v in headers.items()})
    (first, _, _), (second, _, _) = receiver.of("busy-1")
    assert second - first >= 1.0  # Retry-After 1: the 1s tier, not the 300ms one
    assert worker.stop() == 0
    assert "crm-token" not in worker.output() and SECRET not in worker.output()


def test_a_bad_url_or_secret_stops_the_worker_at_start_naming_the_option(launch, broker):
    for options, says in (('url = "ftp://x"', "options.url"), ('url = "http://x"\nsecret = "nope-S3CRET"', "options.secret")):
        config = (f'[consumers.hipcall]\nenabled = false\n[consumers.crm]\nevents = ["call_hangup"]\n'
                  f'handler = "workers.builtin:http_forward"\n[consumers.crm.options]\n{options}\n')
        worker = launch("work", broker, config)
        assert worker.wait() == 2
        assert says in worker.output() and "S3CRET" not in worker.output() and "Traceback" not in worker.output()
