"""`workers.builtin:recordings` through a real worker against a file server in the test that serves,
fails once, is too slow once, answers 403 (an expired link), 404 for a while or for good, and serves
Hipcall's relative links only with the API key."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import payload, wait_until

KEY = "test-api-key-5ecr3t"
AUDIO = b"ID3" + bytes(range(256)) * 400  # 100 kB of "mp3"


class FileServer:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []  # (path, Authorization)
        self.lock = threading.Lock()
        server = self

        class Handle(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                with server.lock:
                    server.requests.append((self.path, self.headers.get("Authorization", "")))
                    seen = sum(1 for p, _ in server.requests if p == self.path)
                kind = self.path.strip("/").split("/")[0]
                status = 200
                if kind == "flaky" and seen == 1:
                    status = 500
                elif kind == "slow" and seen == 1:
                    time.sleep(2)
                elif kind == "expired":
                    status = 403
                elif kind == "late" and seen <= 2:
                    status = 404
                elif kind == "missing":
                    status = 404
                elif kind == "api" and self.headers.get("Authorization") != f"Bearer {KEY}":
                    status = 401
                body = AUDIO if status == 200 else b"{}"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for p, _ in self.requests if p.startswith(prefix))


@pytest.fixture
def files():
    f = FileServer()
    yield f
    f.server.shutdown()


def hangup(uuid: str, record_url: str | None, voicemail_url: str | None = None) -> bytes:
    data = {**json.loads(payload("call_hangup"))["data"], "uuid": uuid, "record_url": record_url,
            "voicemail_url": voicemail_url}
    return json.dumps({"event": "call_hangup", "data": data}).encode()


def test_recordings_are_archived_once_and_each_failure_is_retried_or_dead_lettered(launch, broker, files, tmp_path):
    store = tmp_path / "recordings"
    config = (f'[consumers.hipcall]\nenabled = false\n[hipcall]\napi_url = "{files.url}"\n'
              f'[consumers.rec]\nevents = ["call_hangup"]\nhandler = "workers.builtin:recordings"\n'
              f'retry = {{ delays = ["300ms", "600ms", "1s"] }}\n'
              f'[consumers.rec.options]\ndir = "{store}"\ntimeout = "1s"\n')
    worker = launch("work", broker, config, env={"HIPCALL_API_KEY": KEY})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    calls = {
        "ok": (f"{files.url}/ok/a.mp3?X-Amz-Signature=s3cr3tsig", f"{files.url}/ok/a-vm.mp3"),
        "flaky": (f"{files.url}/flaky/b.mp3", None),
        "slow": (f"{files.url}/slow/c.mp3", None),
        "late": (f"{files.url}/late/d.mp3", None),
        "relative": ("/api/recordings/e.mp3", None),
        "none": (None, None),
        "expired": (f"{files.url}/expired/f.mp3?X-Amz-Signature=s3cr3tsig", None),
        "missing": (f"{files.url}/missing/g.mp3", None),
    }
    for uuid, (record, voicemail) in calls.items():
        broker.publish("hipcall.events", "call_hangup", hangup(uuid, record, voicemail), message_id=uuid)

    day = store / "2024" / "11" / "17"  # the call ended 2024-11-17T10:41:06Z
    archived = ["ok.mp3", "ok.voicemail.mp3", "flaky.mp3", "slow.mp3", "late.mp3", "relative.mp3"]
    wait_until(lambda: all((day / name).exists() for name in archived), timeout=30, what="every recording archived")
    assert all((day / name).read_bytes() == AUDIO for name in archived)
    letters = {m.message_id: m for m in broker.take("rec.call_hangup.dlq", expect=2, timeout=30)}
    assert set(letters) == {"expired", "missing"}
    expired = letters["expired"].headers["x-hipcall-error"]
    assert "link has expired" in expired and "2024-11-17T10:41:06Z" in expired and "s3cr3tsig" not in expired
    assert letters["missing"].headers["x-hipcall-attempts"] == 3 and "404 after 3 attempts" in letters["missing"].headers["x-hipcall-error"]
    assert sorted(p.name for p in day.iterdir()) == sorted(archived)  # nothing half-written left behind
    assert [a for p, a in files.requests if p.startswith("/api/")] == [f"Bearer {KEY}"]

    before = files.count("/ok/")
    broker.publish("hipcall.events", "call_hangup", hangup("ok", *calls["ok"]), message_id="ok-again")
    broker.publish("hipcall.events", "call_hangup", hangup("marker", f"{files.url}/ok/m.mp3"), message_id="marker")
    wait_until(lambda: (day / "marker.mp3").exists(), what="a later call archived")
    time.sleep(0.5)  # the repeat, published before it, is done too
    assert files.count("/ok/") == before + 1  # the marker's; the complete files were not fetched again
    assert worker.stop() == 0
    assert "s3cr3tsig" not in worker.output() and KEY not in worker.output()
