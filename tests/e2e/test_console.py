"""The console's JSON API against a real RabbitMQ: `hipcall-ingest console` started as a user starts it,
dead letters in real DLQs, under the delivery-limit policy the dlq tests use. Listing and search leave
every letter where it was; replay and purge move exactly what they say; each action is logged with who
did it. The pages, in a real browser: test_console_browser.py."""

import asyncio
import concurrent.futures
import html
import html.parser
import http.cookiejar
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import aio_pika

from conftest import free_port, payload, wait_until
from conftest import http as http_request
from ingest.console.passwords import hash_password

TOKEN = "e2e-console-token-7f3a"
CONFIG = """
[console]
port = {port}
tokens = ["{token}"]
[consumers.crm]
events = ["call_hangup", "call_init"]
handler = "workers.builtin:log"
"""
BEARER = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def call(n: int, event: str = "call_hangup") -> bytes:
    body = payload(event)
    for uuid in (b"2483a75a-56a2-41f1-991b-92b1667e324a", b"7bc3e1d9-0d5e-4bb7-9c68-fcc5a4ae5b6e"):
        body = body.replace(uuid, f"uuid-{n:05d}".encode())
    return body


def letter_headers(n: int, error: str = "TimeoutError: CRM did not answer") -> dict:
    return {"x-hipcall-error": error, "x-hipcall-error-type": error.split(":")[0], "x-hipcall-attempts": 6,
            "x-hipcall-failed-at": f"2026-12-01T08:{n:02d}:00+00:00"}


def start_console(launch, broker, tmp_path, console_keys: str = ""):
    port = free_port()
    console = launch("console", broker, CONFIG.format(port=port, token=TOKEN).replace("[console]\n", "[console]\n" + console_keys))
    console.port = port
    console.wait_http("/login")
    return console


