"""`workers.builtin:recordings` through a real worker against file servers in the test (real HTTP servers,
each on a port of its own: an origin of its own) that serve, fail once, are too slow once, answer 403
(expired, or not there yet) and 404 for a while or for good, serve Hipcall's relative links only with
the API key, redirect to another origin, send slowly, stall, crawl, cut a body off, or hold a download
while a worker is killed."""

import json
import signal
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import free_port, payload, wait_until

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


# --- issue 29: the key's origin, 403s, slow lines, cut-off bodies, partials left by a kill -9 ---------


class Server:
    """A real HTTP/1.1 server on a port of its own (an origin of its own): each request goes to the route
    named by its path's first segment, `route(handler, seen)`, seen = how many times this path was asked
    for; every request is recorded as (path, Authorization)."""

    def __init__(self, routes: dict) -> None:
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        server = self

        class Handle(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 - http.server's name
                with server.lock:
                    server.requests.append((self.path, self.headers.get("Authorization", "")))
                    seen = sum(1 for p, _ in server.requests if p == self.path)
                route = routes.get(self.path.split("?")[0].strip("/").split("/")[0])
                try:
                    if route is None:
                        send(self, 404, b"{}")
                    else:
                        route(self, seen)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up or was killed
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handle)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def auths(self, prefix: str = "/") -> list[str]:
        with self.lock:
            return [a for p, a in self.requests if p.startswith(prefix)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler, status: int, body: bytes = b"", headers: dict | None = None) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def cut_off(handler, framing: str, held: threading.Event | None = None, hold: float = 0.0) -> None:
    """Half of AUDIO in `framing` ("length", "chunked" or "close": none), then (after `held` is set or
    `hold` seconds) the connection closed without the rest."""
    handler.send_response(200)
    if framing == "length":
        handler.send_header("Content-Length", str(len(AUDIO)))
    elif framing == "chunked":
        handler.send_header("Transfer-Encoding", "chunked")
    else:
        handler.send_header("Connection", "close")
    handler.end_headers()
    half = AUDIO[: len(AUDIO) // 2]
    handler.wfile.write(b"%x\r\n%s\r\n" % (len(half), half) if framing == "chunked" else half)
    handler.wfile.flush()
    if held is not None:
        held.wait(60)
    if hold:
        time.sleep(hold)
    handler.close_connection = True


def chunked(handler, body: bytes) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for at in range(0, len(body), 1 << 14):
        piece = body[at:at + (1 << 14)]
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
    handler.wfile.write(b"0\r\n\r\n")


@pytest.fixture
def servers():
    started: list[Server] = []

    def start(routes: dict) -> Server:
        started.append(Server(routes))
        return started[-1]

    yield start
    for s in started:
        s.close()


def recordings_config(store, api_url: str, delays: str = '"300ms", "600ms"', **options: str) -> str:
    extra = "".join(f"{k} = {v}\n" for k, v in options.items())
    return (f'[consumers.hipcall]\nenabled = false\n[hipcall]\napi_url = "{api_url}"\n'
            f'[consumers.rec]\nevents = ["call_hangup"]\nhandler = "workers.builtin:recordings"\n'
            f'retry = {{ delays = [{delays}] }}\n[consumers.rec.options]\ndir = "{store}"\n{extra}')


def hangup_at(uuid: str, record_url: str, ended: datetime) -> bytes:
    data = {**json.loads(payload("call_hangup"))["data"], "uuid": uuid, "record_url": record_url,
            "voicemail_url": None, "ended_at": ended.strftime("%Y-%m-%dT%H:%M:%SZ")}
    return json.dumps({"event": "call_hangup", "data": data}).encode()


def start_worker(launch, broker, config: str, **env: str):
    worker = launch("work", broker, config, env={"HIPCALL_API_KEY": KEY, **env})
    wait_until(lambda: any(l.get("msg") == "consuming" for l in worker.logs()), what="worker consuming")
    return worker


def archived(store, uuid: str) -> Path | None:
    return next(iter(store.glob(f"*/*/*/{uuid}.mp3")), None)


def partials(store) -> list[Path]:
    """Partial files anywhere under the archive (this code's in dir/.partial, older code's in the day folders)."""
    return sorted(p for p in store.rglob("*.partial") if p.is_file())


def test_the_api_key_goes_only_to_the_api_urls_origin_whatever_the_link_looks_like(launch, broker, servers, tmp_path):
    """Item 11: a scheme-relative link (`//host/x`) once passed the "relative" check and took the key to
    that host. The key goes only to [hipcall] api_url's origin (scheme, host, port); a link that parsers
    read differently (a backslash, a user name before the host) is refused; a redirect off the origin
    drops the key (two servers on two ports: two origins)."""
    other = servers({"plain": lambda h, seen: send(h, 200, AUDIO)})

    def api_only(h, seen):
        send(h, 200, AUDIO) if h.headers.get("Authorization") == f"Bearer {KEY}" else send(h, 401, b"{}")

    api = servers({"api": api_only, "hop": lambda h, seen: send(h, 302, b"", {"Location": f"{other.url}/plain/hop.mp3"})})
    b_host = other.url.removeprefix("http://")
    store = tmp_path / "recordings"
    worker = start_worker(launch, broker, recordings_config(store, api.url))
    calls = {
        "absolute-on-api": f"{api.url}/api/a.mp3",
        "relative": "/api/b.mp3",
        "scheme-relative": f"//{b_host}/plain/c.mp3",
        "other-host": f"{other.url}/plain/d.mp3",
        "redirected-off-api": "/hop/e.mp3",
        "backslash": f"/\\{b_host}/plain/f.mp3",
        "user-before-host": f"http://{api.url.removeprefix('http://')}@{b_host}/plain/g.mp3",
    }
    ended = datetime.now(timezone.utc)
    for uuid, link in calls.items():
        broker.publish("hipcall.events", "call_hangup", hangup_at(uuid, link, ended), message_id=uuid)

    wait_until(lambda: len(other.requests) >= 3, timeout=30, what="the other origin's three fetches")
    assert set(other.auths()) == {""}  # c, d and the redirect's hop: never the key
    fetched = ["absolute-on-api", "relative", "scheme-relative", "other-host", "redirected-off-api"]
    wait_until(lambda: all(archived(store, u) for u in fetched), timeout=30, what="the fetchable links archived")
    assert all(archived(store, u).read_bytes() == AUDIO for u in fetched)
    letters = {m.message_id: m.headers for m in broker.take("rec.call_hangup.dlq", expect=2, timeout=30)}
    assert set(letters) == {"backslash", "user-before-host"}
    assert all(h["x-hipcall-attempts"] == 1 and h["x-hipcall-error-type"] == "PermanentError" for h in letters.values())
    assert "backslash" in letters["backslash"]["x-hipcall-error"]
    assert "user name" in letters["user-before-host"]["x-hipcall-error"]
    assert sorted(p for p, _ in other.requests) == ["/plain/c.mp3", "/plain/d.mp3", "/plain/hop.mp3"]
    assert api.auths("/api/") == [f"Bearer {KEY}"] * 2 and api.auths("/hop/") == [f"Bearer {KEY}"]
    assert worker.stop() == 0
    assert KEY not in worker.output()


def amz(signed: datetime, expires: int) -> str:
    return f"X-Amz-Date={signed:%Y%m%dT%H%M%SZ}&X-Amz-Expires={expires}&X-Amz-Signature=s3cr3tsig"


def test_a_403_is_retried_until_the_links_lifetime_is_past_and_dead_lettered_after(launch, broker, servers, tmp_path):
    """Item 12: S3 answers 403 for a key that is not there yet, so a 403 while the link is alive is
    retried; only a 403 past the link's lifetime (X-Amz-Date + X-Amz-Expires, else the call's end +
    options.link_lifetime) dead-letters at once."""
    files = servers({"notyet": lambda h, seen: send(h, 403, b"<Error/>") if seen <= 2 else send(h, 200, AUDIO),
                     "gone": lambda h, seen: send(h, 403, b"<Error/>")})
    store = tmp_path / "recordings"
    worker = start_worker(launch, broker, recordings_config(store, files.url))
    now = datetime.now(timezone.utc)
    calls = {  # uuid: (link, the call's end)
        "fresh-signed": (f"{files.url}/notyet/a.mp3?{amz(now, 604800)}", now),
        "fresh-unsigned": (f"{files.url}/notyet/b.mp3", now - timedelta(hours=1)),
        "past-signed": (f"{files.url}/gone/c.mp3?{amz(now - timedelta(days=8), 604800)}", now - timedelta(days=8)),
        "past-unsigned": (f"{files.url}/gone/d.mp3", now - timedelta(days=8)),
        "past-hour-link": (f"{files.url}/gone/e.mp3?{amz(now - timedelta(hours=2), 3600)}", now),
        "alive-but-403": (f"{files.url}/gone/f.mp3?{amz(now, 604800)}", now),
    }
    for uuid, (link, ended) in calls.items():
        broker.publish("hipcall.events", "call_hangup", hangup_at(uuid, link, ended), message_id=uuid)

    wait_until(lambda: archived(store, "fresh-signed") and archived(store, "fresh-unsigned"), timeout=30,
               what="the links that 403 for a while archived")
    assert archived(store, "fresh-signed").read_bytes() == AUDIO == archived(store, "fresh-unsigned").read_bytes()
    letters = {m.message_id: m.headers for m in broker.take("rec.call_hangup.dlq", expect=4, timeout=30)}
    assert set(letters) == {"past-signed", "past-unsigned", "past-hour-link", "alive-but-403"}
    for uuid in ("past-signed", "past-unsigned", "past-hour-link"):
        assert letters[uuid]["x-hipcall-attempts"] == 1, uuid
        assert letters[uuid]["x-hipcall-error-type"] == "PermanentError"
        assert "link has expired" in letters[uuid]["x-hipcall-error"]
    # alive: retried through every delay like any failure, then dead-lettered saying why
    assert letters["alive-but-403"]["x-hipcall-attempts"] == 3
    assert "403 while the link is alive" in letters["alive-but-403"]["x-hipcall-error"]
    assert all("s3cr3tsig" not in h["x-hipcall-error"] for h in letters.values())
    assert worker.stop() == 0


def paced(body: bytes, piece: int, pause: float, framing: str):
    """A route sending `body` `piece` bytes at a time, `pause` seconds apart, framed by its length or chunks."""
    def route(h, seen):
        h.send_response(200)
        h.send_header(*(("Content-Length", str(len(body))) if framing == "length" else ("Transfer-Encoding", "chunked")))
        h.end_headers()
        for at in range(0, len(body), piece):
            part = body[at:at + piece]
            h.wfile.write(part if framing == "length" else b"%x\r\n%s\r\n" % (len(part), part))
            h.wfile.flush()
            time.sleep(pause)
        if framing == "chunked":
            h.wfile.write(b"0\r\n\r\n")

    return route


def test_a_slow_line_archives_a_large_file_and_a_stalled_or_crawling_one_is_retried(launch, broker, servers, tmp_path):
    """Item 12: `timeout` used to cover the whole download, so a slow line never archived a large file.
    Now: no byte for `read_timeout` fails the attempt, and the whole download may take `timeout` +
    size / `min_rate` (the size: Content-Length, else what has come so far)."""
    big = AUDIO * 6  # 600 kB
    files = servers({
        # about 300 kB/s: 2 s, far past `timeout` but well above min_rate, its size said or not
        "slow": paced(big, 30_000, 0.1, "length"),
        "slowchunks": paced(big, 30_000, 0.1, "chunked"),
        # 2 kB/s: a byte well within read_timeout every time, far below min_rate
        "crawl": paced(AUDIO, 200, 0.1, "length"),
        "crawlchunks": paced(AUDIO, 200, 0.1, "chunked"),
        "stall": lambda h, seen: cut_off(h, "length", hold=4) if seen == 1 else send(h, 200, AUDIO),
    })
    store = tmp_path / "recordings"
    config = recordings_config(store, files.url, timeout='"1s"', read_timeout='"1s"', min_rate="100000")
    worker = start_worker(launch, broker, config)
    now = datetime.now(timezone.utc)
    for uuid in ("slow", "slowchunks", "stall", "crawl", "crawlchunks"):
        broker.publish("hipcall.events", "call_hangup", hangup_at(uuid, f"{files.url}/{uuid}/x.mp3", now), message_id=uuid)

    wait_until(lambda: all(archived(store, u) for u in ("slow", "slowchunks", "stall")), timeout=40,
               what="slow and stalled downloads archived")
    assert archived(store, "slow").read_bytes() == big == archived(store, "slowchunks").read_bytes()
    assert archived(store, "stall").read_bytes() == AUDIO
    letters = {m.message_id: m.headers for m in broker.take("rec.call_hangup.dlq", expect=2, timeout=40)}
    assert set(letters) == {"crawl", "crawlchunks"}
    assert all(h["x-hipcall-attempts"] == 3 and "slower than options.min_rate" in h["x-hipcall-error"]
               for h in letters.values())
    assert not partials(store)
    assert worker.stop() == 0


def test_a_body_cut_off_is_never_stored_as_complete(launch, broker, servers, tmp_path):
    """Item 12: a body without Content-Length, cut off halfway, was stored as complete. A body framed by
    its length or by chunks and cut off is retried; one framed only by the connection's close cannot be
    told from a whole one, so it is never stored (dead-lettered saying so)."""
    files = servers({
        "close": lambda h, seen: cut_off(h, "close"),
        "chunked": lambda h, seen: cut_off(h, "chunked") if seen == 1 else chunked(h, AUDIO),
        "length": lambda h, seen: cut_off(h, "length") if seen == 1 else send(h, 200, AUDIO),
    })
    store = tmp_path / "recordings"
    worker = start_worker(launch, broker, recordings_config(store, files.url))
    now = datetime.now(timezone.utc)
    for uuid in ("close", "chunked", "length"):
        broker.publish("hipcall.events", "call_hangup", hangup_at(uuid, f"{files.url}/{uuid}/x.mp3", now), message_id=uuid)

    wait_until(lambda: archived(store, "chunked") and archived(store, "length"), timeout=30, what="retried bodies archived")
    assert archived(store, "chunked").read_bytes() == AUDIO == archived(store, "length").read_bytes()
    [letter] = broker.take("rec.call_hangup.dlq", expect=1, timeout=30)
    assert letter.message_id == "close" and letter.headers["x-hipcall-error-type"] == "PermanentError"
    assert "neither Content-Length nor chunked" in letter.headers["x-hipcall-error"]
    assert archived(store, "close") is None and not partials(store)
    assert worker.stop() == 0


def test_a_partial_left_by_a_kill_9_is_removed_and_a_live_workers_is_kept(launch, broker, servers, tmp_path):
    """Item 12: `.partial` files left by a kill -9 were never removed. A worker removes, when it starts,
    the partials nobody holds (a writer holds a lock on its own), so a second worker on the same
    directory never deletes the first one's download in flight."""
    held = threading.Event()
    files = servers({"hold": lambda h, seen: cut_off(h, "length", held=held) if seen == 1 else send(h, 200, AUDIO)})
    store = tmp_path / "recordings"
    config = recordings_config(store, files.url, read_timeout='"60s"')
    first = start_worker(launch, broker, config)
    broker.publish("hipcall.events", "call_hangup",
                   hangup_at("held", f"{files.url}/hold/x.mp3", datetime.now(timezone.utc)), message_id="held")
    in_flight = wait_until(lambda: [p for p in partials(store) if p.stat().st_size > 0], what="the first worker's partial")

    second = start_worker(launch, broker, config)  # its sweep at start leaves the live partial alone
    assert partials(store) == in_flight
    first.signal(signal.SIGKILL)
    first.wait()
    wait_until(lambda: archived(store, "held"), timeout=30, what="the redelivered call archived by the second worker")
    assert archived(store, "held").read_bytes() == AUDIO
    assert partials(store) == in_flight  # the dead worker's, until a start sweeps it

    third = start_worker(launch, broker, config)
    wait_until(lambda: not partials(store), what="the dead worker's partial removed")
    assert archived(store, "held").read_bytes() == AUDIO
    held.set()
    assert second.stop() == 0 and third.stop() == 0