def api(console, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    status, _, raw = http_request(method, console.url + path, json.dumps(body).encode() if body is not None else None, BEARER)
    return status, json.loads(raw)


def dead_letters(launch, broker, tmp_path, n: int = 4):
    """`n` call_hangup letters in crm.call_hangup.dlq (ids id-0..), one call_init letter of call 1 in
    crm.call_init.dlq, and one webhook of call 1 in the unrouted queue."""
    path = tmp_path / "topology.toml"
    path.write_text(CONFIG.format(port=1, token=TOKEN))
    topology = launch("topology", broker, path.read_text())
    assert topology.wait() == 0, topology.output()
    for i in range(n):
        broker.publish("", "crm.call_hangup.dlq", call(i), letter_headers(i, "TimeoutError: CRM did not answer"
                                                                          if i % 2 else "ValueError: no such agent"),
                       message_id=f"id-{i}")
    broker.publish("", "crm.call_init.dlq", call(1, "call_init"), letter_headers(9), message_id="init-1")
    broker.publish("", "hipcall.unrouted", call(1).replace(b'"call_hangup"', b'"call_parked"'), message_id="unrouted-1")


def test_listing_search_and_detail_leave_every_letter_in_place_under_a_delivery_limit(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path)
    broker.ctl("set_policy", "-p", "{vhost}", "dlq-limit", r"\.dlq$|unrouted$", '{"delivery-limit": 2}',
               "--apply-to", "queues")
    console = start_console(launch, broker, tmp_path)
    for _ in range(3):  # each read is a whole pass; none may count as a delivery
        status, listing = api(console, "GET", "/api/dlq")
        assert status == 200
        counts = {q["queue"]: q["messages"] for q in listing["queues"]}
        assert counts["crm.call_hangup.dlq"] == 4 and counts["crm.call_init.dlq"] == 1

        status, letters = api(console, "GET", "/api/dlq/crm.call_hangup.dlq?q=TimeoutError")
        assert status == 200 and letters["total"] == 4 and letters["matched"] == 2 and letters["complete"]
        assert [(l["message_id"], l["call_uuid"], l["attempts"]) for l in letters["letters"]] == [
            ("id-1", "uuid-00001", 6), ("id-3", "uuid-00003", 6)]

        status, found = api(console, "GET", "/api/search?call_uuid=uuid-00001")
        assert status == 200 and found["complete"]
        assert sorted((l["queue"], l["message_id"]) for l in found["letters"]) == [
            ("crm.call_hangup.dlq", "id-1"), ("crm.call_init.dlq", "init-1"), ("hipcall.unrouted", "unrouted-1")]
        assert "crm.call_hangup.dlq" in found["queues_searched"] and "hipcall.unrouted" in found["queues_searched"]

        status, detail = api(console, "GET", "/api/dlq/crm.call_hangup.dlq/letters/id-1")
        assert status == 200 and detail["body"]["data"]["uuid"] == "uuid-00001"
        assert detail["headers"]["x-hipcall-error-type"] == "TimeoutError"
        assert sorted(l["message_id"] for l in detail["same_call"]) == ["init-1", "unrouted-1"]

    status, window = api(console, "GET", "/api/dlq/crm.call_hangup.dlq?since=2026-12-01T08:01&until=2026-12-01T08:03")
    assert [l["message_id"] for l in window["letters"]] == ["id-1", "id-2"]  # since inclusive, until exclusive
    assert api(console, "GET", "/api/dlq/crm.call_hangup.dlq/letters/no-such-id")[0] == 404
    assert api(console, "GET", "/api/search?call_uuid=nobody")[1]["letters"] == []

    letters = broker.take("crm.call_hangup.dlq", expect=4)
    assert [m.message_id for m in letters] == ["id-0", "id-1", "id-2", "id-3"]  # same letters, same order
    assert [m.headers.get("x-delivery-count", 0) for m in letters] == [0, 0, 0, 0]
    assert [m.message_id for m in broker.take("hipcall.unrouted", expect=1)] == ["unrouted-1"]


def test_replay_and_purge_move_exactly_what_they_say_and_are_logged_with_who(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=5)
    console = start_console(launch, broker, tmp_path)

    status, moved = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/replay", {"ids": ["id-0", "id-3"]})
    assert status == 200 and (moved["moved"], moved["examined"], moved["total"]) == (2, 5, 5)
    status, moved = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/replay",
                        {"all": True, "q": "ValueError", "until": "2026-12-01T08:04"})
    assert status == 200 and moved["moved"] == 1  # id-2: the ValueErrors are 0, 2 and 4; 0 is gone, 4 is too late
    replayed = broker.take("crm.call_hangup", expect=3)
    assert sorted(m.message_id for m in replayed) == ["id-0", "id-2", "id-3"]
    assert all("x-hipcall-error" not in m.headers and "x-hipcall-replayed-at" in m.headers for m in replayed)

    status, refused = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/purge", {"confirm": 5})
    assert status == 409 and "holds 2 dead letters now, not the 5 confirmed" in refused["error"]
    assert broker.count("crm.call_hangup.dlq") == 2  # nothing deleted
    status, purged = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/purge", {"confirm": 2})
    assert status == 200 and purged["purged"] == 2 and broker.count("crm.call_hangup.dlq") == 0

    # the unrouted webhook's event gets a consumer: the console's unrouted replay moves it
    status, moved = api(console, "POST", "/api/unrouted/replay", {})
    assert status == 200 and moved["moved"] == 0 and broker.count("hipcall.unrouted") == 1  # call_parked: nobody takes it

    actions = wait_until(lambda: (found := [l for l in console.logs() if l.get("msg") == "console_action"]) and
                         len(found) == 4 and found, what="the four actions' audit lines")
    assert actions[0]["filter"] == {"ids": 2, "ids_sample": ["id-0", "id-3"]} and actions[1]["filter"]["q"] == "ValueError"
    assert [(a["action"], a["user"], a.get("moved", a.get("deleted"))) for a in actions] == [
        ("replay", "token 1", 2), ("replay", "token 1", 1), ("purge", "token 1", 2), ("replay_unrouted", "token 1", 0)]
    assert TOKEN not in console.output()


def test_a_read_only_console_reads_but_refuses_every_action(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=2)
    ro = start_console(launch, broker, tmp_path, "readonly = true\n")
    assert api(ro, "GET", "/api/dlq/crm.call_hangup.dlq")[1]["total"] == 2
    status, refused = api(ro, "POST", "/api/dlq/crm.call_hangup.dlq/purge", {"confirm": 2})
    assert status == 403 and "read-only" in refused["error"] and broker.count("crm.call_hangup.dlq") == 2


def test_an_unreachable_broker_is_a_503_that_says_so_and_the_pipeline_still_answers(launch, broker, tmp_path):
    port = free_port()
    console = launch("console", broker, CONFIG.format(port=port, token=TOKEN),
                     env={"HIPCALL_AMQP_URL": "amqp://guest:secret-pw@127.0.0.1:1/"})
    console.port = port
    console.wait_http("/login")
    status, answer = api(console, "GET", "/api/dlq/crm.call_hangup.dlq")
    assert status == 503 and "cannot connect to RabbitMQ" in answer["error"] and "secret-pw" not in answer["error"]
    status, pipeline = api(console, "GET", "/api/pipeline")
    assert status == 200 and pipeline["broker"] == "unreachable" and "secret-pw" not in json.dumps(pipeline)


def test_a_broker_restart_under_the_console_is_a_503_then_the_console_goes_on(launch, node_broker, rabbit_node, tmp_path):
    console = start_console(launch, node_broker, tmp_path)
    assert api(console, "GET", "/api/dlq")[0] == 200  # the console's connection is open now
    rabbit_node.stop()
    status, answer = api(console, "GET", "/api/dlq/crm.call_hangup.dlq")
    assert status == 503 and "RabbitMQ" in answer["error"]
    assert api(console, "GET", "/api/pipeline")[1]["broker"] == "unreachable"
    rabbit_node.start()
    status, listing = api(console, "GET", "/api/dlq")
    assert status == 200 and "crm.call_hangup.dlq" in {q["queue"] for q in listing["queues"]}
    assert console.process.poll() is None and "Traceback" not in console.output()


def publish_letters(broker, queue: str, n: int, uuid=lambda i: f"uuid-{i:05d}") -> None:
    """`n` dead letters id-0.. in `queue`, in order, over one connection (confirmed one by one)."""
    async def main():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for i in range(n):
                body = call(i).replace(f"uuid-{i:05d}".encode(), uuid(i).encode())
                await channel.default_exchange.publish(
                    aio_pika.Message(body, headers=letter_headers(i % 60), delivery_mode=2, message_id=f"id-{i}"), queue)

    asyncio.run(main())


# --- the pages, as a browser uses them: forms read from the page and posted as they are -------------

PASSWORD = "e2e console password"


class _Form(html.parser.HTMLParser):
    """Every <form> of a page: its action, and the fields a browser sends (hidden and text inputs with
    their values, checkboxes only when checked, buttons by name)."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.forms.append({"action": a.get("action"), "method": a.get("method", "get"), "fields": [], "buttons": []})
        elif self.forms and tag == "input" and a.get("name"):
            if a.get("type") != "checkbox" or "checked" in a:
                self.forms[-1]["fields"].append((a["name"], a.get("value") or ""))
        elif self.forms and tag == "button":
            self.forms[-1]["buttons"].append((a.get("name"), a.get("value") or ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class Browser:
    """A user logged in to the pages: cookies kept, redirects not followed (each answer is seen)."""

    def __init__(self, console) -> None:
        self.console = console
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                                  _NoRedirect)
        status, _, page = self.get("/login")
        status, headers, _ = self.submit(page, "/login", user="alice", password=PASSWORD)
        assert status == 303, status

    def request(self, method: str, path: str, data: list | None = None) -> tuple[int, dict, str]:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        request = urllib.request.Request(self.console.url + path, data=body, method=method)
        try:
            with self.opener.open(request, timeout=60) as answer:
                return answer.status, dict(answer.headers), answer.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read().decode()

    def get(self, path: str) -> tuple[int, dict, str]:
        return self.request("GET", path)

    def submit(self, page: str, action: str, button: str | None = None, **typed) -> tuple[int, dict, str]:
        """Post the page's form for `action` as a browser does: its fields, what was typed, the button pressed."""
        parser = _Form()
        parser.feed(page)
        form = next(f for f in parser.forms if f["action"] == action)
        fields = [(k, typed.pop(k) if k in typed else v) for k, v in form["fields"]] + list(typed.items())
        if button is not None:
            fields += [(n, v) for n, v in form["buttons"] if n == button]
        return self.request("POST", action, fields)


def _with_user(launch, broker, tmp_path):
    port = free_port()
    text = CONFIG.format(port=port, token=TOKEN) + f'[console.users]\nalice = "{hash_password(PASSWORD)}"\n'
    console = launch("console", broker, text)
    console.port = port
    console.wait_http("/login")
    return console


def test_replay_all_matching_on_a_page_filtered_by_call_uuid_or_event_replays_only_what_the_page_shows(
        launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=4)
    console = _with_user(launch, broker, tmp_path)
    user = Browser(console)
    status, _, page = user.get("/dlq/crm.call_hangup.dlq?call_uuid=uuid-00001&event=call_hangup")
    assert status == 200 and "1 match" in page and "Replay all 1 matching" in page
    status, _, _ = user.submit(page, "/dlq/crm.call_hangup.dlq/replay", button="all")
    assert status in (200, 303)
    assert [m.message_id for m in broker.take("crm.call_hangup", expect=1, timeout=3)] == ["id-1"]
    assert broker.count("crm.call_hangup.dlq") == 3


def test_an_action_answers_a_redirect_so_reloading_its_result_does_not_run_it_again(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=4)
    console = _with_user(launch, broker, tmp_path)
    user = Browser(console)
    _, _, page = user.get("/dlq/crm.call_hangup.dlq?q=TimeoutError")
    status, headers, _ = user.submit(page, "/dlq/crm.call_hangup.dlq/replay", button="all")
    assert status == 303, status  # Post/Redirect/Get: the browser's history holds a GET
    for _ in range(2):  # a reload of the result shows it again and runs nothing
        status, _, result = user.get(headers["Location"])
        assert status == 200 and "Replayed 2 dead letters" in result
    assert broker.count("crm.call_hangup.dlq") == 2

    _, _, confirm = user.get("/dlq/crm.call_hangup.dlq/purge")
    status, headers, _ = user.submit(confirm, "/dlq/crm.call_hangup.dlq/purge")
    assert status == 303
    broker.publish("", "crm.call_hangup.dlq", call(7), letter_headers(7), message_id="id-7")
    status, _, result = user.get(headers["Location"])
    assert status == 200 and "Deleted 2 dead letters" in result
    assert broker.count("crm.call_hangup.dlq") == 1  # the letter that came after is still there


class Flow:
    """Letters published into a queue at a steady rate from a thread (each confirmed) until stopped."""

    def __init__(self, broker, queue: str, per_second: float) -> None:
        self.broker, self.queue, self.interval = broker, queue, 1 / per_second
        self.published = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        connection = await aio_pika.connect(self.broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            n = 0
            while not self.stopping.is_set():
                n += 1
                await channel.default_exchange.publish(
                    aio_pika.Message(call(n), headers=letter_headers(n % 60), delivery_mode=2, message_id=f"flow-{n}"),
                    self.queue)
                self.published = n
                await asyncio.sleep(self.interval)

    def __enter__(self) -> "Flow":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        self.thread.join(timeout=30)


def test_a_purge_under_a_flow_of_new_letters_deletes_exactly_the_count_confirmed(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=20)
    console = start_console(launch, broker, tmp_path)
    purges, stale = [], 0
    with Flow(broker, "crm.call_hangup.dlq", per_second=75) as flow:
        deadline = time.monotonic() + 60
        while len(purges) < 40 and time.monotonic() < deadline:
            counts = {q["queue"]: q["messages"] for q in api(console, "GET", "/api/dlq")[1]["queues"]}
            confirm = counts["crm.call_hangup.dlq"]
            status, answer = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/purge", {"confirm": confirm})
            if status == 409:  # a letter came between the look and the purge: nothing deleted
                stale += 1
                continue
            assert status == 200, answer
            purges.append((confirm, answer["purged"]))
    assert len(purges) >= 10, f"{len(purges)} purges done, {stale} refused as stale"
    assert [deleted for _, deleted in purges] == [confirm for confirm, _ in purges]  # never one more
    wait_until(lambda: broker.count("crm.call_hangup.dlq") == 20 + flow.published - sum(d for _, d in purges),
               what="the DLQ to hold every letter no purge confirmed")


def _answer_within(console, path: str, seconds: float) -> tuple[int, dict]:
    """GET path with a client that gives up after `seconds` (a hang fails the test, it does not wait)."""
    request = urllib.request.Request(console.url + path, headers=BEARER)
    try:
        with urllib.request.urlopen(request, timeout=seconds) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_broker_that_stops_answering_is_a_503_naming_rabbitmq_within_seconds_then_the_console_goes_on(
        launch, node_broker, rabbit_node, tmp_path):
    dead_letters(launch, node_broker, tmp_path, n=3)
    console = start_console(launch, node_broker, tmp_path)
    assert api(console, "GET", "/api/dlq/crm.call_hangup.dlq")[1]["total"] == 3  # the connection is open
    paths = ["/api/dlq/crm.call_hangup.dlq", "/api/dlq/crm.call_hangup.dlq/letters/id-1", "/api/dlq",
             "/api/search?call_uuid=uuid-00001"] * 2
    os.killpg(rabbit_node.process.pid, signal.SIGSTOP)  # a partition, as the console sees it: nothing answers
    try:
        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:  # every request at once
            answers = list(pool.map(lambda path: _answer_within(console, path, 40), paths))
        assert all(status == 503 and "RabbitMQ" in answer["error"] for status, answer in answers), answers
        status, pipeline = _answer_within(console, "/api/pipeline", 40)
        assert status == 200 and pipeline["broker"] == "unreachable"
    finally:
        os.killpg(rabbit_node.process.pid, signal.SIGCONT)
    wait_until(lambda: api(console, "GET", "/api/dlq/crm.call_hangup.dlq")[0] == 200, timeout=90,
               what="the console to read the DLQ again")
    assert api(console, "GET", "/api/dlq/crm.call_hangup.dlq")[1]["total"] == 3
    assert console.process.poll() is None and "Traceback" not in console.output()


def fill(broker, queue: str, n: int, size: int = 0) -> None:
    """`n` dead letters with ids bulk-0.. of calls uuid-10000.. (a body padded by `size` bytes), confirmed."""
    async def main():
        connection = await aio_pika.connect(broker.url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for start in range(0, n, 100):
                await asyncio.gather(*(
                    channel.default_exchange.publish(aio_pika.Message(
                        padded(call(10_000 + i), size),
                        headers=letter_headers(i % 60), delivery_mode=2, message_id=f"bulk-{i}"), queue)
                    for i in range(start, min(n, start + 100))))

    asyncio.run(main())


def page(console, path: str) -> tuple[int, str]:
    status, _, raw = http_request("GET", console.url + path, None, {"Authorization": f"Bearer {TOKEN}"})
    return status, raw.decode()


def test_letters_past_the_first_200_are_reachable_page_by_page(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=0)
    publish_letters(broker, "crm.call_hangup.dlq", 205)
    console = start_console(launch, broker, tmp_path)

    status, second = api(console, "GET", "/api/dlq/crm.call_hangup.dlq?offset=200")
    assert status == 200 and (second["matched"], second["offset"]) == (205, 200)
    assert [l["message_id"] for l in second["letters"]] == [f"id-{i}" for i in range(200, 205)]
    assert api(console, "GET", "/api/dlq/crm.call_hangup.dlq?offset=%C2%B2")[0] == 400

    status, first = page(console, "/dlq/crm.call_hangup.dlq?q=TimeoutError")  # a filter the next page keeps
    assert status == 200 and "1–200" in first and 'rel="prev"' not in first
    following = html.unescape(re.search(r'<a href="([^"]+)" rel="next"', first).group(1))
    assert following == "/dlq/crm.call_hangup.dlq?q=TimeoutError&offset=200"
    status, last = page(console, following)
    assert status == 200 and "201–205" in last and 'rel="next"' not in last
    assert re.findall(r'name="id" value="(id-\d+)"', last) == [f"id-{i}" for i in range(200, 205)]
    assert broker.count("crm.call_hangup.dlq") == 205  # reading moved nothing


def test_a_letters_row_shows_its_error_type_once_and_a_huge_uuid_cut_short(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=0)
    huge = "u" * 5000
    publish_letters(broker, "crm.call_hangup.dlq", 1, uuid=lambda i: huge)
    console = start_console(launch, broker, tmp_path)

    status, text = page(console, "/dlq/crm.call_hangup.dlq")
    row = text[text.index('value="id-0"'):]
    row = row[:row.index("</tr>")]
    assert status == 200 and row.count("TimeoutError") == 1 and "CRM did not answer" in row
    shown = re.search(r'<code class="uuid">([^<]*)</code>', row).group(1)
    assert len(shown) <= 48 and shown.startswith("uuuu") and huge in row  # the link still finds the whole uuid
    assert api(console, "GET", "/api/dlq/crm.call_hangup.dlq")[1]["letters"][0]["call_uuid"] == huge  # the API: whole


def test_a_disabled_consumers_queues_show_as_not_declared_not_as_missing(launch, broker, tmp_path):
    config = CONFIG.format(port=free_port(), token=TOKEN) + """
[consumers.archive]
enabled = false
events = ["call_hangup"]
handler = "workers.builtin:log"
"""
    assert launch("topology", broker, config).wait() == 0  # declares what the enabled consumers need
    console = launch("console", broker, config)
    console.port = int(re.search(r"port = (\d+)", config).group(1))
    console.wait_http("/login")
    status, text = page(console, "/")
    archive = text[text.index("Consumer archive"):]
    assert status == 200 and "(disabled)" in archive[:200]
    assert "missing" not in text and archive.count("not declared: the consumer is disabled") == 1


def padded(body: bytes, size: int) -> bytes:
    """The webhook with a "pad" field of `size` bytes (none for 0)."""
    return body.replace(b'"event"', b'"pad": "' + b"x" * size + b'", "event"', 1) if size else body


def reads(console) -> list[str]:
    """The queue of every read (a sweep) the console did, in order."""
    return [l["queue"] for l in console.logs() if l.get("msg") == "console_read"]


def test_views_of_one_queue_in_flight_share_one_read_and_a_letter_page_reads_each_queue_once(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=4)
    fill(broker, "crm.call_hangup.dlq", 3000)  # a read long enough that the views overlap
    console = start_console(launch, broker, tmp_path)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three people open the same page at once
        answers = list(pool.map(lambda _: api(console, "GET", "/api/dlq/crm.call_hangup.dlq?q=TimeoutError"), range(3)))
    assert [(status, answer["total"], answer["matched"]) for status, answer in answers] == [(200, 3004, 3002)] * 3
    # Lines go out from the log's own thread (in pieces of up to 4 KiB): wait for the first; the others, had
    # there been any, were queued before the answers came, and the read's line is short.
    assert wait_until(lambda: reads(console), what="the read's line") == ["crm.call_hangup.dlq"]  # one sweep, not three

    status, letter = api(console, "GET", "/api/dlq/crm.call_hangup.dlq/letters/id-1")
    assert status == 200 and sorted(l["message_id"] for l in letter["same_call"]) == ["init-1", "unrouted-1"]
    searched = wait_until(lambda: {"crm.call_hangup.dlq", "crm.call_init.dlq", "hipcall.unrouted"} <= set(reads(console)[1:])
                          and reads(console)[1:], what="the letter page's reads of its queues")
    assert len(searched) == len(set(searched))  # each queue once: its own is not read a second time
    assert broker.count("crm.call_hangup.dlq") == 3004


def _peak_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def test_a_read_of_large_letters_holds_bytes_up_to_max_read_bytes_not_a_count_of_letters(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=0)
    fill(broker, "crm.call_hangup.dlq", 150, size=1_000_000)  # 150 letters of 1 MB: about 150 MB
    console = start_console(launch, broker, tmp_path, "max_read_bytes = 16777216\n")
    api(console, "GET", "/api/dlq")  # connected, every module loaded
    before = _peak_mib(console.process.pid)
    status, listing = api(console, "GET", "/api/dlq/crm.call_hangup.dlq?limit=10000")
    assert status == 200 and listing["total"] == listing["matched"] == 150 and listing["complete"]
    assert listing["cut_at_bytes"] and 1 <= len(listing["letters"]) <= 16  # 16 MiB of 1 MB letters
    grown = _peak_mib(console.process.pid) - before
    assert grown < 120, f"the read's peak took {grown:.0f} MiB more for a bound of 16 MiB"
    assert broker.count("crm.call_hangup.dlq") == 150


def test_a_replay_of_29000_ids_is_one_short_audit_line(launch, broker, tmp_path):
    dead_letters(launch, broker, tmp_path, n=4)
    console = start_console(launch, broker, tmp_path)
    ids = [f"not-here-{n:05d}" for n in range(28_999)] + ["id-2"]
    status, moved = api(console, "POST", "/api/dlq/crm.call_hangup.dlq/replay", {"ids": ids})
    assert status == 200 and moved["moved"] == 1
    # The log's lines go out from a thread of their own: wait for the action's line, do not expect it yet.
    [line] = wait_until(lambda: [l for l in console.output().splitlines() if '"console_action"' in l],
                        what="the replay's audit line")
    audit = json.loads(line)
    assert audit["filter"]["ids"] == 29_000 and len(audit["filter"]["ids_sample"]) == 10
    assert len(line) < 4096, f"{len(line)} bytes"
